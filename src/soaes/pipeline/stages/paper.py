"""The `paper` and `domain-draft` recipes' report stage: their tables with every paper row, intervals and verdicts
(`..paper_report`), beside the generic `report` stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..recipe import PipelineRecipe
from .base import Input, Stage, StageContext, register


@register
class PaperReport(Stage):
    """`paper_report.md` (Tables 1-6, when the recipe evaluates: `eval` in its stages) or `domain-draft_report.md`
    (the domain-draft paper's comparisons, otherwise), with one CSV per table."""

    name = "paper_report"
    weight = 0.5

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [Input(n, n, "stages", None, required=False) for n in recipe.stages if n not in ("report", self.name)]

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from ..paper_report import write_paper_report

        kind = "paper" if "eval" in ctx.recipe.stages else "domain-draft"
        written = write_paper_report(ctx.run_dir, out, kind=kind, final_dir=ctx.stage_dir(self.name))
        return {"kind": kind, "tables": written["tables"], "files": len(written["files"])}
