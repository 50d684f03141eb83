"""lm-eval task configs shipped with soaes-eval (register with ``TaskManager(include_path=TASKS_DIR)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .loaders import SAMPLES_DIR

TASKS_DIR = Path(__file__).resolve().parent
TASK_NAMES = ("soaes_cmmlu", "soaes_ceval", "soaes_domain_qa", "soaes_domain_report")

__all__ = ["SAMPLES_DIR", "TASKS_DIR", "TASK_NAMES", "task_manager"]


def task_manager(data_dir: str | Path | None = None, **dirs: str | Path) -> Any:
    """An lm-eval ``TaskManager`` that knows the soaes tasks, with data directories passed as task metadata.

    ``data_dir`` holds ``cmmlu/``, ``ceval/``, ``domain/``; ``cmmlu_dir=`` / ``ceval_dir=`` / ``domain_dir=`` override.
    """
    from lm_eval.tasks import TaskManager

    metadata: dict[str, Any] = {k: str(v) for k, v in dirs.items() if v is not None}
    if data_dir is not None:
        metadata["data_dir"] = str(data_dir)
    return TaskManager(include_path=str(TASKS_DIR), metadata=metadata)
