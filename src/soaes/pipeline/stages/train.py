"""Training stages: CPT, SFT stage 1/2 and the joint-SFT variant, each one call of soaes-train."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

from ..recipe import (
    PipelineRecipe,
)
from .base import (
    MODEL_DIR,
    Input,
    Stage,
    StageContext,
    register,
)


class TrainStage(Stage):
    """A CPT or SFT stage: soaes-train's `train_stage` on packed data, from the parent stage's model."""

    kind: ClassVar[str]
    data_key: ClassVar[str]
    parent: ClassVar[str | None]  # None: the recipe's base target
    resumable = True  # train_stage resumes from its last complete checkpoint
    weight = 3.0

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        s = getattr(recipe, self.name)
        data = Input("data", "pack", f"{self.name}.data", s.data, self.data_key)
        if self.parent is None:
            return [data, Input("model", None, f"{self.name}.model", s.model or recipe.target)]
        return [data, Input("model", self.parent, f"{self.name}.model", s.model, MODEL_DIR)]

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        s = getattr(recipe, self.name)
        return {f"{self.name}.data": s.data, f"{self.name}.model": s.model}

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, "target": recipe.target if self.parent is None else None}

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_train.config import DataConfig, StageConfig
        from soaes_train.trainer import train_stage

        r, s = ctx.recipe, getattr(ctx.recipe, self.name)
        ins = self.inputs(r)
        spec = ctx.spec(ins[1])
        cfg = StageConfig(name=self.name, kind=self.kind,  # type: ignore[arg-type]
                          data=DataConfig(paths=[str(ctx.path(ins[0]))], format="packed", max_length=s.max_length),
                          train=s.train)
        ctx.fail_point(self.name, "before_train")
        result = train_stage(cfg, spec, out, parent={"stage": self.parent or "base", "spec": spec})
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: the model is the output
        return {"model": MODEL_DIR, "metrics": result.metrics, "data": result.counts,
                "resumed_from": result.resumed_from}


@register
class Cpt(TrainStage):
    name, kind, data_key, parent = "cpt", "cpt", "cpt", None


@register
class SftStage1(TrainStage):
    name, kind, data_key, parent = "sft_stage1", "sft", "sft_stage1", "cpt"


@register
class SftStage2(TrainStage):
    name, kind, data_key, parent = "sft_stage2", "sft", "sft_stage2", "sft_stage1"


@register
class SftStage2Only(TrainStage):
    """Table 2's ablation: stage-2 SFT straight after CPT, without stage 1."""

    name, kind, data_key, parent = "sft_stage2_only", "sft", "sft_stage2", "cpt"


