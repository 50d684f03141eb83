"""Speculative-decoding stages: the benchmark (soaes-specdec) and the serving export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from soaes_core.errors import ConfigError
from soaes_core.placement import ResolvedPlacement, input_device

from ..recipe import (
    PipelineRecipe,
    is_model_spec,
)
from .base import (
    Input,
    Stage,
    StageContext,
    _target_input,
    placed,
    placement_extra,
    register,
)


@register
class SpecdecBench(Stage):
    """soaes-specdec's benchmark of the trained target with the distilled draft (every n and mode, plain in both
    dtypes, prompt lookup) and with the undistilled draft (greedy, n=3), plus a token-exactness check."""

    name = "specdec_bench"
    weight = 2.0

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [_target_input(recipe), Input("drafts", "distill_draft", "distill_draft", None),
                Input("prompts", "teacher_data", "teacher_data", None, "heldout_prompts.jsonl")]

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, **placement_extra(recipe, self.name, dtype=False)}  # dtype: the section's own

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        import json

        from soaes_specdec.bench import BenchConfig, run_benchmark

        r, s = ctx.recipe, ctx.recipe.specdec_bench
        target, drafts_dir, prompts = (ctx.spec(i) for i in self.inputs(r))
        drafts = json.loads((Path(drafts_dir) / "drafts.json").read_text(encoding="utf-8"))

        def draft_path(key: str) -> str:
            d = str(drafts[key]["dir"])
            return d if is_model_spec(d) or os.path.isabs(d) else str(Path(drafts_dir) / d)

        common = {"target": target, "prompts": prompts, "max_prompts": s.max_prompts,
                  "max_new_tokens": s.max_new_tokens, "repeats": s.repeats, "warmup": s.warmup, "dtype": s.dtype,
                  "reference_dtype": s.reference_dtype, "seed": r.seed, "sampling_seeds": s.sampling_seeds,
                  "prepack": s.prepack}
        counts: dict[str, Any] = {}
        lookup = {"lookup_tokens": s.lookup_tokens, "lookup_min_ngram": s.lookup_min_ngram,
                  "lookup_extend": s.lookup_extend, "lookup_mix": s.lookup_mix} if s.lookup_tokens else {}
        jobs = [("distilled", BenchConfig(draft=draft_path("distilled"), modes=list(s.modes),
                                          num_speculative_tokens=list(s.num_speculative_tokens),
                                          methods=["plain", "prompt_lookup", "speculative"]
                                          + (["speculative_lookup"] if lookup else []), **lookup, **common)),
                ("undistilled", BenchConfig(draft=draft_path("undistilled"), modes=["greedy"],
                                            num_speculative_tokens=[3], methods=["plain", "speculative"], **common))]
        jobs += [(key, BenchConfig(draft=draft_path(key), modes=["greedy"], num_speculative_tokens=[3],
                                   methods=["plain", "speculative"], **common))
                 for key in drafts if key.startswith("sweep/")]
        for key, cfg in jobs:
            report = run_benchmark(cfg, out / key)
            counts[key] = {"prompts": report["num_prompts"], "results": len(report["results"])}
            ctx.fail_point(self.name, f"after_{key.replace('/', '_')}")
        counts["exactness"] = _exactness(target, draft_path("distilled"), prompts, s, out / "exactness.json",
                                         placed(r, self.name))
        return counts


def _exactness(target_spec: str, draft_spec: str, prompts: str, s: Any, path: Path,
               placement: ResolvedPlacement) -> dict[str, Any]:
    """Greedy speculative output == plain greedy output, token for token, in fp32 (and in the bench dtype), on the
    placement's device."""
    import torch

    from soaes_core import atomic_write_json, load_model, load_tokenizer
    from soaes_specdec import SpeculativeDecoder, autoregressive_generate
    from soaes_specdec.bench import load_prompts
    from soaes_specdec.draft import load_any_draft

    tok = load_tokenizer(target_spec)
    ids = load_prompts(prompts, tok, s.exactness_prompts)
    result: dict[str, Any] = {"prompts": len(ids), "max_new_tokens": s.max_new_tokens, "n": 3}
    for dtype in dict.fromkeys(["float32", s.dtype]):
        target = load_model(target_spec, **{**placement.load_kwargs(), "dtype": dtype}).eval()
        draft = load_any_draft(draft_spec, dtype=dtype, device=placement.device)
        dec = SpeculativeDecoder(target, draft, num_speculative_tokens=3)
        same = 0
        for p in ids:
            p = (p.unsqueeze(0) if p.dim() == 1 else p).to(input_device(target))
            kw = {"max_new_tokens": s.max_new_tokens, "eos_token_id": tok.eos_token_id}
            plain = autoregressive_generate(target, p, **kw).sequences
            same += int(torch.equal(plain, dec.generate(p, **kw).sequences))
        result[dtype] = {"identical": same, "exact": same == len(ids)}
    result["exact"] = result["float32"]["exact"]
    atomic_write_json(path, result)
    return {"prompts": len(ids), "exact_fp32": result["exact"]}


