"""Decontamination: find training texts that share long character n-grams with evaluation sets (CMMLU /
C-Eval files, the domain test split) and report every overlap."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaes_core.errors import DataError

from .dedup import normalise_for_dedup


@dataclass
class DecontamConfig:
    """`eval_files`: JSONL/JSON/CSV/TXT files of evaluation items; `ngram`: overlap length in normalised
    characters (13 by default, as in GPT-3's decontamination, counted in characters for Chinese)."""

    eval_files: list[str] = field(default_factory=list)
    ngram: int = 13
    min_overlaps: int = 1

    def __post_init__(self) -> None:
        if self.ngram < 5 or self.min_overlaps < 1:
            raise ValueError("need ngram >= 5 and min_overlaps >= 1")


@dataclass(frozen=True)
class Overlap:
    """A training item sharing n-grams with an eval item."""

    eval_file: str
    eval_item: int
    count: int
    example: str


def strings_in(obj: Any) -> Iterator[str]:
    """Every string value inside a JSON-like object (questions, choices, message contents...)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from strings_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings_in(v)


def read_eval_items(path: str | os.PathLike[str]) -> list[str]:
    """Eval items as texts: one per JSONL line / JSON list element / CSV row / non-empty TXT line."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise DataError("evaluation file not found", path=str(p))
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix == ".jsonl":
        items = []
        for k, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    items.append(" ".join(strings_in(json.loads(line))))
                except json.JSONDecodeError as err:
                    raise DataError(f"invalid JSON: {err}", path=str(p), line=k) from None
        return items
    if p.suffix == ".json":
        data = json.loads(text)
        return [" ".join(strings_in(x)) for x in (data if isinstance(data, list) else [data])]
    if p.suffix == ".csv":
        return [" ".join(row) for row in csv.reader(text.splitlines())][1:]
    return [line for line in text.splitlines() if line.strip()]


def char_ngrams(text: str, n: int) -> set[str]:
    s = normalise_for_dedup(text)
    return {s[i:i + n] for i in range(len(s) - n + 1)}


class NgramIndex:
    """n-gram → (eval file, item index) for every eval item; `overlaps(text)` lists matching items."""

    def __init__(self, files: Iterable[str | os.PathLike[str]], n: int = 13) -> None:
        self.n = n
        self.index: dict[str, tuple[str, int]] = {}
        self.items = 0
        for f in files:
            for k, item in enumerate(read_eval_items(f)):
                self.items += 1
                for g in char_ngrams(item, n):
                    self.index.setdefault(g, (str(f), k))

    def overlaps(self, text: str) -> list[Overlap]:
        hits: dict[tuple[str, int], list[str]] = {}
        for g in char_ngrams(text, self.n):
            where = self.index.get(g)
            if where is not None:
                hits.setdefault(where, []).append(g)
        return [Overlap(f, k, len(gs), min(gs)) for (f, k), gs in sorted(hits.items())]


def decontaminate_records(records: Iterable[Mapping[str, Any]], index: NgramIndex, min_overlaps: int = 1,
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Split records (documents with `text` or chats with `messages`) into (kept, rejects, overlap report)."""
    from .records import record_text

    kept: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    report: list[dict[str, Any]] = []
    for k, rec in enumerate(records):
        found = index.overlaps(record_text(rec))
        if sum(o.count for o in found) >= min_overlaps:
            rejects.append({**rec, "reason": f"contaminated:{Path(found[0].eval_file).name}"})
            report += [{"record": rec.get("id", k), "eval_file": o.eval_file, "eval_item": o.eval_item,
                        "ngrams": o.count, "example": o.example} for o in found]
        else:
            kept.append(dict(rec))
    return kept, rejects, report
