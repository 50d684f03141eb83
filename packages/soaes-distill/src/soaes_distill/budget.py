"""Step budgets with a wall-clock safety cap: why a training run stopped, in a field and in plain words.

Runs train to a number of steps (or epochs), so the same command gives the same model on any machine. A time
budget only caps a run that would take too long; when it ends a run early, `StopInfo` says so
(`stopped_by: "time_budget"`) for manifests and reports.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from transformers import TrainerCallback

STOP_REASONS = ("max_steps", "epochs", "time_budget", "early_stopping", "data")


@dataclass(frozen=True)
class StopInfo:
    """Why training ended (one of `STOP_REASONS`) and a sentence a report can print as it is."""

    stopped_by: str
    stop_message: str
    steps: int
    planned_steps: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stop_info(stopped_by: str, steps: int, planned_steps: int | None, elapsed_s: float = 0.0,
              time_budget_s: float = 0.0) -> StopInfo:
    """The `StopInfo` of a run that took `steps` of `planned_steps` optimizer steps in `elapsed_s` seconds."""
    if stopped_by not in STOP_REASONS:
        raise ValueError(f"stopped_by must be one of {', '.join(STOP_REASONS)}, got {stopped_by!r}")
    plan = f" of the planned {planned_steps}" if planned_steps else ""
    if stopped_by == "time_budget":
        message = (f"stopped by the time budget ({time_budget_s:g} s) after {steps}{plan} steps "
                   f"({elapsed_s:.0f} s of training): the model is under-trained; raise time_budget_s or lower "
                   "the steps")
    elif stopped_by == "early_stopping":
        message = f"stopped early after {steps}{plan} steps: the evaluation metric stopped improving"
    elif stopped_by == "epochs":
        message = f"trained the planned epochs ({steps} steps)"
    elif stopped_by == "data":
        message = f"stopped after {steps}{plan} steps: the data ran out"
    else:
        message = f"trained the planned {steps} steps"
    return StopInfo(stopped_by, message, steps, planned_steps)


class TimeBudgetCallback(TrainerCallback):
    """Stops a `transformers.Trainer` once `budget_s` seconds of training have passed (0 = no cap); `hit` records
    whether it did. The clock restarts when a killed run resumes: the cap bounds each process's run."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = float(budget_s)
        self.hit = False
        self._start: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.budget_s > 0 and self._start is not None and time.perf_counter() - self._start >= self.budget_s:
            if state.max_steps and state.global_step < state.max_steps:
                self.hit = True
            control.should_training_stop = True
