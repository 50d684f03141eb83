"""Read prediction/reference pairs from JSONL for offline scoring (``soaes-eval metrics``)."""

from __future__ import annotations

from pathlib import Path

from soaes_core.errors import DataError
from soaes_core.jsonl import iter_jsonl


def _read_field(path: Path, name: str) -> list[str]:
    if not path.is_file():
        raise DataError("no such file", path=str(path))
    values = []
    for rec in iter_jsonl(path):
        value = rec.data.get(name)
        if not isinstance(value, str):
            raise DataError(f"missing or non-string field (got {type(value).__name__})", path=str(path),
                            line=rec.line, field=name)
        values.append(value)
    if not values:
        raise DataError("empty file: no records to score", path=str(path))
    return values


def read_pairs(predictions: str | Path, references: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Predictions and references: both fields from one file, or ``reference`` from a second file (same order)."""
    pred_path = Path(predictions)
    preds = _read_field(pred_path, "prediction")
    if references is None:
        return preds, _read_field(pred_path, "reference")
    ref_path = Path(references)
    refs = _read_field(ref_path, "reference")
    if len(preds) != len(refs):
        raise DataError(f"{len(preds)} predictions in {pred_path} but {len(refs)} references in {ref_path}; "
                        "counts must match", path=str(pred_path))
    return preds, refs
