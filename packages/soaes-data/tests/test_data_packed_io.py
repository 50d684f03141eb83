"""Packed datasets on disk: Parquet shards + manifest, read back identically, tokenizer hash enforced."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from soaes_core import read_manifest, verify_outputs
from soaes_core.errors import DataError, IntegrityError
from soaes_data.packed_io import read_packed_dataset, read_packed_meta, tokenizer_sha256, write_packed_dataset
from soaes_data.packing import pack_examples

META = {"tokenizer_sha256": "abc", "chat_template": None, "max_length": 16, "packed": True}


def _examples() -> list[dict[str, Any]]:
    exs = [{"input_ids": list(range(1, n + 1)), "labels": [-100, *range(2, n + 1)]} for n in (3, 7, 5, 9, 2)]
    return pack_examples(exs, 16)


def test_round_trip(tmp_path: Path) -> None:
    rows = _examples()
    out = write_packed_dataset(tmp_path / "ds", rows, meta=META, rows_per_shard=2,
                               rejects=[{"line": 3, "reason": "bad"}])
    ds = read_packed_dataset(out)
    assert ds.column_names == ["input_ids", "labels", "position_ids", "seq_lengths"]
    assert [dict(r) for r in ds] == rows
    meta = read_packed_meta(out)
    assert meta["max_length"] == 16 and meta["packed"] is True and meta["rows"] == len(rows)
    assert len(meta["shards"]) == (len(rows) + 1) // 2
    assert meta["tokens"] == 26 and meta["sequences"] == 5
    assert read_manifest(out)["counts"]["rejected"] == 1
    assert json.loads((out / "rejects.jsonl").read_text())["reason"] == "bad"
    assert verify_outputs(out) == []


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="lacks"):
        write_packed_dataset(tmp_path / "a", _examples(), meta={"max_length": 16})
    with pytest.raises(DataError, match="tokens; expected"):
        write_packed_dataset(tmp_path / "b", _examples(), meta={**META, "max_length": 8})
    with pytest.raises(DataError, match="no examples"):
        write_packed_dataset(tmp_path / "c", [], meta=META)
    assert not (tmp_path / "c").exists()
    with pytest.raises(DataError, match="not a packed dataset"):
        read_packed_dataset(tmp_path)
    out = write_packed_dataset(tmp_path / "d", _examples(), meta=META)
    (out / "data-00000.parquet").unlink()
    with pytest.raises(IntegrityError, match="missing shard"):
        read_packed_dataset(out)


def test_tokenizer_hash_checked(tmp_path: Path, embedded_tokenizer: Any, qwen25_tokenizer: Any) -> None:
    h = tokenizer_sha256(embedded_tokenizer)
    assert h == tokenizer_sha256(copy.deepcopy(embedded_tokenizer))
    assert h != tokenizer_sha256(qwen25_tokenizer)  # different chat template
    out = write_packed_dataset(tmp_path / "ds", _examples(), meta={**META, "tokenizer_sha256": h})
    assert read_packed_dataset(out, tokenizer=embedded_tokenizer).num_rows > 0
    with pytest.raises(IntegrityError, match="different tokenizer"):
        read_packed_dataset(out, tokenizer=qwen25_tokenizer)
