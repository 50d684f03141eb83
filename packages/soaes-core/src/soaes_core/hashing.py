"""Checksums of files and directories (sha256), used by manifests and caches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_tree(root: str | os.PathLike[str], exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Map each file under `root` (relative POSIX path) to its sha256, skipping names in `exclude`."""
    root = Path(root)
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in exclude:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out
