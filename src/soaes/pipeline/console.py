"""What `soaes pipeline run` shows: one line per stage (status, time, key counts), a time bar while a long stage
runs on a terminal, and libraries' own warnings and progress bars kept quiet unless asked for (`--verbose`)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import tqdm.std as tqdm_std

from soaes_core.progress import progress_bar

from .runner import StageEvent

LONG_STAGE_S = 20.0  # a stage expected to take longer gets a time bar on a terminal
# loggers whose warnings say nothing a pipeline user can act on (DeepSpeed: "Setting accelerator to CPU")
QUIET_LOGGERS = ("DeepSpeed", "deepspeed", "accelerate", "datasets", "lm-eval", "lm_eval", "datatrove", "torch")
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "SOAES_PROGRESS": "0"}


def fmt_s(seconds: float | None) -> str:
    """`1m05s` / `7s` / `?`."""
    if seconds is None:
        return "?"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def key_counts(counts: dict[str, Any] | None, limit: int = 4) -> str:
    """The stage's counts for its one line: top-level numbers, then the integers one level down (`cpt.rows 12`)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    items = [(k, v) for k, v in (counts or {}).items() if number(v)]
    items += [(f"{k}.{k2}", v2) for k, v in (counts or {}).items() if isinstance(v, dict)
              for k2, v2 in v.items() if isinstance(v2, int) and not isinstance(v2, bool)]
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in items[:limit])


def stage_line(ev: StageEvent) -> str:
    """The one line of a finished or skipped stage: `[i/n] name: status`, then time, why and counts."""
    head = f"[{ev.index}/{ev.total}] {ev.stage}:"
    if ev.kind == "skip":
        return f"{head} up to date"
    counts = key_counts(ev.counts)
    left = "" if not ev.eta_s else f"; about {fmt_s(ev.eta_s)} left"
    return f"{head} ran in {fmt_s(ev.seconds)} ({ev.message})" + (f"; {counts}" if counts else "") + left


class StageDisplay:
    """`on_event` for `run_pipeline`: prints one line per stage through `echo`; while a stage expected to take over
    `LONG_STAGE_S` runs, a bar of elapsed over expected time (terminal only)."""

    def __init__(self, echo: Any, bars: bool | None = None) -> None:
        self.echo = echo
        self.bars = sys.stderr.isatty() if bars is None else bars
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def __call__(self, ev: StageEvent) -> None:
        if ev.kind == "start":
            if self.bars and (ev.stage_eta_s or 0) > LONG_STAGE_S:
                self._start_bar(ev)
            return
        self._stop_bar()
        self.echo(stage_line(ev))

    def _start_bar(self, ev: StageEvent) -> None:
        import time

        total = float(ev.stage_eta_s or 1.0)
        stop = threading.Event()

        def tick() -> None:
            _OWN_BARS.on = True  # this thread's bar is the pipeline's own: not silenced by quiet_libraries
            bar = progress_bar(total=round(total), desc=f"[{ev.index}/{ev.total}] {ev.stage}", unit="s",
                               disable=False)
            bar.leave = False
            t0 = time.monotonic()
            while not stop.wait(1.0):
                bar.n = min(round(time.monotonic() - t0), bar.total - 1)
                bar.refresh()
            bar.close()

        self._stop, self._thread = stop, threading.Thread(target=tick, daemon=True)
        self._thread.start()

    def _stop_bar(self) -> None:
        if self._stop is not None and self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._stop = self._thread = None

    def close(self) -> None:
        self._stop_bar()


@contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Within: libraries' warnings (DeepSpeed, transformers, datasets, lm-eval, Python warnings) and their progress
    bars ("Loading weights") are off, unless `verbose`; everything is restored on exit."""
    if verbose:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    only_errors = _ErrorsOnly()
    loggers = [logging.getLogger(n) for n in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # the level quiets child loggers (lm_eval.evaluator); the filter survives a library's own
        lg.setLevel(logging.ERROR)  # setLevel at import (DeepSpeed's)
        lg.addFilter(only_errors)
    restore = _quiet_hf()
    tqdm_init = tqdm_std.tqdm.__init__

    def quiet_init(self: Any, *args: Any, **kwargs: Any) -> None:  # lm-eval's and datasets' own tqdm bars
        if not getattr(_OWN_BARS, "on", False):
            kwargs["disable"] = True
        tqdm_init(self, *args, **kwargs)

    tqdm_std.tqdm.__init__ = quiet_init  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        tqdm_std.tqdm.__init__ = tqdm_init  # type: ignore[method-assign]
        restore()
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeFilter(only_errors)
            lg.setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_OWN_BARS = threading.local()


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _quiet_hf() -> Any:
    """transformers' (and, when loaded, datasets') verbosity and progress bars off; returns the undo."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets = sys.modules.get("datasets")
    ds_bars = datasets is not None and datasets.is_progress_bar_enabled()
    if datasets is not None:
        datasets.disable_progress_bars()

    def undo() -> None:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            datasets.enable_progress_bars()

    return undo


