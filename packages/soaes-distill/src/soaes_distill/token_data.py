"""Tokenized datasets for distillation: JSONL or Parquet rows with `input_ids` (+ optional `labels`,
`position_ids` for packed rows, and `id`), each with a stable integer example id."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soaes_core import iter_jsonl, sha256_file
from soaes_core.errors import DataError


@dataclass
class TokenExample:
    """One tokenized row; `position_ids` is set for packed rows (restarting at 0 per sequence)."""

    example_id: int
    input_ids: list[int]
    labels: list[int] | None = None
    position_ids: list[int] | None = None


def _int_list(value: Any, path: Path, line: int, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError("expected a list of integers", path=str(path), line=line, field=name)
    return value


def _example(data: dict[str, Any], path: Path, line: int, default_id: int) -> TokenExample:
    if "input_ids" not in data:
        raise DataError("missing tokenized field", path=str(path), line=line, field="input_ids")
    ids = _int_list(data["input_ids"], path, line, "input_ids")
    if not ids:
        raise DataError("empty sequence", path=str(path), line=line, field="input_ids")
    if min(ids) < 0:  # would index the embedding from the end (or crash deep inside the model)
        raise DataError(f"token id {min(ids)} is negative", path=str(path), line=line, field="input_ids")
    labels = _int_list(data["labels"], path, line, "labels") if data.get("labels") is not None else None
    pos = _int_list(data["position_ids"], path, line, "position_ids") if data.get("position_ids") is not None else None
    for name, seq in (("labels", labels), ("position_ids", pos)):
        if seq is not None and len(seq) != len(ids):
            raise DataError(f"length {len(seq)} != input_ids length {len(ids)}", path=str(path), line=line,
                            field=name)
    eid = data.get("id", default_id)
    if not isinstance(eid, int) or isinstance(eid, bool) or eid < 0:
        raise DataError(f"example id must be a non-negative integer, got {eid!r}", path=str(path), line=line,
                        field="id")
    return TokenExample(eid, ids, labels, pos)


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".parquet"))
        if not files:
            raise DataError("directory holds no .jsonl or .parquet files", path=str(path))
        return files
    if not path.is_file():
        raise DataError("dataset not found", path=str(path))
    return [path]


def load_token_examples(path: str | os.PathLike[str]) -> list[TokenExample]:
    """Read every row of a tokenized dataset (file or directory of .jsonl/.parquet); ids must be unique."""
    path = Path(path)
    examples: list[TokenExample] = []
    for file in _data_files(path):
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(file).to_pylist()):
                examples.append(_example(row, file, i + 1, len(examples)))
        else:
            for rec in iter_jsonl(file):
                if not isinstance(rec.data, dict):
                    raise DataError("expected a JSON object", path=str(file), line=rec.line)
                examples.append(_example(rec.data, file, rec.line, len(examples)))
    seen: set[int] = set()
    for ex in examples:
        if ex.example_id in seen:
            raise DataError(f"duplicate example id {ex.example_id}", path=str(path), field="id")
        seen.add(ex.example_id)
    return examples


def dataset_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 over the dataset's files (names relative to it and contents), stable across copies."""
    path = Path(path)
    files = _data_files(path)
    if len(files) == 1 and files[0] == path:
        return sha256_file(path)
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def write_token_jsonl(path: str | os.PathLike[str], examples: list[TokenExample]) -> Path:
    """Write examples as JSONL (atomic) in the format `load_token_examples` reads."""
    from soaes_core import write_jsonl

    rows = []
    for ex in examples:
        row: dict[str, Any] = {"id": ex.example_id, "input_ids": ex.input_ids}
        if ex.labels is not None:
            row["labels"] = ex.labels
        if ex.position_ids is not None:
            row["position_ids"] = ex.position_ids
        rows.append(row)
    write_jsonl(path, rows)
    return Path(path)
