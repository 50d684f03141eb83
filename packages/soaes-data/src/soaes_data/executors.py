"""Where a curation phase runs: datatrove's `LocalPipelineExecutor` (processes on this machine),
`SlurmPipelineExecutor` (a job array per phase, chained by dependencies) or `RayPipelineExecutor` (tasks on a
Ray cluster). The executors are datatrove's own; this module only maps the recipe's `executor`, `tasks`,
`workers` and `engine` options onto them and keeps datatrove's console logging quiet (its per-task log
files under each phase's `logs/` are unchanged)."""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from soaes_core.errors import ConfigError

ExecutorKind = Literal["local", "slurm", "ray"]
_LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"
_console_level = "WARNING"


def _task_logger(logging_dir: Any, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
    """datatrove's `add_task_logger`, with the console at `_console_level` instead of INFO."""
    from loguru import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    prefix = f"[NODE {node_rank}] " if node_rank != -1 else ""
    logger.add(sys.stderr, level=_console_level, format=prefix + _LOG_FORMAT)
    logger.add(logfile, level="DEBUG", format=prefix + _LOG_FORMAT)
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def _default_logger() -> None:
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=_console_level, format=_LOG_FORMAT)


def quiet_datatrove_logs(level: str = "WARNING") -> None:
    """Route datatrove's console logging through `level` (its task log files keep everything)."""
    global _console_level
    _console_level = level
    import datatrove.executor.base as base
    import datatrove.executor.ray as ray_executor
    import datatrove.utils.logging as dt_logging
    from loguru._better_exceptions import ExceptionFormatter

    if not hasattr(ExceptionFormatter._get_lib_dirs, "cache_info"):
        # loguru scans sysconfig on every handler added (~40 ms); datatrove adds handlers for every task
        ExceptionFormatter._get_lib_dirs = staticmethod(functools.lru_cache(maxsize=1)(  # type: ignore[method-assign]
            ExceptionFormatter._get_lib_dirs))
    base.add_task_logger = _task_logger  # type: ignore[assignment]
    ray_executor.add_task_logger = _task_logger  # type: ignore[assignment]
    dt_logging.setup_default_logger = _default_logger  # type: ignore[assignment]
    _default_logger()


def _local_executor_class() -> type:
    from copy import deepcopy

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.utils.stats import PipelineStats

    class SerialLocalExecutor(LocalPipelineExecutor):  # type: ignore[misc]
        """datatrove's local executor; with one worker it runs the tasks in this process without starting
        the multiprocessing manager (a server process per phase) that datatrove starts even then."""

        def run(self) -> Any:
            if self.workers != 1 or self.depends:
                return super().run()
            self._launched = True
            ranks = self.get_incomplete_ranks(range(self.local_rank_offset, self.local_rank_offset + self.local_tasks))
            if not ranks:
                return None
            self.save_executor_as_json()
            pipeline, stats = self.pipeline, PipelineStats()
            for rank in ranks:
                self.pipeline = deepcopy(pipeline)
                stats += self._run_for_rank(rank, 0)
            self.pipeline = pipeline
            with self.logging_dir.open("stats.json", "wt") as fh:
                stats.save_to_disk(fh)
            return stats

    return SerialLocalExecutor


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc `malloc_trim`) after a phase that ran in this
    process, so the next phases, and the workers forked for them, do not carry them; a no-op elsewhere."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def make_executor(kind: ExecutorKind, pipeline: list[Any], *, tasks: int, workers: int, logging_dir: Path,
                  engine: dict[str, Any], job_name: str, depends: Any = None) -> Any:
    """A datatrove executor of `kind` for one phase. `engine` holds the engine's own options (passed through:
    e.g. Slurm `partition`, `time`, `cpus_per_task`, `sbatch_args`, `venv_path`; Ray `cpus_per_task`,
    `mem_per_cpu_gb`; local `start_method`)."""
    opts = {k: v for k, v in engine.items() if k != "address"}
    try:
        if kind == "local":
            if sys.platform == "linux":
                opts.setdefault("start_method", "fork")  # workers inherit the imported modules (forkserver re-imports)
            return _local_executor_class()(pipeline, tasks=tasks, workers=max(1, min(workers, tasks)),
                                         logging_dir=str(logging_dir), **opts)
        if kind == "ray":
            from datatrove.executor.ray import RayPipelineExecutor

            opts.setdefault("mem_per_cpu_gb", 1)
            return RayPipelineExecutor(pipeline, tasks=tasks, workers=max(1, min(workers, tasks)),
                                       logging_dir=str(logging_dir), **opts)
        if kind == "slurm":
            from datatrove.executor.slurm import SlurmPipelineExecutor

            missing = [k for k in ("partition", "time") if k not in opts]
            if missing:
                raise ConfigError(f"executor slurm needs engine options {missing} (e.g. engine: {{partition: cpu, "
                                  "time: '4:00:00'}})")
            return SlurmPipelineExecutor(pipeline, tasks=tasks, workers=workers if workers > 1 else -1,
                                         logging_dir=str(logging_dir), job_name=job_name, depends=depends, **opts)
    except TypeError as err:  # an engine option the executor does not know
        raise ConfigError(f"engine options for executor {kind}: {err}") from None
    raise ConfigError(f"unknown executor {kind!r}; expected local, slurm or ray")


def ensure_ray(engine: dict[str, Any]) -> Callable[[], None]:
    """Connect to Ray unless already connected (`engine.address`, else a local cluster); returns the
    function that undoes what this call started."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor ray needs Ray: pip install 'soaes-data[ray]'") from None
    if ray.is_initialized():
        return lambda: None
    ray.init(address=engine.get("address"), include_dashboard=False, log_to_driver=False)
    return ray.shutdown
