"""Turn a stage's data config into training rows: tokenized, length-checked, packed or one per row.

Tokenization, chat masks, packing and the packed on-disk format come from soaes-data
(`encode_chat`, `pack_cpt`, `pack`/`build_packed_example`, `read_packed_dataset`); this module applies the
stage's policy (over-long rows truncated and counted, or an error naming the file and line) and accounts
for every record (kept, truncated, or rejected with a reason).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaes_core import iter_jsonl
from soaes_core.errors import DataError
from soaes_data.chat import encode_chat
from soaes_data.packing import IGNORE_INDEX, build_packed_example, pack, pack_cpt, packing_utilisation
from soaes_data.tokenize_pack import iter_corpus_texts

from .config import DataConfig

SAMPLE_PREFIX = "sample:"


def resolve_data_path(path: str) -> Path:
    """`sample:NAME` → a file of soaes-data's shipped sample corpus; anything else → a local path."""
    if path.startswith(SAMPLE_PREFIX):
        from soaes_data.samples import sample_path

        return sample_path(path[len(SAMPLE_PREFIX):])
    return Path(path).expanduser()


@dataclass
class PreparedData:
    """Training rows (`input_ids`, `labels`, and `position_ids` when packed) plus an account of the input."""

    rows: list[dict[str, list[int]]]
    packed: bool
    counts: dict[str, Any] = field(default_factory=dict)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)


