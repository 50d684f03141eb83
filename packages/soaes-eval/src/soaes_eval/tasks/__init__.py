"""lm-eval task configs shipped with soaes-eval (register with ``TaskManager(include_path=TASKS_DIR)``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .loaders import SAMPLES_DIR

TASKS_DIR = Path(__file__).resolve().parent
TASK_NAMES = ("soaes_cmmlu", "soaes_ceval", "soaes_domain_qa", "soaes_domain_qa_heldout", "soaes_domain_report")

__all__ = ["SAMPLES_DIR", "TASKS_DIR", "TASK_NAMES", "task_manager"]


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval warns, once per task, that custom_dataset kwargs come from metadata: that is how we use it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def task_manager(data_dir: str | Path | None = None, include_defaults: bool = False,
                 **dirs: str | Path | None) -> Any:
    """An lm-eval ``TaskManager`` that knows the soaes tasks, with data directories passed as task metadata.

    ``data_dir`` holds ``cmmlu/``, ``ceval/``, ``domain/``; ``cmmlu_dir=`` / ``ceval_dir=`` / ``domain_dir=`` override.
    ``include_defaults`` also indexes lm-eval's ~15k built-in tasks (slow: ~20 s), needed only to mix them in.
    """
    from lm_eval.tasks import TaskManager

    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropCustomDatasetHint) for f in task_logger.filters):
        task_logger.addFilter(_DropCustomDatasetHint())

    metadata: dict[str, Any] = {k: str(v) for k, v in dirs.items() if v is not None}
    if data_dir is not None:
        metadata["data_dir"] = str(data_dir)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults, metadata=metadata)
