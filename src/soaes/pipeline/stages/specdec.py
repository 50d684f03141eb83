"""Speculative-decoding stages: the benchmark (soaes-specdec `run_benchmark`) and the serving export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from soaes_core.errors import ConfigError

from ..recipe import PipelineRecipe, package_config
from .base import (
    Input,
    Stage,
    StageContext,
    _target_input,
    placed,
    placement_extra,
    read_drafts,
    register,
)

# the undistilled and sweep drafts are compared at one point: greedy, n=3, against plain decoding
SINGLE_POINT = {"modes": ["greedy"], "num_speculative_tokens": [3], "methods": ["plain", "speculative"]}


@register
class SpecdecBench(Stage):
    """soaes-specdec's benchmark of the trained target with the distilled draft (the section's `BenchConfig`), with
    the undistilled and sweep drafts (greedy, n=3), and the bench's greedy token-exactness check in float32 and in
    the section's dtype (`exactness.json`)."""

    name = "specdec_bench"
    weight = 2.0

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [_target_input(recipe), Input("drafts", "distill_draft", "distill_draft", None),
                Input("prompts", "teacher_data", "teacher_data", None, "heldout_prompts.jsonl")]

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, **placement_extra(recipe, self.name, dtype=False)}  # dtype: the section's own

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_specdec.bench import BenchConfig, run_benchmark

        r, s = ctx.recipe, ctx.recipe.specdec_bench
        target, drafts_dir, prompts = (ctx.spec(i) for i in self.inputs(r))
        drafts = read_drafts(Path(drafts_dir))

        def job(key: str, **over: Any) -> BenchConfig:
            return package_config(s, BenchConfig, target=target, draft=drafts[key], prompts=prompts, seed=r.seed,
                                  threads=r.threads, device=placed(r, self.name).device, **over)

        jobs = [("distilled", job("distilled"))] + [(k, job(k, **SINGLE_POINT)) for k in drafts if k != "distilled"]
        jobs += [(f"exactness/{dtype}", job("distilled", dtype=dtype, reference_dtype=None, modes=["greedy"],
                                            methods=["speculative"], num_speculative_tokens=[3], repeats=1, warmup=0,
                                            max_prompts=s.exactness_prompts, sampling_seeds=1))
                 for dtype in dict.fromkeys(["float32", s.dtype])]
        counts: dict[str, Any] = {}
        reports = {}
        for key, cfg in jobs:
            reports[key] = run_benchmark(cfg, out / key)
            counts[key] = {"prompts": reports[key]["num_prompts"], "results": len(reports[key]["results"])}
            ctx.fail_point(self.name, f"after_{key.replace('/', '_')}")
        exactness = exactness_summary({k.removeprefix("exactness/"): v for k, v in reports.items()
                                       if k.startswith("exactness/")}, s.max_new_tokens)
        from soaes_core import atomic_write_json

        atomic_write_json(out / "exactness.json", exactness)
        counts["exactness"] = {"prompts": exactness["prompts"], "exact_fp32": exactness["exact"]}
        return counts


def exactness_summary(reports: dict[str, dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """Per dtype, how many prompts' greedy speculative output equalled plain greedy output (the bench's
    `exact_match` / `mismatch_rate`); `exact` is the float32 verdict."""
    summary: dict[str, Any] = {"max_new_tokens": max_new_tokens, "n": 3}
    for dtype, report in reports.items():
        row = next(x for x in report["results"] if x["mode"] == "greedy" and x["method"] == "speculative")
        prompts = int(report["num_prompts"])
        summary["prompts"] = prompts
        summary[dtype] = {"identical": round((1.0 - row["mismatch_rate"]) * prompts), "exact": row["exact_match"]}
    summary["exact"] = summary["float32"]["exact"]
    return summary


@register
class Export(Stage):
    """The serving hand-off (soaes-specdec `export_for_vllm`): `serve/draft/`, the chosen draft as a full-head HF
    directory with the target's tokenizer, and `serve/vllm_serve.sh` + `serve/README.md` with the exact
    `vllm serve TARGET --speculative-config ...` command for the trained target (absolute paths of this run), and
    `serve/soaes_serve.sh` (`soaes serve`). An engine-layout feature draft is also exported as vLLM's and SGLang's
    EAGLE drafts (`serve/vllm-eagle/`, `serve/sglang-eagle/`, each with its README and serve command).

    Block size: `export.num_speculative_tokens`, else the bench's fastest greedy n (soaes-specdec
    `best_num_speculative_tokens` on the distilled draft's bench.json)."""

    name = "export"
    SOAES_SERVE_SCRIPT: ClassVar[str] = "soaes_serve.sh"
    weight = 0.5

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        from_bench = recipe.export.num_speculative_tokens is None
        return [_target_input(recipe), Input("drafts", "distill_draft", "distill_draft", None),
                Input("bench", "specdec_bench", "specdec_bench", None, "distilled/bench.json", required=from_bench)]

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_core.atomic import atomic_write_text
        from soaes_specdec.eagle_export import export_eagle
        from soaes_specdec.export import export_for_vllm
        from soaes_specdec.feature_draft import feature_draft_layout

        from ...serve import serve_command

        r, s = ctx.recipe, ctx.recipe.export
        target_in, drafts_in, bench_in = self.inputs(r)
        drafts = read_drafts(ctx.path(drafts_in))
        if s.draft not in drafts:
            raise ConfigError(f"{r.source}: export.draft: no draft {s.draft!r} in {ctx.path(drafts_in)}/drafts.json "
                              f"(drafts: {', '.join(drafts)})")
        draft, target = drafts[s.draft], ctx.spec(target_in)
        n, n_from = self._block_size(ctx, bench_in)
        served = ctx.stage_dir(self.name).resolve() / "serve"
        res = export_for_vllm(draft, out / "serve", target, n, final_dir=served)
        b = r.specdec_bench
        lookup = b.lookup_tokens if "speculative_lookup" in b.methods else 0
        soaes_serve = serve_command(str(res.target_dir), str(res.draft_dir), num_speculative_tokens=n,
                                    lookup_tokens=lookup)
        atomic_write_text(out / "serve" / self.SOAES_SERVE_SCRIPT, f"#!/usr/bin/env bash\nset -euo pipefail\n"
                                                                   f"{soaes_serve}\n")
        engines = {}
        if feature_draft_layout(draft) == "engine":  # vLLM and SGLang load only the engine layout as EAGLE
            for fmt in ("vllm-eagle", "sglang-eagle"):
                engines[fmt] = export_eagle(draft, out / "serve" / fmt, target, fmt, n,
                                            final_dir=served / fmt).serve_command()
        return {"draft": s.draft, "kind": res.kind, "num_speculative_tokens": n, "n_from": n_from,
                "target": str(res.target_dir), "restricted_head_tokens": res.restricted_head_tokens,
                "vllm_serve": res.serve_command(), "soaes_serve": soaes_serve, "engines": engines}

    def _block_size(self, ctx: StageContext, bench_in: Input) -> tuple[int, str]:
        from soaes_specdec.export import best_num_speculative_tokens

        if ctx.recipe.export.num_speculative_tokens is not None:
            return ctx.recipe.export.num_speculative_tokens, "export.num_speculative_tokens"
        bench = ctx.path(bench_in)
        n = best_num_speculative_tokens(json.loads(bench.read_text(encoding="utf-8")))
        if n is None:
            raise ConfigError(f"{ctx.recipe.source}: export.num_speculative_tokens: unset, and {bench} has no greedy "
                              "speculative row to take it from; set it")
        return n, "bench"