class RowDataset:
    """A list of rows as a map-style dataset (what `transformers.Trainer` needs)."""

    def __init__(self, rows: Sequence[dict[str, list[int]]]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "packed"
    if path.suffix == ".parquet":
        return "parquet"
    return "jsonl"


def truncate_packed_row(row: dict[str, list[int]], max_length: int) -> dict[str, list[int]]:
    """Cut a packed row to `max_length` tokens, keeping `seq_lengths` consistent."""
    out = {k: list(row[k][:max_length]) for k in ("input_ids", "labels", "position_ids")}
    lengths, total = [], 0
    for n in row.get("seq_lengths") or [len(row["input_ids"])]:
        take = min(n, max_length - total)
        if take <= 0:
            break
        lengths.append(take)
        total += take
    out["seq_lengths"] = lengths
    return out


def _sft_jsonl(path: Path, data: DataConfig, tokenizer: Any, counts: dict[str, int],
               rejects: list[dict[str, Any]]) -> Iterator[dict[str, list[int]]]:
    for rec in iter_jsonl(path):
        counts["records"] += 1
        if not isinstance(rec.data, dict) or data.messages_field not in rec.data:
            raise DataError("missing required field", path=str(path), line=rec.line, field=data.messages_field)
        try:
            enc = encode_chat(tokenizer, rec.data[data.messages_field])
            if len(enc["input_ids"]) > data.max_length:
                if data.overlong == "error":
                    raise DataError(f"{len(enc['input_ids'])} tokens > data.max_length {data.max_length} "
                                    "(set data.overlong: truncate to cut and count instead)", path=str(path),
                                    line=rec.line, field=data.messages_field)
                counts["truncated"] += 1
                enc = encode_chat(tokenizer, rec.data[data.messages_field], max_length=data.max_length)
        except DataError as err:
            if err.path is not None:
                raise
            if "zero supervised" not in str(err):  # malformed conversation: stop, naming file and line
                raise DataError(str(err), path=str(path), line=rec.line) from None
            # nothing to train on (no assistant turn, or truncated away): dropped, with the reason kept
            rejects.append({"path": str(path), "line": rec.line, "reason": str(err)})
            continue
        yield enc


def _tokenized_rows(path: Path, fmt: str, kind: str, tokenizer: Any) -> Iterator[dict[str, list[int]]]:
    """Rows of an already tokenized dataset (soaes packed dir or Parquet file), checking required columns."""
    if fmt == "packed":
        from soaes_data.packed_io import read_packed_dataset

        table = read_packed_dataset(path, tokenizer=tokenizer)
        columns = table.column_names
        rows: Any = table
    else:
        import pyarrow.parquet as pq

        if not path.is_file():
            raise DataError("no such file", path=str(path))
        t = pq.read_table(path)
        columns = t.column_names
        rows = t.to_pylist()
    required = ["input_ids"] + (["labels"] if kind == "sft" else [])
    for col in required:
        if col not in columns:
            raise DataError(f"dataset lacks required column {col!r} (has: {', '.join(columns)})", path=str(path),
                            field=col)
    for k, r in enumerate(rows):
        ids = list(r["input_ids"])
        labels = list(r["labels"]) if r.get("labels") is not None else list(ids)
        if len(labels) != len(ids):
            raise DataError(f"row {k}: labels length {len(labels)} != input_ids length {len(ids)}", path=str(path),
                            field="labels")
        pos = list(r["position_ids"]) if r.get("position_ids") is not None else list(range(len(ids)))
        yield {"input_ids": ids, "labels": labels, "position_ids": pos,
               "seq_lengths": list(r.get("seq_lengths") or [len(ids)]), "_row": k}


def prepare_data(data: DataConfig, kind: str, tokenizer: Any) -> PreparedData:
    """Load, tokenize (if needed), check lengths and pack the data of one stage.

    CPT text is joined with EOS and cut into `max_length` windows (documents longer than a window are split:
    that is how pre-training consumes them), one segment per document when `separate_documents`. SFT
    conversations get assistant-only labels and are packed first-fit-decreasing when `packing`.
    """
    if not data.paths:
        raise DataError("data.paths is empty: name at least one dataset file or directory", field="data.paths")
    paths = [resolve_data_path(p) for p in data.paths]
    for p in paths:
        if not p.exists():
            raise DataError("no such file or directory", path=str(p), field="data.paths")
    counts: dict[str, Any] = {"records": 0, "truncated": 0, "rejected": 0}
    rejects: list[dict[str, Any]] = []
    examples: list[dict[str, list[int]]] = []  # one sequence each (to pack / pad)
    rows: list[dict[str, list[int]]] = []  # already packed rows
    for p in paths:
        fmt = _detect_format(p, data.format)
        if fmt == "jsonl" and kind == "cpt":
            if tokenizer.eos_token_id is None:
                raise DataError("tokenizer has no eos token; CPT needs one to separate documents")
            docs: list[list[int]] = []
            for text in iter_corpus_texts([p], text_field=data.text_field):
                counts["records"] += 1
                docs.append(tokenizer(text, add_special_tokens=False)["input_ids"])
                if data.max_examples and counts["records"] >= data.max_examples:
                    break
            counts["documents_split"] = counts.get("documents_split", 0) + sum(
                len(d) + 1 > data.max_length for d in docs)
            for r in pack_cpt(docs, data.max_length, tokenizer.eos_token_id,
                              separate_documents=data.separate_documents):
                rows.append({k: r[k] for k in ("input_ids", "labels", "position_ids")})
        elif fmt == "jsonl":
            for enc in _sft_jsonl(p, data, tokenizer, counts, rejects):
                examples.append(enc)
                if data.max_examples and len(examples) >= data.max_examples:
                    break
        else:
            for r in _tokenized_rows(p, fmt, kind, tokenizer):
                counts["records"] += 1
                n = len(r["input_ids"])
                if n > data.max_length:
                    if data.overlong == "error":
                        raise DataError(f"row {r['_row']} has {n} tokens > data.max_length {data.max_length} "
                                        "(set data.overlong: truncate to cut and count instead)", path=str(p),
                                        field="input_ids")
                    counts["truncated"] += 1
                    r = truncate_packed_row(r, data.max_length)
                if len(r["seq_lengths"]) <= 1:  # one sequence per row: packed or padded below
                    examples.append({"input_ids": r["input_ids"], "labels": r["labels"]})
                else:
                    rows.append({k: r[k] for k in ("input_ids", "labels", "position_ids")})
                if data.max_examples and counts["records"] >= data.max_examples:
                    break
    counts["rejected"] = len(rejects)
    packed = data.packing or bool(rows)
    if examples:
        if packed:
            lengths = [len(e["input_ids"]) for e in examples]
            bins = pack(lengths, data.max_length)
            counts["packing_utilisation"] = round(packing_utilisation(bins, lengths, data.max_length), 4)
            for b in bins:
                r = build_packed_example(examples, b)
                rows.append({k: r[k] for k in ("input_ids", "labels", "position_ids")})
        else:
            rows.extend({"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples)
    if not rows:
        raise DataError("no training rows: every record was rejected or the input is empty",
                        path=str(paths[0]))
    counts["sequences"] = len(examples) if examples else counts["records"]
    counts["rows"] = len(rows)
    counts["tokens"] = sum(len(r["input_ids"]) for r in rows)
    counts["supervised_tokens"] = sum(sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in rows)
    return PreparedData(rows=rows, packed=packed, counts=counts, rejects=rejects, paths=paths)


def data_inputs(paths: Sequence[str | os.PathLike[str]]) -> dict[str, str]:
    """Named inputs for a manifest (`data0`, `data1`, ...)."""
    return {f"data{i}": str(p) for i, p in enumerate(paths)}
