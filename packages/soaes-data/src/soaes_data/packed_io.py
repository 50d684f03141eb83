"""Tokenized (and usually packed) training data on disk: Parquet shards plus `manifest.json`, written once
and read by soaes-train without tokenizing again.

Columns: `input_ids`, `labels`, `position_ids`, `seq_lengths` (int32 lists). The manifest's
`packed_dataset` entry records the tokenizer hash, chat template, max_length and whether rows are packed,
so a trainer can refuse data made with another tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from soaes_core import atomic_dir, read_manifest, tokenizer_mismatch, write_manifest
from soaes_core.errors import DataError, IntegrityError
from soaes_core.manifest import MANIFEST_NAME

from .packing import IGNORE_INDEX

PACKED_FORMAT = "soaes-packed-v1"
COLUMNS = ("input_ids", "labels", "position_ids", "seq_lengths")
REQUIRED_META = ("tokenizer_sha256", "chat_template", "max_length", "packed")
REJECTS_NAME = "rejects.jsonl"


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output_dir(out_dir: str | os.PathLike[str],
                     inputs: Mapping[str, str | os.PathLike[str]] | None = None) -> Path:
    """Refuse an output directory whose replacement could lose data; returns it resolved.

    Writing replaces the whole directory, so it must be new, empty, or a previous `soaes-data pack` output
    (its manifest says stage `pack` and lists every file in it); it must not be, or hold, an input or the
    current directory. Raises `DataError` naming the directory and the reason.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise DataError("output exists and is not a directory", path=str(out_dir))
    for p in (inputs or {}).values():
        if _within(Path(p).resolve(), out):
            raise DataError(f"output directory is, or contains, the input {p}; choose another directory",
                            path=str(out_dir))
    if _within(Path.cwd().resolve(), out):
        raise DataError("output directory is, or contains, the current directory; give a new subdirectory "
                        "(e.g. -o packed)", path=str(out_dir))
    if not out.exists() or not any(out.iterdir()):
        return out
    manifest = read_manifest(out)
    if manifest is None or manifest.get("stage") != "pack" or "packed_dataset" not in manifest:
        raise DataError("output directory is not empty and is not a previous `soaes-data pack` output "
                        "(no pack manifest.json); refusing to replace it: choose a new or empty directory",
                        path=str(out_dir))
    ours = set(manifest.get("outputs") or {}) | {MANIFEST_NAME}
    foreign = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if p.is_file() and p.relative_to(out).as_posix() not in ours)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise DataError(f"output directory holds file(s) that `soaes-data pack` did not write ({', '.join(foreign[:3])}"
                        f"{more}); refusing to replace it: move them or choose another directory", path=str(out_dir))
    return out


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([(c, pa.list_(pa.int32())) for c in COLUMNS])


def _check_example(ex: Mapping[str, Any], k: int, max_length: int) -> dict[str, list[int]]:
    missing = [c for c in COLUMNS if c not in ex]
    if missing:
        raise DataError(f"example {k} lacks column(s) {', '.join(missing)}", field=missing[0])
    row = {c: [int(v) for v in ex[c]] for c in COLUMNS}
    n = len(row["input_ids"])
    if n == 0 or n > max_length:
        raise DataError(f"example {k} has {n} tokens; expected 1..{max_length}", field="input_ids")
    if len(row["labels"]) != n or len(row["position_ids"]) != n or sum(row["seq_lengths"]) != n:
        raise DataError(f"example {k}: labels/position_ids/seq_lengths do not match input_ids length {n}",
                        field="labels")
    return row