@register
class Export(Stage):
    """The serving hand-off (soaes-specdec `export_for_vllm`): `serve/draft/`, the distilled draft as a full-head HF
    directory with the target's tokenizer, and `serve/vllm_serve.sh` + `serve/README.md` with the exact
    `vllm serve TARGET --speculative-config ...` command for the trained target (absolute paths of this run), and
    `serve/soaes_serve.sh` (`soaes serve`). An engine-layout feature draft is also exported as vLLM's and SGLang's
    EAGLE drafts (`serve/vllm-eagle/`, `serve/sglang-eagle/`, each with its README and serve command)."""

    name = "export"
    SOAES_SERVE_SCRIPT: ClassVar[str] = "soaes_serve.sh"
    weight = 0.5

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [_target_input(recipe), Input("drafts", "distill_draft", "distill_draft", None),
                Input("bench", "specdec_bench", "specdec_bench", None, "distilled/bench.json", required=False)]

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_core.atomic import atomic_write_text
        from soaes_specdec.eagle_export import export_eagle
        from soaes_specdec.export import best_num_speculative_tokens, export_for_vllm
        from soaes_specdec.feature_draft import feature_draft_layout

        from ..serve import serve_command

        r, s = ctx.recipe, ctx.recipe.export
        target_in, drafts_in, bench_in = self.inputs(r)
        drafts_dir = ctx.path(drafts_in)
        drafts = json.loads((drafts_dir / "drafts.json").read_text(encoding="utf-8"))
        if s.draft not in drafts:
            raise ConfigError(f"{r.source}: export.draft: no draft {s.draft!r} in {drafts_dir / 'drafts.json'} "
                              f"(drafts: {', '.join(drafts)})")
        d = str(drafts[s.draft]["dir"])
        draft = d if is_model_spec(d) or os.path.isabs(d) else str(drafts_dir / d)
        n, n_from = s.num_speculative_tokens, "export.num_speculative_tokens"
        bench = ctx.resolve(bench_in)
        if n is None and bench is not None and Path(bench).is_file():
            n, n_from = best_num_speculative_tokens(json.loads(Path(bench).read_text(encoding="utf-8"))), "bench"
        if n is None:
            n, n_from = r.specdec_bench.num_speculative_tokens[0], "specdec_bench.num_speculative_tokens[0]"
        served = ctx.stage_dir(self.name).resolve() / "serve"
        res = export_for_vllm(draft, out / "serve", ctx.spec(target_in), n, final_dir=served)
        soaes_serve = serve_command(str(res.target_dir), str(res.draft_dir), num_speculative_tokens=n,
                                    lookup_tokens=r.specdec_bench.lookup_tokens)
        script = f"#!/usr/bin/env bash\nset -euo pipefail\n{soaes_serve}\n"
        atomic_write_text(out / "serve" / self.SOAES_SERVE_SCRIPT, script)
        engines = {}
        if feature_draft_layout(draft) == "engine":  # vLLM and SGLang load only the engine layout as EAGLE
            for fmt in ("vllm-eagle", "sglang-eagle"):
                engines[fmt] = export_eagle(draft, out / "serve" / fmt, ctx.spec(target_in), fmt, n,
                                            final_dir=served / fmt).serve_command()
        return {"draft": s.draft, "kind": res.kind, "num_speculative_tokens": n, "n_from": n_from,
                "target": str(res.target_dir), "restricted_head_tokens": res.restricted_head_tokens,
                "vllm_serve": res.serve_command(), "soaes_serve": soaes_serve, "engines": engines}


