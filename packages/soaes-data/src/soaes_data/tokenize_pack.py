"""Tokenize once and pack: SFT chat JSONL (`messages`) or a CPT text corpus → a packed dataset directory
(`packed_io`) that soaes-train reads without tokenizing again."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from soaes_core import iter_jsonl, progress
from soaes_core.errors import DataError, SoaesError

from .chat import encode_chat
from .packed_io import tokenizer_sha256, write_packed_dataset
from .packing import build_packed_example, pack, pack_cpt, packing_stats


def tokenize_sft_jsonl(path: str | os.PathLike[str], tokenizer: Any, max_length: int, *,
                       messages_field: str = "messages", on_error: Literal["raise", "skip"] = "raise",
                       overlong: Literal["truncate", "drop"] = "truncate") -> tuple[list[dict[str, list[int]]],
                                                                                   list[dict[str, Any]]]:
    """Encode every conversation of a JSONL file with chat masks; returns (examples, rejects).

    With `on_error="skip"` malformed lines, missing fields and conversations with nothing to train on go to
    rejects (path, line, reason) instead of raising `DataError` with the file and line.
    """
    raw_rejects: list[Any] = []
    rejects: list[dict[str, Any]] = []
    examples: list[dict[str, list[int]]] = []
    for rec in progress(iter_jsonl(path, on_error=on_error, rejects=raw_rejects), desc="tokenize", unit="ex"):
        try:
            if messages_field not in rec.data:
                raise DataError("missing field", field=messages_field)
            enc = encode_chat(tokenizer, rec.data[messages_field])
            if len(enc["input_ids"]) > max_length:
                if overlong == "drop":
                    raise DataError(f"{len(enc['input_ids'])} tokens > max_length {max_length}", field=messages_field)
                enc = encode_chat(tokenizer, rec.data[messages_field], max_length=max_length)
        except DataError as err:
            located = DataError(str(err), path=str(path), line=rec.line)
            if on_error == "raise":
                raise located from None
            rejects.append({"path": str(path), "line": rec.line, "reason": str(err)})
            continue
        examples.append(enc)
    rejects = [{"path": r.path, "line": r.line, "reason": r.reason} for r in raw_rejects] + rejects
    return examples, rejects


def unpacked_rows(examples: Sequence[dict[str, list[int]]]) -> Iterator[dict[str, Any]]:
    """One example per row, in the packed-dataset columns (position_ids 0..n-1, one sequence)."""
    for ex in examples:
        n = len(ex["input_ids"])
        yield {"input_ids": ex["input_ids"], "labels": ex["labels"], "position_ids": list(range(n)),
               "seq_lengths": [n]}


def pack_sft_file(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], tokenizer: Any, max_length: int,
                  *, packed: bool = True, tokenizer_spec: str | None = None, messages_field: str = "messages",
                  on_error: Literal["raise", "skip"] = "raise",
                  overlong: Literal["truncate", "drop"] = "truncate") -> Path:
    """Tokenize an SFT JSONL with chat masks and write it packed (FFD) or one example per row."""
    examples, rejects = tokenize_sft_jsonl(path, tokenizer, max_length, messages_field=messages_field,
                                           on_error=on_error, overlong=overlong)
    if not examples:
        raise DataError("no usable conversation in the input", path=str(path))
    lengths = [len(ex["input_ids"]) for ex in examples]
    if packed:
        bins = pack(lengths, max_length)
        rows: Any = (build_packed_example(examples, b) for b in bins)
        stats = packing_stats(bins, lengths, max_length).as_dict()
    else:
        rows = unpacked_rows(examples)
        stats = packing_stats([[i] for i in range(len(examples))], lengths, max_length).as_dict()
    meta = {"mode": "sft", "tokenizer": tokenizer_spec, "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "chat_template": tokenizer.chat_template, "max_length": max_length, "packed": packed,
            "eos_token_id": tokenizer.eos_token_id, "packing_stats": stats}
    return write_packed_dataset(out_dir, rows, meta=meta, rejects=rejects, inputs={"sft": path},
                                counts={"in": len(examples) + len(rejects), "kept": len(examples),
                                        "dropped": len(rejects)})


def iter_corpus_texts(paths: Sequence[str | os.PathLike[str]], text_field: str = "text",
                      on_error: Literal["raise", "skip"] = "raise",
                      rejects: list[dict[str, Any]] | None = None) -> Iterator[str]:
    """Document texts from JSONL files (`text_field`) or plain text files (one document per file)."""
    from .readers import read_document

    for p in paths:
        p = Path(p)
        if p.suffix == ".jsonl":
            raw: list[Any] = []
            for rec in iter_jsonl(p, on_error=on_error, rejects=raw):
                text = rec.data.get(text_field)
                if not isinstance(text, str) or not text.strip():
                    err = DataError("missing or empty text", path=str(p), line=rec.line, field=text_field)
                    if on_error == "raise" or rejects is None:
                        raise err
                    rejects.append({"path": str(p), "line": rec.line, "reason": str(err)})
                    continue
                yield text
            if rejects is not None:
                rejects += [{"path": r.path, "line": r.line, "reason": r.reason} for r in raw]
        else:
            try:
                yield read_document(p).text
            except SoaesError as err:
                if on_error == "raise" or rejects is None:
                    raise
                rejects.append({"path": str(p), "line": None, "reason": str(err)})


def pack_cpt_corpus(paths: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], tokenizer: Any,
                    max_length: int, *, separate_documents: bool = True, drop_remainder: bool = False,
                    tokenizer_spec: str | None = None, text_field: str = "text",
                    on_error: Literal["raise", "skip"] = "raise") -> Path:
    """Tokenize documents, join them with EOS and cut into `max_length` windows (see `pack_cpt`)."""
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no eos token; CPT packing needs one to separate documents")
    rejects: list[dict[str, Any]] = []
    counter = {"docs": 0}

    def token_docs() -> Iterator[list[int]]:
        for text in progress(iter_corpus_texts(paths, text_field, on_error, rejects), desc="tokenize", unit="doc"):
            counter["docs"] += 1
            yield tokenizer(text, add_special_tokens=False)["input_ids"]

    rows = pack_cpt(token_docs(), max_length, tokenizer.eos_token_id, separate_documents=separate_documents,
                    drop_remainder=drop_remainder)
    meta = {"mode": "cpt", "tokenizer": tokenizer_spec, "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "chat_template": None, "max_length": max_length, "packed": True,
            "separate_documents": separate_documents, "eos_token_id": tokenizer.eos_token_id}
    out = write_packed_dataset(out_dir, rows, meta=meta, rejects=rejects,
                               inputs={f"corpus{i}": p for i, p in enumerate(paths)},
                               counts=lambda: {"in": counter["docs"] + len(rejects), "kept": counter["docs"],
                                                     "dropped": len(rejects)})
    return out

