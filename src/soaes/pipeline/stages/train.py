"""Training stages: CPT, SFT stage 1/2 and the joint-SFT variant, each one call of soaes-train.

A stage trains in this process, or (its `launch:` section) runs the soaes-train CLI under torchrun or DeepSpeed's
launcher and reads the manifest back. Either way its checkpoints sit in the kept partial folder, so a rerun after a
kill resumes. Of the launch settings only those that change the result enter the fingerprint: the process count
(the global batch is per-device batch × accumulation × processes, so it sets the data order) and the DeepSpeed
choice; the launcher, ports, hostfile and env do not.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, ClassVar

from soaes_train.launch import LaunchConfig, check_launch, launch_fingerprint

from ..recipe import (
    PipelineRecipe,
    TrainStageSettings,
    resolve_path,
)
from .base import (
    MODEL_DIR,
    Input,
    Stage,
    StageContext,
    register,
)


class TrainStage(Stage):
    """A CPT or SFT stage: soaes-train's `run_job` on packed data, from the parent stage's model."""

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
        return {f"{self.name}.data": s.data, f"{self.name}.model": s.model,
                f"{self.name}.launch.deepspeed_config": s.launch.deepspeed_config,
                f"{self.name}.launch.hostfile": s.launch.hostfile}

    def settings(self, recipe: PipelineRecipe) -> TrainStageSettings:
        """The section without `launch`: what of it changes the result is in `fingerprint_extra`."""
        return dataclasses.replace(super().settings(recipe), launch=LaunchConfig())

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, "target": recipe.target if self.parent is None else None,
                **launch_fingerprint(self.launch(recipe))}

    def launch(self, recipe: PipelineRecipe) -> LaunchConfig:
        """The section's launch settings, its files resolved against the recipe's folder."""
        launch = getattr(recipe, self.name).launch
        files = {k: str(resolve_path(recipe, v)) for k in ("deepspeed_config", "hostfile")
                 if (v := getattr(launch, k)) is not None}
        return dataclasses.replace(launch, **files) if files else launch

    def check(self, ctx: StageContext) -> None:
        check_launch(self.launch(ctx.recipe))

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_train.config import DataConfig, StageConfig, StageJob
        from soaes_train.launch import run_job

        r, s = ctx.recipe, getattr(ctx.recipe, self.name)
        ins = self.inputs(r)
        spec = ctx.spec(ins[1])
        cfg = StageConfig(name=self.name, kind=self.kind,  # type: ignore[arg-type]
                          data=DataConfig(paths=[str(ctx.path(ins[0]))], format="packed", max_length=s.max_length),
                          train=s.train)
        ctx.fail_point(self.name, "before_train")
        launch = self.launch(r)
        job = StageJob(stage=cfg, model=spec, stage_dir=str(out), parent={"stage": self.parent or "base", "spec": spec})
        result = run_job(job, launch)  # in this process, or the soaes-train CLI under the launcher
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: the model is the output
        launched = {} if launch.launcher == "none" else {
            "launch": {"launcher": launch.launcher, "processes": launch.world_size, "log": "train.log"}}
        return {"model": MODEL_DIR, "metrics": result.metrics, "data": result.counts,
                "resumed_from": result.resumed_from, **launched}


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


