"""The report stage: the paper's tables regenerated from the run's manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..recipe import (
    PipelineRecipe,
)
from .base import (
    Input,
    Stage,
    StageContext,
    register,
)


@register
class Report(Stage):
    """report.md, CSV and PNG tables shaped like the paper's, from the run's manifests (`..paper_tables`)."""

    name = "report"

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [Input(n, n, "stages", None, required=False) for n in recipe.stages if n != "report"]

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from ..paper_tables import write_run_report

        written = write_run_report(ctx.run_dir, out, recipe_name=ctx.recipe.name, final_dir=ctx.stage_dir(self.name))
        return {"tables": written["tables"], "files": len(written["files"])}
