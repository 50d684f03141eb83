"""Tables 4-6 as the paper runs them: every draft at top-p 0.7 and n = 3 against plain decoding (soaes-specdec
bench), the distilled draft also over the `specdec_bench` section's modes, n and methods (Tables 5-6).

Beside `specdec_bench` (which times every other draft greedily at n = 3 and checks token exactness), this stage
times each draft of `distill_draft` (undistilled, distilled, α/τ sweep, online) and the general draft of
`general_draft` in the paper's Table 4 setting, with the `specdec_bench` section's other settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..recipe import BenchSettings, PipelineRecipe, package_config
from .base import MODEL_DIR, Input, Stage, StageContext, _target_input, placement_extra, read_drafts, register

TABLE4 = {"modes": ["top_p"], "num_speculative_tokens": [3], "methods": ["plain", "speculative"], "adaptive": False}
GENERAL = "general"  # the general draft's key


@register
class DraftBench(Stage):
    """Each draft at top-p (the section's `top_p`), n = 3, speculative vs plain, the distilled one with the whole
    section: `<key>/bench.json` per draft."""

    name = "draft_bench"
    weight = 3.0

    def settings(self, recipe: PipelineRecipe) -> BenchSettings:
        return dataclasses.replace(recipe.specdec_bench, placement=None)

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [_target_input(recipe), Input("drafts", "distill_draft", "distill_draft", None),
                Input("prompts", "teacher_data", "teacher_data", None, "heldout_prompts.jsonl"),
                Input(GENERAL, "general_draft", "general_draft", None, MODEL_DIR, required=False)]

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, **placement_extra(recipe, "specdec_bench", dtype=False)}

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_specdec.bench import BenchConfig, run_benchmark

        r = ctx.recipe
        target_in, drafts_in, prompts_in, general_in = self.inputs(r)
        drafts = read_drafts(ctx.path(drafts_in))
        if "general_draft" in r.stages:
            drafts = {GENERAL: str(ctx.path(general_in)), **drafts}
        counts: dict[str, Any] = {}
        for key, draft in drafts.items():
            cfg = package_config(r.specdec_bench, BenchConfig, target=ctx.spec(target_in), draft=draft,
                                 prompts=ctx.spec(prompts_in), seed=r.seed, threads=r.threads,
                                 **({} if key == "distilled" else TABLE4))
            report = run_benchmark(cfg, out / key)
            counts[key] = {"prompts": report["num_prompts"], "results": len(report["results"])}
            ctx.fail_point(self.name, f"after_{key.replace('/', '_')}")
        return counts
