"""The host's cost table: ms per forward pass of a `CachedCausalLM` for every projection path at every row count the
decoder can use, and the fastest exact path per row count; measured once per host, torch and model shape, then cached.

Which kernel is fastest depends on the host (one machine streams `weight @ x.T` twice as fast as `F.linear`, another
the opposite; MKL prepacking wins on some and loses 2x on others), so no default is right everywhere: the decoder
measures. `load_or_measure` returns the table from the soaes cache (keyed by CPU model and flags, BLAS, torch version,
threads, dtype and the model's shapes), from a calibration file when one is given, or measures it and caches it.
`CachedCausalLM.apply_cost_table` then runs each row count through its path, and `CostTable.pass_ms` gives the block
policy (`block_policy`) the target's cost of a pass of any row count.

Row counts missing from a table are interpolated linearly between the nearest measured counts of the same path;
above the largest they are extrapolated along the last two points' slope (never falling), below the smallest they
take its value. Only exact paths (`EXACT_PATHS`: fp32 arithmetic, results equal `F.linear` up to float rounding) are
ever chosen; a calibration file may list others (e.g. "bf16 F.linear", bf16 weights), which are shown, never chosen.

A calibration file (YAML or JSON) holds ``ms: {PATH: {ROWS: MS, ...}, ...}``, PATH one of `PATH_ALIASES`' names
(the names `benchmarks/specdec/row_cost.py` writes are accepted, so its JSON output can be given as it is).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soaes_core.atomic import atomic_write_json
from soaes_core.cache import cache_root, file_lock
from soaes_core.config import load_yaml
from soaes_core.errors import ConfigError, InvalidArgumentError

from .block_policy import DEFAULT_N_MAX
from .hostinfo import host_key
from .runner import CachedCausalLM

EXACT_PATHS = ("module", "stream", "prepacked")
"""Paths that may be chosen: fp32 F.linear (the modules' forward), `stream_linear`, MKL-prepacked F.linear."""

PATH_ALIASES = {
    "module": "module", "f.linear": "module", "f_linear": "module", "linear": "module",
    "fp32 f.linear": "module",
    "stream": "stream", "stream_linear": "stream", "fp32 stream_linear": "stream",
    "prepacked": "prepacked", "mkl_prepacked": "prepacked", "mkl prepacked": "prepacked",
    "fp32 mkl prepacked": "prepacked", "fp32 mkl prepacked per row count": "prepacked",
    "bf16": "bf16", "bf16 f.linear": "bf16", "bf16_f_linear": "bf16",
}
"""Accepted path names in a calibration file (case-insensitive) -> the table's path name."""

PREPACK_MIN_GAIN = 0.05
"""Prepacking is chosen only where it is this fraction faster than the best unpacked path: each packed row count
costs a full copy of the weights, and a gain below timing noise is not worth one."""

CACHE_DIR_NAME = "specdec-costs"
FORMAT_VERSION = 1


def _interpolate(points: dict[int, float], rows: int) -> float:
    """`points` (rows -> ms) at `rows`: exact, linear between neighbours, flat below, non-falling slope above."""
    if rows in points:
        return points[rows]
    xs = sorted(points)
    if rows < xs[0]:
        return points[xs[0]]
    if rows > xs[-1]:
        if len(xs) == 1:
            return points[xs[0]]
        x0, x1 = xs[-2], xs[-1]
        slope = max(0.0, (points[x1] - points[x0]) / (x1 - x0))
        return points[x1] + slope * (rows - x1)
    hi = next(x for x in xs if x > rows)
    lo = max(x for x in xs if x < rows)
    return points[lo] + (points[hi] - points[lo]) * (rows - lo) / (hi - lo)


@dataclass
class CostTable:
    """ms per forward pass, by path and row count (`ms[path][rows]`), with where it came from and what it is keyed
    by. JSON-serialisable through `to_dict` / `from_dict`."""

    ms: dict[str, dict[int, float]]
    source: str = "measured"
    key: dict[str, Any] = field(default_factory=dict)
    _memo: dict[Any, tuple[str, float]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def rows(self) -> list[int]:
        """Every row count some path was measured at."""
        return sorted({r for points in self.ms.values() for r in points})

    def exact_paths(self, allowed: Iterable[str] | None = None) -> list[str]:
        """The table's paths that may be chosen (exact, and in `allowed` when given)."""
        ok = set(EXACT_PATHS if allowed is None else allowed) & set(EXACT_PATHS)
        return [p for p in EXACT_PATHS if p in ok and self.ms.get(p)]

    def ms_at(self, path: str, rows: int) -> float:
        """ms of one pass of `rows` rows through `path` (interpolated where not measured: module docstring)."""
        if not self.ms.get(path):
            raise InvalidArgumentError(f"the cost table has no timings for path {path!r}")
        return _interpolate(self.ms[path], rows)

    def _best(self, rows: int, allowed: Iterable[str] | None) -> tuple[str, float]:
        """(path, ms) of `path_for`, memoised: the policy asks for the same row counts every step."""
        allowed = None if allowed is None else tuple(allowed)
        memo_key = (rows, allowed)
        if memo_key not in self._memo:
            path = self._fastest(rows, allowed)
            self._memo[memo_key] = (path, self.ms_at(path, rows))
        return self._memo[memo_key]

    def path_for(self, rows: int, allowed: Iterable[str] | None = None) -> str:
        """The fastest exact path for a pass of `rows` rows, among `allowed` (default: every exact path); prepacked
        only where it beats the best unpacked path by `PREPACK_MIN_GAIN`."""
        return self._best(rows, allowed)[0]

    def _fastest(self, rows: int, allowed: Iterable[str] | None = None) -> str:
        """`path_for`, not memoised; ties go to the earlier path in `EXACT_PATHS`."""
        paths = self.exact_paths(allowed)
        if not paths:
            raise InvalidArgumentError(f"the cost table ({self.source}) has no exact path among "
                                       f"{sorted(allowed) if allowed is not None else EXACT_PATHS}")

        def rank(p: str) -> tuple[float, int]:
            ms = self.ms_at(p, rows)
            return (ms / (1.0 - PREPACK_MIN_GAIN) if p == "prepacked" else ms), EXACT_PATHS.index(p)

        return min(paths, key=rank)

    def pass_ms(self, rows: int, allowed: Iterable[str] | None = None) -> float:
        """ms of one pass of `rows` rows through its fastest exact path (what the block-size policy wants)."""
        return self._best(rows, allowed)[1]

    @property
    def choice(self) -> dict[int, str]:
        """The chosen path for every row count from 1 to the largest measured one."""
        return {r: self.path_for(r) for r in range(1, max(self.rows, default=0) + 1)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (row counts as string keys), with the choice per row count."""
        return {"format": FORMAT_VERSION, "source": self.source, "key": self.key,
                "ms": {p: {str(r): round(v, 4) for r, v in sorted(points.items())} for p, points in self.ms.items()},
                "choice": {str(r): p for r, p in self.choice.items()} if self.exact_paths() else {}}

    @classmethod
    def from_dict(cls, data: Any, source: str = "<cost table>") -> CostTable:
        """A table from `to_dict`'s output or a calibration file's content; one-line `ConfigError`s name `source`
        and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping with an 'ms' field, got {type(data).__name__}")
        raw = data.get("ms")
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{source}: field 'ms': expected a mapping of path -> {{rows: ms}}, got "
                              f"{type(raw).__name__ if raw is not None else 'nothing'}")
        ms: dict[str, dict[int, float]] = {}
        for name, points in raw.items():
            where = f"{source}: field 'ms.{name}'"
            path = PATH_ALIASES.get(str(name).strip().lower())
            if path is None:
                raise ConfigError(f"{where}: unknown path; expected module (F.linear), stream (stream_linear), "
                                  "prepacked (MKL prepacked) or bf16 (bf16 F.linear)")
            if path in ms:
                raise ConfigError(f"{where}: path {path!r} given twice")
            if not isinstance(points, dict) or not points:
                raise ConfigError(f"{where}: expected a mapping of rows -> ms, got {type(points).__name__}")
            ms[path] = {}
            for rows, value in points.items():
                here = f"{source}: field 'ms.{name}.{rows}'"
                try:
                    r = int(str(rows))
                except ValueError:
                    raise ConfigError(f"{here}: row count must be an integer >= 1") from None
                if r < 1:
                    raise ConfigError(f"{here}: row count must be an integer >= 1")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                    raise ConfigError(f"{here}: expected a time in ms > 0, got {value!r}")
                ms[path][r] = float(value)
        if not any(ms.get(p) for p in EXACT_PATHS):
            raise ConfigError(f"{source}: field 'ms': no exact path ({', '.join(EXACT_PATHS)}); "
                              "a table with only inexact paths cannot choose a kernel")
        key = data.get("key") if isinstance(data.get("key"), dict) else {}
        return cls(ms=ms, source=str(data.get("source") or source), key=key)

    def format(self) -> str:
        """The table as markdown: ms per pass by path and row count, and the chosen path per row count."""
        rows = self.rows
        lines = ["| path | " + " | ".join(f"{r} rows" for r in rows) + " |", "| --- |" + " ---: |" * len(rows)]
        for path, points in self.ms.items():
            tag = "" if path in EXACT_PATHS else " (not exact: never chosen)"
            lines.append(f"| {path}{tag} | " + " | ".join(f"{points[r]:.2f}" if r in points else "-" for r in rows)
                         + " |")
        lines.append("| **chosen** | " + " | ".join(self.path_for(r) for r in rows) + " |")
        lines.append("\npath per row count (interpolated where not measured): "
                     + ", ".join(f"{r}: {p}" for r, p in self.choice.items()))
        return "\n".join(lines)


def load_calibration_file(path: str | os.PathLike[str]) -> CostTable:
    """A `CostTable` from a YAML/JSON calibration file (`ms: {PATH: {ROWS: MS}}`), validated field by field."""
    data = load_yaml(path)
    table = CostTable.from_dict(data, source=str(path))
    table.source = f"file:{path}"
    return table


def shape_key(runner: CachedCausalLM) -> dict[str, Any]:
    """What a pass's cost depends on in the model: layer count, the projections' and head's shapes, dtype, device."""
    shapes: dict[str, int] = {}
    for m in runner._projections():
        k = "x".join(map(str, m.weight.shape))
        shapes[k] = shapes.get(k, 0) + 1
    head = getattr(runner.head, "weight", None)
    return {"layers": len(runner.layers), "projections": dict(sorted(shapes.items())),
            "head": [type(runner.head).__name__, list(head.shape) if head is not None else None],
            "heads": [runner.num_heads, runner.num_kv_heads, runner.head_dim],
            "dtype": str(runner.dtype), "device": runner.device.type, "batch_invariant": runner.batch_invariant}


def table_key(runner: CachedCausalLM) -> dict[str, Any]:
    """The cache key of `runner`'s table on this host: `hostinfo.host_key()` plus `shape_key(runner)`."""
    return {"host": host_key(), "model": shape_key(runner), "format": FORMAT_VERSION}


def default_rows(batch: int = 1, n_max: int = DEFAULT_N_MAX) -> list[int]:
    """Every row count a decoder with blocks of up to n_max drafts uses for `batch` rows: 1..batch*(n_max+1)."""
    return list(range(1, batch * (n_max + 1) + 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_cost_table(runner: CachedCausalLM, rows: Sequence[int], passes: int = 3, context: int = 64) -> CostTable:
    """Time one forward pass (logits at every row, as a verify) of each row count in `rows` through every path
    available to `runner`, at `context` cached tokens: the best of `passes` interleaved passes after a warm-up.
    Resets the runner's cache and leaves no packed copy behind (apply the table to pack)."""
    wanted = sorted({int(r) for r in rows})
    if not wanted or wanted[0] < 1:
        raise InvalidArgumentError(f"cost-table rows must be integers >= 1, got {list(rows)}")
    if passes < 1:
        raise InvalidArgumentError(f"passes must be >= 1, got {passes}")
    saved = (dict(runner._row_paths), dict(runner._packs), dict(runner._pad_to), runner.cost_table)
    runner._pad_to.clear()
    capacity = context + wanted[-1] + 1
    if runner.max_positions:
        context = max(0, min(context, runner.max_positions - wanted[-1] - 1))
        capacity = context + wanted[-1] + 1
    runner.start(1, capacity)
    gen = torch.Generator().manual_seed(0)
    if context:  # real keys and values to attend to, as in decoding
        prompt = torch.randint(0, runner.vocab_size, (1, context), generator=gen).to(runner.device)
        runner.forward(prompt, torch.zeros(1, dtype=torch.long, device=runner.device), need_logits=False)
    runner.cache.set_lengths(torch.tensor([context], device=runner.device))
    ms: dict[str, dict[int, float]] = {}
    try:
        for r in wanted:
            tokens = torch.randint(0, runner.vocab_size, (1, r), generator=gen).to(runner.device)
            starts = torch.tensor([context], device=runner.device)
            paths = runner.available_paths(r)
            if "prepacked" in paths:
                runner._pack(r)
            best = {p: float("inf") for p in paths}
            for i in range(passes + 1):  # pass 0 warms every path up and is not counted
                for p in paths:
                    runner._row_paths[r] = p
                    _sync(runner.device)
                    t0 = time.perf_counter()
                    runner.forward(tokens, starts)
                    _sync(runner.device)
                    if i:
                        best[p] = min(best[p], (time.perf_counter() - t0) * 1e3)
            for p, v in best.items():
                ms.setdefault(p, {})[r] = round(v, 4)  # as cached: a reloaded table equals this one
            runner._packs.pop(r, None)
    finally:
        runner._row_paths, runner._packs, runner._pad_to, runner.cost_table = saved
        runner.cache.reset()
    return CostTable(ms=ms, source="measured", key=table_key(runner))


def cost_table_path(runner: CachedCausalLM, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where `runner`'s table for this host is cached: `<soaes cache>/specdec-costs/<key digest>.json`."""
    digest = hashlib.sha256(json.dumps(table_key(runner), sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / CACHE_DIR_NAME
    return root / f"{digest}.json"


def _read_cached(path: Path, key: dict[str, Any]) -> CostTable | None:
    """The cached table at `path` when it exists, parses, and was measured under `key`; else None (re-measure)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        table = CostTable.from_dict(data, source=str(path))
    except (OSError, ValueError):  # absent, or a damaged entry: measured again and rewritten
        return None
    return table if table.key == key else None


def load_or_measure(runner: CachedCausalLM, rows: Sequence[int] | None = None, passes: int = 3,
                    calibration_file: str | os.PathLike[str] | None = None,
                    cache_dir: str | os.PathLike[str] | None = None, refresh: bool = False) -> CostTable:
    """`runner`'s cost table for `rows` (default `default_rows()`): the calibration file's when one is given, else the
    cached one when it covers `rows`, else measured (over the union with the cached rows) and cached atomically.
    `cache_dir` replaces `<soaes cache>/specdec-costs`; `refresh` measures even when a cached table exists."""
    if calibration_file is not None:
        return load_calibration_file(calibration_file)
    wanted = sorted({int(r) for r in (default_rows() if rows is None else rows)})
    key = table_key(runner)
    path = cost_table_path(runner, cache_dir)
    with file_lock(path.with_suffix(".lock")):
        cached = None if refresh else _read_cached(path, key)
        if cached is not None and set(wanted) <= set(cached.rows):
            cached.source = "cache"
            return cached
        if cached is not None:
            wanted = sorted(set(wanted) | set(cached.rows))
        table = measure_cost_table(runner, wanted, passes)
        atomic_write_json(path, table.to_dict())
    return table
