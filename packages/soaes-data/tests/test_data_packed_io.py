"""Packed datasets on disk: Parquet shards + manifest, read back identically, tokenizer hash enforced."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from soaes_core import read_manifest, tokenizer_fingerprint, verify_outputs
from soaes_core.errors import DataError, IntegrityError
from soaes_data.packed_io import read_packed_dataset, read_packed_meta, write_packed_dataset
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
    """Packed rows are token ids: the check compares the id mapping (another chat template still fits)."""
    h = tokenizer_fingerprint(embedded_tokenizer, ids_only=True)
    assert h == tokenizer_fingerprint(copy.deepcopy(embedded_tokenizer), ids_only=True)
    out = write_packed_dataset(tmp_path / "ds", _examples(), meta={**META, "tokenizer_sha256": h})
    assert read_packed_dataset(out, tokenizer=embedded_tokenizer).num_rows > 0
    assert read_packed_dataset(out, tokenizer=qwen25_tokenizer).num_rows > 0  # same ids, other template
    other = copy.deepcopy(embedded_tokenizer)
    other.add_tokens(["<soaes_extra_token>"])
    with pytest.raises(IntegrityError, match="different tokenizer"):
        read_packed_dataset(out, tokenizer=other)
    # a dataset packed by an older soaes (unversioned hash): one clear line saying so
    old = write_packed_dataset(tmp_path / "old", _examples(), meta={**META, "tokenizer_sha256": "ab" * 32})
    with pytest.raises(IntegrityError, match=r"old.*older soaes with another hashing algorithm"):
        read_packed_dataset(old, tokenizer=embedded_tokenizer)


def test_never_replaces_what_it_did_not_write(tmp_path: Path) -> None:
    """Writing replaces the directory: only a new, empty or previous packed output may be replaced."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(DataError, match="not a previous `soaes-data pack` output"):
        write_packed_dataset(mine, _examples(), meta=META)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = write_packed_dataset(empty, _examples(), meta=META)
    again = write_packed_dataset(out, _examples()[:1], meta=META)  # a previous output: replaced
    assert read_packed_meta(again)["rows"] == 1
    (out / "extra.txt").write_text("user file", encoding="utf-8")
    with pytest.raises(DataError, match=r"did not write \(extra.txt\)"):
        write_packed_dataset(out, _examples(), meta=META)
    assert (out / "extra.txt").read_text(encoding="utf-8") == "user file"
    src = tmp_path / "in" / "deep" / "train.jsonl"
    src.parent.mkdir(parents=True)
    src.write_text("{}\n", encoding="utf-8")
    with pytest.raises(DataError, match="is, or contains, the input"):
        write_packed_dataset(tmp_path / "in", _examples(), meta=META, inputs={"sft": src})
    with pytest.raises(DataError, match="not a directory"):
        write_packed_dataset(src, _examples(), meta=META)
    assert src.read_text(encoding="utf-8") == "{}\n"
