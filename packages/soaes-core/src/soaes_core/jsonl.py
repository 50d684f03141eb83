"""JSON Lines reading with line-numbered errors, and atomic JSONL writing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .atomic import atomic_write_text
from .errors import DataError


@dataclass(frozen=True)
class JsonlRecord:
    """One parsed line: its 1-based line number and the decoded object."""

    line: int
    data: dict[str, Any]


@dataclass(frozen=True)
class JsonlReject:
    """A line that could not be used, with the reason (for rejects files)."""

    path: str
    line: int
    reason: str
    raw: str


def iter_jsonl(
    path: str | os.PathLike[str],
    on_error: Literal["raise", "skip"] = "raise",
    rejects: list[JsonlReject] | None = None,
) -> Iterator[JsonlRecord]:
    """Yield each non-blank line of a JSONL file as an object.

    `on_error="raise"` raises `DataError` naming file and line; `"skip"` appends a `JsonlReject` to
    `rejects` (required then) so nothing is lost silently.
    """
    if on_error == "skip" and rejects is None:
        raise ValueError("on_error='skip' needs a rejects list to record skipped lines")
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path=str(path))
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                reason = f"not valid UTF-8 ({err.reason} at byte {err.start})"
                if on_error == "raise":
                    raise DataError(reason, path=str(path), line=lineno) from None
                assert rejects is not None
                rejects.append(JsonlReject(str(path), lineno, reason, raw.decode("utf-8", "replace")))
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except (json.JSONDecodeError, ValueError) as err:
                reason = f"invalid JSON: {err}"
                if on_error == "raise":
                    raise DataError(reason, path=str(path), line=lineno) from None
                assert rejects is not None
                rejects.append(JsonlReject(str(path), lineno, reason, text.rstrip("\n")))
                continue
            yield JsonlRecord(lineno, obj)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a whole JSONL file strictly (first bad line raises `DataError` with its line number)."""
    return [rec.data for rec in iter_jsonl(path)]


def write_jsonl(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> int:
    """Atomically write records as JSONL (UTF-8, non-ASCII kept); returns the number written."""
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
