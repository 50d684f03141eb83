"""The pipeline's stages: one small class each, registered in `STAGES` in run order; each calls package APIs.

A stage declares its inputs (an upstream stage's output, or an explicit path from the recipe), the recipe section
that configures it, and `run(ctx, out)`, which writes everything into `out` and returns counts for the manifest.
The runner (`runner.py`) decides whether a stage runs, and makes its output appear atomically.
"""

from __future__ import annotations

# isort: off
# importing registers the stages, in run order: this import order is the pipeline's stage order
from . import data, train, distill, specdec, variants, draft_bench, eval, paper, report  # noqa: F401
# isort: on

from .base import (
    FAIL_ENV,
    MODEL_DIR,
    PAUSE_ENV,
    STAGES,
    InjectedFailure,
    Input,
    Stage,
    StageContext,
    load_placed_model,
    placed,
    placement_extra,
    register,
    stage_dirname,
)
from .distill import sweep_slug
from .eval import Eval
from .specdec import Export, SpecdecBench

STAGE_ORDER = tuple(STAGES)  # every stage, in run order: read off the registry

__all__ = ["FAIL_ENV", "MODEL_DIR", "PAUSE_ENV", "STAGES", "STAGE_ORDER", "Eval", "Export", "InjectedFailure",
           "Input", "SpecdecBench", "Stage", "StageContext", "load_placed_model", "placed", "placement_extra",
           "register", "stage_dirname", "sweep_slug"]
