"""What every stage shares: the `Stage` base class, its inputs and context, and the registry `STAGES`.

A stage declares its inputs (an upstream stage's output, or an explicit path from the recipe), the recipe section
that configures it, and `run(ctx, out)`, which writes everything into `out` and returns counts for the manifest.
The runner (`runner.py`) decides whether a stage runs, and makes its output appear atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from soaes_core.errors import SoaesError
from soaes_core.placement import ResolvedPlacement

from ..recipe import (
    PipelineRecipe,
    is_model_spec,
    model_spec,
    resolve_path,
    stage_placement,
)

FAIL_ENV = "SOAES_PIPELINE_FAIL_AT"  # "STAGE:POINT": raise there (tests of kill-and-rerun)
# "STAGE:POINT=FILE": at that point create FILE.waiting, then wait until FILE exists (tests of concurrent runs)
PAUSE_ENV = "SOAES_PIPELINE_PAUSE_AT"
MODEL_DIR = "model"


class InjectedFailure(SoaesError):
    """Raised at a stage's named point when `SOAES_PIPELINE_FAIL_AT` asks for it (tests of kill-and-rerun)."""


@dataclass
class Input:
    """Something a stage reads: the output of `stage` (under `subpath`), unless the recipe gives `explicit`."""

    name: str
    stage: str | None
    field: str
    explicit: str | None = None
    subpath: str = ""
    required: bool = True


@dataclass
class StageContext:
    """What a running stage may use: the recipe, the run directory and the finished stages' output folders."""

    recipe: PipelineRecipe
    run_dir: Path

    def stage_dir(self, name: str) -> Path:
        """The final output folder of stage `name` (`<run>/stages/<NN>_<name>`)."""
        return self.run_dir / "stages" / stage_dirname(name)

    def resolve(self, inp: Input) -> Path | str | None:
        """Where input `inp` is: an explicit path/model spec, or the upstream stage's output (None if absent)."""
        if inp.explicit is not None:
            if is_model_spec(inp.explicit) or inp.explicit.startswith("gguf:"):
                return model_spec(self.recipe, inp.explicit)
            return resolve_path(self.recipe, inp.explicit)
        if inp.stage is None or inp.stage not in self.recipe.stages:
            return None
        return self.stage_dir(inp.stage) / inp.subpath if inp.subpath else self.stage_dir(inp.stage)

    def path(self, inp: Input) -> Path:
        p = self.resolve(inp)
        if p is None:
            raise SoaesError(f"{self.recipe.source}: {inp.field}: no input for {inp.name!r}")
        return Path(p)

    def spec(self, inp: Input) -> str:
        p = self.resolve(inp)
        if p is None:
            raise SoaesError(f"{self.recipe.source}: {inp.field}: no input for {inp.name!r}")
        return str(p)

    def fail_point(self, stage: str, point: str) -> None:
        """Raise `InjectedFailure` when `SOAES_PIPELINE_FAIL_AT` is `stage:point` (a stand-in for a kill)."""
        if os.environ.get(FAIL_ENV) == f"{stage}:{point}":
            raise InjectedFailure(f"injected failure at {stage}:{point} ({FAIL_ENV})")
        where, sep, gate = os.environ.get(PAUSE_ENV, "").partition("=")
        if sep and where == f"{stage}:{point}":
            import time

            Path(gate + ".waiting").touch()
            deadline = time.monotonic() + 600
            while not Path(gate).exists():
                if time.monotonic() > deadline:
                    raise InjectedFailure(f"paused at {stage}:{point} for 600 s: {gate} never appeared ({PAUSE_ENV})")
                time.sleep(0.05)


def stage_dirname(name: str) -> str:
    """`NN_name`: the stage's place in the registry (run order), then its name."""
    return f"{list(STAGES).index(name) + 1:02d}_{name}"


class Stage:
    """One pipeline stage. `resumable`: its partial output is kept across a kill, because the package it calls
    resumes from it (training checkpoints, dump shards); otherwise a rerun starts from an empty folder."""

    name: ClassVar[str]
    resumable: ClassVar[bool] = False
    weight: ClassVar[float] = 1.0  # relative cost, for the overall ETA before any timing is known

    def settings(self, recipe: PipelineRecipe) -> Any:
        """The recipe section that configures this stage (hashed into its config fingerprint); its `placement` is
        left out: what it resolves to is hashed instead (`placement_extra`)."""
        section = getattr(recipe, self.name, None)
        if getattr(section, "placement", None) is not None:
            section = dataclasses.replace(section, placement=None)
        return section

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        """Recipe values outside the stage's section that change its output."""
        return {"seed": recipe.seed}

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return []

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        """Recipe field → path value that must exist before anything runs."""
        return {}

    def external_files(self, ctx: StageContext) -> dict[str, Path]:
        """Files outside the run that this stage reads (hashed, so an edit reruns the stage)."""
        return {}

    def check(self, ctx: StageContext) -> None:
        """Refuse, before the run creates anything, a setting this stage would fail on."""

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        raise NotImplementedError


STAGES: dict[str, Stage] = {}


def register(cls: type[Stage]) -> type[Stage]:
    STAGES[cls.name] = cls()
    return cls


def placed(recipe: PipelineRecipe, stage: str) -> ResolvedPlacement:
    """Where stage `stage` loads its models on this machine (its placement, resolved)."""
    return stage_placement(recipe, stage).resolve()


def load_placed_model(recipe: PipelineRecipe, stage: str, spec: str) -> Any:
    """Model `spec` loaded where stage `stage` places its models, in eval mode."""
    from soaes_core import load_model

    return load_model(spec, **placed(recipe, stage).load_kwargs()).eval()


def placement_extra(recipe: PipelineRecipe, stage: str, dtype: bool = True) -> dict[str, Any]:
    """The fingerprint entry of a stage's placement: nothing when it resolves to the CPU in float32 (what every stage
    used before placements existed, so those runs stay up to date), else its device type (and dtype)."""
    r = placed(recipe, stage)
    fp = r.fingerprint() if dtype else ({} if r.device_type == "cpu" else {"device": r.device_type})
    return {"placement": fp} if fp else {}


def _target_input(recipe: PipelineRecipe) -> Input:
    """The trained target: sft_stage2's model, or the recipe's `trained_target`."""
    return Input("target", "sft_stage2", "trained_target", recipe.trained_target, MODEL_DIR)


def read_drafts(drafts_dir: Path) -> dict[str, str]:
    """distill_draft's `drafts.json` as {draft key: model spec}: a relative `dir` is under `drafts_dir`."""
    drafts = json.loads((Path(drafts_dir) / "drafts.json").read_text(encoding="utf-8"))
    return {key: d if is_model_spec(d) or os.path.isabs(d) else str(Path(drafts_dir) / d)
            for key, d in ((k, str(v["dir"])) for k, v in drafts.items())}
