"""`manifest.json`: what every stage writes beside its output (inputs, config, counts, versions, checksums,
timings), so a result can be traced and a re-run can tell whether anything changed."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .config import to_dict
from .hashing import sha256_file
from .versions import package_versions

MANIFEST_NAME = "manifest.json"


class Timer:
    """Named wall-clock timings: `with timer("tokenize"): ...` then `timer.timings`."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def describe_inputs(paths: Mapping[str, str | os.PathLike[str]] | None) -> dict[str, Any]:
    """For each named input path: the path and, for files, size and sha256 (directories: their manifest's
    sha256 when they have one)."""
    out: dict[str, Any] = {}
    for name, p in (paths or {}).items():
        p = Path(p)
        entry: dict[str, Any] = {"path": str(p)}
        if p.is_file():
            entry.update(size=p.stat().st_size, sha256=sha256_file(p))
        elif (p / MANIFEST_NAME).is_file():
            entry.update(manifest_sha256=sha256_file(p / MANIFEST_NAME))
        out[name] = entry
    return out


def build_manifest(
    stage: str,
    *,
    output_dir: str | os.PathLike[str],
    inputs: Mapping[str, str | os.PathLike[str]] | None = None,
    config: Any = None,
    counts: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
    checksum_outputs: bool = True,
) -> dict[str, Any]:
    """Assemble the manifest dict; `outputs` lists every file under `output_dir` with size and sha256."""
    output_dir = Path(output_dir)
    outputs: dict[str, Any] = {}
    if checksum_outputs and output_dir.is_dir():
        for p in sorted(output_dir.rglob("*")):
            if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith("."):
                outputs[p.relative_to(output_dir).as_posix()] = {"size": p.stat().st_size,
                                                                 "sha256": sha256_file(p)}
    return {
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "inputs": describe_inputs(inputs),
        "config": to_dict(config) if config is not None else None,
        "counts": dict(counts or {}),
        "outputs": outputs,
        "timings_s": {k: round(v, 4) for k, v in (timings or {}).items()},
        "versions": {k: v for k, v in package_versions().items() if v is not None},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **dict(extra or {}),
    }


def write_manifest(output_dir: str | os.PathLike[str], stage: str, **kwargs: Any) -> Path:
    """Build and atomically write `output_dir/manifest.json`; returns its path."""
    manifest = build_manifest(stage, output_dir=output_dir, **kwargs)
    return atomic_write_json(Path(output_dir) / MANIFEST_NAME, manifest)


def read_manifest(output_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest in `output_dir`, or None when there is none."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def verify_outputs(output_dir: str | os.PathLike[str]) -> list[str]:
    """Names of outputs whose size or sha256 no longer match the manifest (empty list: all intact)."""
    manifest = read_manifest(output_dir)
    if manifest is None:
        return ["manifest.json (missing)"]
    bad = []
    for rel, meta in manifest.get("outputs", {}).items():
        p = Path(output_dir) / rel
        if not p.is_file() or p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            bad.append(rel)
    return bad
