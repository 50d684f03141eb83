"""Stage times measured on this machine, kept across runs and run folders: what the pipeline's ETA is made of.

A stage's time is recorded under its name and config fingerprint (`<stage>:<config_sha256>`, the same for the same
settings in any run folder), so a stage that ran before with these settings is expected to take what it took then.
A stage never measured with its settings is estimated from its weight and the rate (seconds per weight) measured so
far in this run. Kept in `<soaes cache>/pipeline_timings.json`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from soaes_core.atomic import atomic_write_json
from soaes_core.cache import cache_root, file_lock

HISTORY_FILE = "pipeline_timings.json"
KEEP = 5  # the last measurements kept per stage and config
MAX_KEYS = 1000  # stage-and-config keys kept (the oldest written are dropped)
DEFAULT_SECONDS_PER_WEIGHT = 30.0  # before anything in this run has been measured


def history_path() -> Path:
    return cache_root() / HISTORY_FILE


@dataclass
class StageTimes:
    """Measured seconds per `<stage>:<config_sha256>` (the last `KEEP` each)."""

    path: Path | None = None
    seconds: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None) -> StageTimes:
        """The history at `path` (default: the user cache); an unreadable one counts as empty."""
        path = history_path() if path is None else path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        ok = {k: [float(x) for x in v if isinstance(x, (int, float))] for k, v in data.items() if isinstance(v, list)} \
            if isinstance(data, dict) else {}
        return cls(path, ok)

    def measured(self, stage: str, config_sha256: str) -> float | None:
        """The median of the recorded times of `stage` with this config, or None when it never ran with it."""
        times = self.seconds.get(f"{stage}:{config_sha256}")
        return statistics.median(times) if times else None

    def record(self, stage: str, config_sha256: str, seconds: float) -> None:
        """Add a measurement and write the history (merged with what other runs wrote meanwhile)."""
        key = f"{stage}:{config_sha256}"
        if self.path is None:
            self.seconds[key] = [*self.seconds.get(key, []), round(seconds, 3)][-KEEP:]
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(self.path.with_suffix(".lock")):
                self.seconds = {**self.seconds, **StageTimes.load(self.path).seconds}
                times = [*self.seconds.pop(key, []), round(seconds, 3)][-KEEP:]
                kept = list(self.seconds.items())[-(MAX_KEYS - 1):]
                self.seconds = {**dict(kept), key: times}  # the key just written is the newest
                atomic_write_json(self.path, self.seconds)
        except OSError:  # a read-only cache costs the estimate, never the run
            pass


def estimate_stage(measured: float | None, weight: float, rate: float | None) -> float:
    """Expected seconds of a stage: its measured time with these settings, else weight × this run's rate."""
    if measured is not None:
        return measured
    return weight * (rate if rate is not None else DEFAULT_SECONDS_PER_WEIGHT)


def run_rate(done: list[tuple[float, float, float | None]]) -> float | None:
    """Seconds per weight in this run, from (seconds, weight, measured before) of the stages that ran: only those
    never measured before count (a measured stage says nothing about weights); None before there is one."""
    fresh = [(s, w) for s, w, m in done if m is None]
    if fresh:
        return sum(s for s, _ in fresh) / sum(w for _, w in fresh)
    return None
