"""Readers for local benchmark files in the public releases' layouts, used as lm-eval ``custom_dataset`` callables.

- CMMLU (``haonan-li/cmmlu`` zip): ``<dir>/test/<subject>.csv`` and ``<dir>/dev/<subject>.csv``, header
  ``,Question,A,B,C,D,Answer`` (first column is an unnamed row index).
- C-Eval (``ceval/ceval-exam`` zip): ``<dir>/val/<subject>_val.csv`` and ``<dir>/dev/<subject>_dev.csv``, header
  ``id,question,A,B,C,D,answer,explanation``.
- Domain sets: ``<dir>/qa.jsonl`` and ``<dir>/report.jsonl``, one ``{"id", "prompt", "reference"}`` object a line.
- The committed held-out domain Q&A split (``samples/domain_qa_heldout/qa.jsonl``, built by
  ``scripts/make_domain_eval.py``), read from the package whatever the data directory.

The directory comes from lm-eval metadata (``cmmlu_dir`` / ``ceval_dir`` / ``domain_dir``, or ``data_dir`` holding
``cmmlu/``, ``ceval/``, ``domain/``), else the ``SOAES_CMMLU_DIR`` / ``SOAES_CEVAL_DIR`` / ``SOAES_DOMAIN_DIR`` or
``SOAES_EVAL_DATA_DIR`` environment variables, else (CMMLU, C-Eval) the release ``soaes-eval fetch`` unpacked into
``$SOAES_CACHE/benchmarks/``. Every row is validated; a bad row raises ``DataError``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from soaes_core.errors import ConfigError, DataError
from soaes_core.jsonl import iter_jsonl

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
HELDOUT_QA = SAMPLES_DIR / "domain_qa_heldout" / "qa.jsonl"
CHOICES = ("A", "B", "C", "D")
CMMLU_COLUMNS = ("Question", "A", "B", "C", "D", "Answer")
CEVAL_COLUMNS = ("id", "question", "A", "B", "C", "D", "answer")
DOMAIN_FIELDS = ("prompt", "reference")
RELEASES = ("cmmlu", "ceval")  # benchmarks `soaes-eval fetch` can download


def resolve_data_dir(bench: str, metadata: dict[str, Any]) -> Path:
    """Directory of ``bench`` ('cmmlu' | 'ceval' | 'domain') from metadata or environment, or a clear error."""
    candidates = [
        metadata.get(f"{bench}_dir"),
        str(Path(metadata["data_dir"]) / bench) if metadata.get("data_dir") else None,
        os.environ.get(f"SOAES_{bench.upper()}_DIR"),
        str(Path(os.environ["SOAES_EVAL_DATA_DIR"]) / bench) if os.environ.get("SOAES_EVAL_DATA_DIR") else None,
    ]
    chosen = next((c for c in candidates if c), None)
    if chosen is None and bench in RELEASES:
        from ..fetch import fetched_dir

        fetched = fetched_dir(bench)  # the release `soaes-eval fetch` put in the cache
        chosen = str(fetched) if fetched else None
    if chosen is None:
        fetch_hint = f", or run `soaes-eval fetch {bench}`" if bench in RELEASES else ""
        raise ConfigError(
            f"no {bench} data directory: pass lm-eval metadata {{\"{bench}_dir\": DIR}} (or \"data_dir\" with a "
            f"{bench}/ subfolder) or set SOAES_{bench.upper()}_DIR{fetch_hint}; samples are in {SAMPLES_DIR / bench}")
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{bench} data directory does not exist: {path}")
    return path


def read_choice_csv(path: Path, required: tuple[str, ...], answer_field: str) -> list[dict[str, str]]:
    """Rows of a multiple-choice CSV as dicts of strings; checks columns, empty cells and the A–D answer."""
    if not path.is_file():
        raise DataError("file not found (expected the public release layout)", path=str(path))
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError("empty file (no header)", path=str(path))
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"missing column(s) {missing}; header is {header}", path=str(path), line=1,
                            field=missing[0])
        rows = []
        for line_no, cells in enumerate(reader, start=2):
            if not any(c.strip() for c in cells):
                continue  # a blank line is not an item
            if len(cells) != len(header):
                raise DataError(f"{len(cells)} cells but the header has {len(header)}", path=str(path), line=line_no)
            row = {(name or "index"): value for name, value in zip(header, cells, strict=True)}
            answer = row[answer_field].strip()
            if answer not in CHOICES:
                raise DataError(f"answer {answer!r} is not one of A, B, C, D", path=str(path), line=line_no,
                                field=answer_field)
            row[answer_field] = answer
            rows.append(row)
    if not rows:
        raise DataError("no items in file", path=str(path))
    return rows


def _dataset_dict(splits: dict[str, list[dict[str, str]]]) -> Any:
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def load_cmmlu_subject(subject: str, **metadata: Any) -> Any:
    """``DatasetDict`` with ``test`` and ``dev`` splits of one CMMLU subject."""
    root = resolve_data_dir("cmmlu", metadata)
    return _dataset_dict({split: read_choice_csv(root / split / f"{subject}.csv", CMMLU_COLUMNS, "Answer")
                          for split in ("test", "dev")})


def load_ceval_subject(subject: str, **metadata: Any) -> Any:
    """``DatasetDict`` with ``val`` and ``dev`` splits of one C-Eval subject (the test split has no answers)."""
    root = resolve_data_dir("ceval", metadata)
    splits = {}
    for split in ("val", "dev"):
        rows = read_choice_csv(root / split / f"{subject}_{split}.csv", CEVAL_COLUMNS, "answer")
        for r in rows:
            r.setdefault("explanation", "")
        splits[split] = rows
    return _dataset_dict(splits)


def read_domain_jsonl(path: Path) -> list[dict[str, str]]:
    """Domain records ``{"id", "prompt", "reference"}``; a missing or non-string field raises ``DataError``."""
    if not path.is_file():
        raise DataError("file not found", path=str(path))
    rows = []
    for rec in iter_jsonl(path):
        for name in DOMAIN_FIELDS:
            value = rec.data.get(name) if isinstance(rec.data, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise DataError("missing or empty string field", path=str(path), line=rec.line, field=name)
        rows.append({"id": str(rec.data.get("id", f"{path.stem}-{rec.line}")), "prompt": rec.data["prompt"],
                     "reference": rec.data["reference"]})
    if not rows:
        raise DataError("no records in file", path=str(path))
    return rows


def load_domain(file: str, **metadata: Any) -> Any:
    """``DatasetDict`` with a ``test`` split read from ``<domain dir>/<file>``."""
    return _dataset_dict({"test": read_domain_jsonl(resolve_data_dir("domain", metadata) / file)})


def load_domain_heldout(**metadata: Any) -> Any:
    """``DatasetDict`` with a ``test`` split: the committed held-out domain Q&A split (metadata is not used)."""
    return _dataset_dict({"test": read_domain_jsonl(HELDOUT_QA)})