def write_packed_dataset(out_dir: str | os.PathLike[str], examples: Iterable[Mapping[str, Any]], *,
                         meta: Mapping[str, Any], rows_per_shard: int = 20_000,
                         rejects: Iterable[Mapping[str, Any]] | None = None,
                         inputs: Mapping[str, str | os.PathLike[str]] | None = None,
                         counts: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None) -> Path:
    """Write examples as Parquet shards + manifest.json into `out_dir` atomically; returns `out_dir`.

    `meta` must hold `tokenizer_sha256`, `chat_template`, `max_length`, `packed` (more keys are kept).
    `rejects` (records dropped upstream, with a `reason`) go to `rejects.jsonl` beside the shards; both it
    and `counts` (a mapping, or a callable returning one) are read after `examples` is consumed.
    `out_dir` is replaced as a whole, so `check_output_dir` must accept it (no foreign files, no input).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise DataError(f"packed dataset meta lacks {', '.join(missing)}", field=missing[0])
    max_length = int(meta["max_length"])
    out_dir = check_output_dir(out_dir, inputs)
    schema = _schema()
    totals = {"rows": 0, "tokens": 0, "supervised_tokens": 0, "sequences": 0}
    with atomic_dir(out_dir) as tmp:
        shards: list[str] = []
        buf: dict[str, list[list[int]]] = {c: [] for c in COLUMNS}

        def flush() -> None:
            if not buf["input_ids"]:
                return
            name = f"data-{len(shards):05d}.parquet"
            pq.write_table(pa.table(buf, schema=schema), tmp / name, compression="zstd")
            shards.append(name)
            for c in COLUMNS:
                buf[c] = []

        for k, ex in enumerate(examples):
            row = _check_example(ex, k, max_length)
            for c in COLUMNS:
                buf[c].append(row[c])
            totals["rows"] += 1
            totals["tokens"] += len(row["input_ids"])
            totals["supervised_tokens"] += sum(1 for x in row["labels"] if x != IGNORE_INDEX)
            totals["sequences"] += len(row["seq_lengths"])
            if len(buf["input_ids"]) >= rows_per_shard:
                flush()
        flush()
        if totals["rows"] == 0:
            raise DataError("no examples to write (every input was rejected or the input is empty)")
        reject_list = list(rejects or [])
        if reject_list:
            (tmp / REJECTS_NAME).write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                                    for r in reject_list), encoding="utf-8")
        info = {**dict(meta), "format": PACKED_FORMAT, "shards": shards, "columns": list(COLUMNS), **totals,
                "utilisation": totals["tokens"] / (totals["rows"] * max_length)}
        upstream = counts() if callable(counts) else counts
        write_manifest(tmp, "pack", inputs=inputs,
                       counts={**dict(upstream or {}), "rows": totals["rows"], "rejected": len(reject_list)},
                       extra={"packed_dataset": info})
    return out_dir


def read_packed_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `packed_dataset` entry of a packed dataset's manifest (tokenizer hash, template, max_length...)."""
    manifest = read_manifest(path)
    if manifest is None or "packed_dataset" not in manifest:
        raise DataError("not a packed dataset (no manifest.json with a packed_dataset entry)", path=str(path))
    meta = manifest["packed_dataset"]
    if meta.get("format") != PACKED_FORMAT:
        raise DataError(f"unsupported packed format {meta.get('format')!r}; expected {PACKED_FORMAT}",
                        path=str(path))
    return meta


def read_packed_dataset(path: str | os.PathLike[str], *, tokenizer: Any = None) -> Any:
    """Load a packed dataset as a `datasets.Dataset` (columns `input_ids`, `labels`, `position_ids`,
    `seq_lengths`). With `tokenizer`, raise `IntegrityError` unless it hashes as the one used to pack."""
    import datasets

    path = Path(path)
    meta = read_packed_meta(path)
    # ids only: the rows are token ids, so a reloaded tokenizer class that normalises text differently still fits
    problem = tokenizer_mismatch(meta["tokenizer_sha256"], tokenizer, ids_only=True) if tokenizer is not None else None
    if problem:
        raise IntegrityError(f"{path}: packed dataset {problem}")
    files = [path / s for s in meta["shards"]]
    lost = [str(f) for f in files if not f.is_file()]
    if lost:
        raise IntegrityError(f"{path}: missing shard(s) {', '.join(lost)}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in files])
    ds = datasets.Dataset(table)
    if ds.num_rows != meta["rows"]:
        raise IntegrityError(f"{path}: {ds.num_rows} rows on disk, manifest says {meta['rows']}")
    return ds
