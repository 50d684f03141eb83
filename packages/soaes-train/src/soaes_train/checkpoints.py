"""Checkpoint manifests: resuming unpickles a checkpoint (optimizer, scheduler, RNG state, DeepSpeed shards),
so only checkpoints this tool wrote, unchanged since, are ever loaded.

When a checkpoint is complete the trainer writes `.soaes_complete` into it: a JSON manifest with the size and
sha256 of every file. Before resuming, `resumable_checkpoint` picks the newest complete checkpoint and checks
it against that manifest (no file missing, changed or added); anything else is refused with one line.
The manifest guards against foreign, corrupted or swapped-in checkpoints; it is not a signature against
someone who can also rewrite the manifest (keep the output directory writable only by you).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from soaes_core import atomic_write_json
from soaes_core.errors import IntegrityError
from soaes_core.hashing import sha256_file

COMPLETE_MARKER = ".soaes_complete"
MANIFEST_FORMAT = "soaes-checkpoint/1"


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.name != COMPLETE_MARKER and (p.is_file() or p.is_symlink()))


def write_checkpoint_manifest(ckpt: str | os.PathLike[str], global_step: int) -> Path:
    """Record every file of the finished checkpoint `ckpt` (size + sha256) in its `.soaes_complete`."""
    ckpt = Path(ckpt)
    files = {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(ckpt)}
    return atomic_write_json(ckpt / COMPLETE_MARKER, {"format": MANIFEST_FORMAT, "global_step": global_step,
                                                      "files": files})


def checkpoint_problem(ckpt: str | os.PathLike[str]) -> str | None:
    """Why `ckpt` must not be loaded (None when it matches the manifest soaes wrote into it)."""
    ckpt = Path(ckpt)
    try:
        manifest: Any = json.loads((ckpt / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {COMPLETE_MARKER} manifest (not written by soaes, or its save did not finish)"
    except (OSError, ValueError):
        return f"{COMPLETE_MARKER} is not a soaes checkpoint manifest"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        return f"{COMPLETE_MARKER} is not a {MANIFEST_FORMAT} manifest (written by another tool or an older soaes)"
    files: dict[str, Any] = manifest["files"]
    present = {p.relative_to(ckpt).as_posix(): p for p in _files(ckpt)}
    extra = sorted(set(present) - set(files))
    if extra:
        return f"{extra[0]} is not in its manifest (added after the save)"
    for rel, meta in files.items():
        p = present.get(rel)
        if p is None or p.is_symlink():
            return f"{rel} is missing" if p is None else f"{rel} was replaced by a link"
        if not isinstance(meta, dict) or p.stat().st_size != meta.get("size"):
            return f"{rel} changed size since the save"
        if sha256_file(p) != meta.get("sha256"):
            return f"{rel} checksum mismatch"
    return None


def last_complete_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """The newest `checkpoint-N` under `checkpoint_dir` whose save finished (has its marker; None if none)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX_CHECKPOINT_DIR + "-") and (p / COMPLETE_MARKER).is_file():
            with contextlib.suppress(ValueError):
                found.append((int(p.name.rsplit("-", 1)[1]), p))
    return max(found)[1] if found else None


def resumable_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint, verified against its manifest (None: nothing to resume).

    Raises `IntegrityError` (one line) when it fails the check, rather than unpickling it.
    """
    ckpt = last_complete_checkpoint(checkpoint_dir)
    if ckpt is None:
        return None
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise IntegrityError(f"refusing to resume from {ckpt}: {problem}; resuming unpickles it, so only "
                             "unchanged checkpoints soaes wrote are loaded (delete it to start that stage over)")
    return ckpt
