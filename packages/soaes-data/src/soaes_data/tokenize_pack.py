"""Tokenize once and pack: SFT chat JSONL (`messages`) or a CPT text corpus → a packed dataset directory
(`packed_io`) that soaes-train reads without tokenizing again."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from soaes_core import iter_jsonl, progress, tokenizer_fingerprint
from soaes_core.errors import DataError, InvalidArgumentError, SoaesError

from .chat import encode_chat
from .packed_io import check_output_dir, write_packed_dataset
from .packing import build_packed_example, pack, pack_cpt, packing_stats

OVERLONG_POLICIES = ("drop", "truncate", "error")
Overlong = Literal["drop", "truncate", "error"]


@dataclass
class SftTokens:
    """Encoded conversations of one JSONL file, the records dropped (with a reason and a `kind`) and how
    many kept ones were truncated to `max_length`."""

    examples: list[dict[str, list[int]]]
    rejects: list[dict[str, Any]]
    truncated: int = 0

    def counts(self) -> dict[str, Any]:
        """Manifest counts: every input record is kept or dropped (`in = kept + dropped`)."""
        return {"in": len(self.examples) + len(self.rejects), "kept": len(self.examples),
                "dropped": len(self.rejects), "truncated": self.truncated,
                "dropped_by_reason": dict(Counter(r["kind"] for r in self.rejects))}


def _reject(path: str | os.PathLike[str], line: int | None, reason: str, kind: str) -> dict[str, Any]:
    return {"path": str(path), "line": line, "kind": kind, "reason": reason}


def tokenize_sft_jsonl(path: str | os.PathLike[str], tokenizer: Any, max_length: int, *,
                       messages_field: str = "messages", on_error: Literal["raise", "skip"] = "raise",
                       overlong: Overlong = "drop") -> SftTokens:
    """Encode every conversation of a JSONL file with chat masks.

    Malformed lines, missing fields and conversations with nothing to train on raise `DataError` with the
    file and line, or with `on_error="skip"` go to rejects (kind `invalid`). Conversations longer than
    `max_length` follow `overlong`: `drop` (reject, kind `overlong`), `truncate` (cut and count; dropped if
    nothing supervised is left) or `error` (raise naming the line).
    """
    if overlong not in OVERLONG_POLICIES:
        raise InvalidArgumentError(f"overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {overlong!r}")
    if max_length < 1:
        raise InvalidArgumentError(f"max_length must be >= 1, got {max_length}")
    raw_rejects: list[Any] = []
    out = SftTokens([], [])
    for rec in progress(iter_jsonl(path, on_error=on_error, rejects=raw_rejects), desc="tokenize", unit="ex"):
        try:
            if not isinstance(rec.data, dict):
                raise DataError("expected a JSON object")
            if messages_field not in rec.data:
                raise DataError("missing field", field=messages_field)
            enc = encode_chat(tokenizer, rec.data[messages_field])
        except DataError as err:
            if on_error == "raise":
                raise DataError(str(err), path=str(path), line=rec.line) from None
            out.rejects.append(_reject(path, rec.line, str(err), "invalid"))
            continue
        n = len(enc["input_ids"])
        if n > max_length:
            if overlong == "error":
                raise DataError(f"conversation has {n} tokens > max_length {max_length} (overlong policy 'error'; "
                                "choose drop or truncate to go on)", path=str(path), line=rec.line,
                                field=messages_field)
            if overlong == "drop":
                out.rejects.append(_reject(path, rec.line, f"overlong: {n} tokens > max_length {max_length}",
                                           "overlong"))
                continue
            try:
                enc = encode_chat(tokenizer, rec.data[messages_field], max_length=max_length)
            except DataError:
                out.rejects.append(_reject(path, rec.line, f"overlong: {n} tokens; truncated to max_length "
                                           f"{max_length} nothing supervised is left", "overlong"))
                continue
            out.truncated += 1
        out.examples.append(enc)
    out.rejects += [_reject(r.path, r.line, r.reason, "invalid") for r in raw_rejects]
    out.rejects.sort(key=lambda r: r["line"] or 0)
    return out


def unpacked_rows(examples: Sequence[dict[str, list[int]]]) -> Iterator[dict[str, Any]]:
    """One example per row, in the packed-dataset columns (position_ids 0..n-1, one sequence)."""
    for ex in examples:
        n = len(ex["input_ids"])
        yield {"input_ids": ex["input_ids"], "labels": ex["labels"], "position_ids": list(range(n)),
               "seq_lengths": [n]}


def pack_sft_file(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], tokenizer: Any, max_length: int,
                  *, packed: bool = True, tokenizer_spec: str | None = None, messages_field: str = "messages",
                  on_error: Literal["raise", "skip"] = "raise", overlong: Overlong = "drop") -> Path:
    """Tokenize an SFT JSONL with chat masks and write it packed (FFD) or one example per row.

    Over-long conversations follow `overlong` (see `tokenize_sft_jsonl`); the manifest counts kept, dropped
    (by kind) and truncated records, and `rejects.jsonl` says why each dropped one was dropped.
    """
    check_output_dir(out_dir, {"sft": path})
    tokens = tokenize_sft_jsonl(path, tokenizer, max_length, messages_field=messages_field, on_error=on_error,
                                overlong=overlong)
    examples, rejects = tokens.examples, tokens.rejects
    if not examples:
        why = ", ".join(f"{k}={v}" for k, v in tokens.counts()["dropped_by_reason"].items())
        raise DataError(f"no usable conversation in the input ({len(rejects)} dropped: {why or 'empty file'})",
                        path=str(path))
    lengths = [len(ex["input_ids"]) for ex in examples]
    if packed:
        bins = pack(lengths, max_length)
        rows: Any = (build_packed_example(examples, b) for b in bins)
        stats = packing_stats(bins, lengths, max_length).as_dict()
    else:
        rows = unpacked_rows(examples)
        stats = packing_stats([[i] for i in range(len(examples))], lengths, max_length).as_dict()
    meta = {"mode": "sft", "tokenizer": tokenizer_spec,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer, ids_only=True),
            "chat_template": tokenizer.chat_template, "max_length": max_length, "packed": packed,
            "eos_token_id": tokenizer.eos_token_id, "packing_stats": stats, "overlong": overlong,
            "truncated": tokens.truncated}
    return write_packed_dataset(out_dir, rows, meta=meta, rejects=rejects, inputs={"sft": path},
                                counts=tokens.counts())


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
                text = rec.data.get(text_field) if isinstance(rec.data, dict) else None
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
    inputs = {f"corpus{i}": p for i, p in enumerate(paths)}
    check_output_dir(out_dir, inputs)
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
    meta = {"mode": "cpt", "tokenizer": tokenizer_spec,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer, ids_only=True),
            "chat_template": None, "max_length": max_length, "packed": True,
            "separate_documents": separate_documents, "eos_token_id": tokenizer.eos_token_id}
    out = write_packed_dataset(out_dir, rows, meta=meta, rejects=rejects,
                               inputs=inputs,
                               counts=lambda: {"in": counter["docs"] + len(rejects), "kept": counter["docs"],
                                                     "dropped": len(rejects)})
    return out

