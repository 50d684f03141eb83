"""Corpus statistics: document counts, character and token lengths (percentiles, histogram PNG)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from soaes_core import iter_jsonl
from soaes_core.errors import DataError

from .records import record_text


def iter_texts(path: str | os.PathLike[str], field: str | None = None) -> Iterator[str]:
    """Texts of a JSONL or Parquet file (`field`, else `text`, else message contents)."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        col = field or "text"
        table = pq.read_table(p, columns=[col])
        yield from (str(x) for x in table.column(col).to_pylist())
        return
    for rec in iter_jsonl(p):
        if field:
            value = rec.data.get(field)
            if not isinstance(value, str):
                raise DataError("missing or not a string", path=str(p), line=rec.line, field=field)
            yield value
        else:
            yield record_text(rec.data)


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    a = np.asarray(values)
    return {"count": int(a.size), "total": int(a.sum()), "mean": round(float(a.mean()), 2), "min": int(a.min()),
            "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": int(a.max())}


def corpus_stats(path: str | os.PathLike[str], tokenizer: Any = None, field: str | None = None) -> dict[str, Any]:
    """Counts and length summaries; for a packed dataset directory, rows/tokens/sequences/utilisation."""
    p = Path(path)
    if p.is_dir():
        from .packed_io import read_packed_dataset, read_packed_meta

        meta = read_packed_meta(p)
        ds = read_packed_dataset(p)
        seq = [n for row in ds["seq_lengths"] for n in row]
        rows = [sum(r) for r in ds["seq_lengths"]]
        return {"kind": "packed", "max_length": meta["max_length"], "rows": ds.num_rows,
                "utilisation": round(sum(rows) / (len(rows) * meta["max_length"]), 4),
                "sequence_tokens": _summary(seq), "row_tokens": _summary(rows), "lengths": {"tokens": seq}}
    chars, tokens = [], []
    for text in iter_texts(p, field):
        chars.append(len(text))
        if tokenizer is not None:
            tokens.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    out: dict[str, Any] = {"kind": "corpus", "documents": len(chars), "chars": _summary(chars),
                           "bytes_utf8": None, "lengths": {"chars": chars}}
    out["bytes_utf8"] = p.stat().st_size
    if tokenizer is not None:
        out["tokens"] = _summary(tokens)
        out["lengths"]["tokens"] = tokens
    return out


def plot_length_histogram(stats: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """PNG histogram(s) of the lengths in `stats["lengths"]` (log-spaced bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in stats["lengths"].items() if v}
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(5 * max(1, len(series)), 3.5), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items(), strict=False):
        lo, hi = max(1, min(values)), max(values) + 1
        bins = np.unique(np.geomspace(lo, hi, 40).astype(int))
        ax.hist(values, bins=bins if len(bins) > 1 else 10)
        ax.set_xscale("log")
        ax.set_xlabel(f"length ({name})")
        ax.set_ylabel("count")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def dumps(stats: dict[str, Any]) -> str:
    """Stats as JSON without the raw length lists."""
    return json.dumps({k: v for k, v in stats.items() if k != "lengths"}, ensure_ascii=False, indent=1)
