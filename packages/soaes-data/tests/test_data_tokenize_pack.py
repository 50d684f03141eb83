"""Tokenize-once packing of SFT JSONL and CPT corpora, with rejects accounted for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from soaes_core import read_manifest
from soaes_core.errors import DataError
from soaes_data.chat import encode_chat
from soaes_data.packed_io import read_packed_dataset, read_packed_meta
from soaes_data.samples import sample_path
from soaes_data.tokenize_pack import pack_cpt_corpus, pack_sft_file


def test_pack_sft_sample(tmp_path: Path, embedded_tokenizer: Any) -> None:
    src = sample_path("sft/expert_pool.jsonl")
    out = pack_sft_file(src, tmp_path / "p", embedded_tokenizer, 512, tokenizer_spec="embedded:smollm2-135m")
    ds = read_packed_dataset(out, tokenizer=embedded_tokenizer)
    meta = read_packed_meta(out)
    records = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()]
    assert meta["packed"] and meta["chat_template"] == embedded_tokenizer.chat_template
    assert sum(len(r["seq_lengths"]) for r in ds) == len(records)
    # every packed segment is exactly one encoded conversation (first label masked by packing)
    encoded = {tuple(encode_chat(embedded_tokenizer, r["messages"])["input_ids"]) for r in records}
    for row in ds:
        start = 0
        for n in row["seq_lengths"]:
            assert tuple(row["input_ids"][start:start + n]) in encoded
            start += n
    assert meta["packing_stats"]["utilisation"] > 0.5


def test_pack_sft_unpacked_and_rejects(tmp_path: Path, embedded_tokenizer: Any) -> None:
    src = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"}]}
    src.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"text": "x"}),
                              json.dumps({"messages": [{"role": "user", "content": "只有提问"}]})]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        pack_sft_file(src, tmp_path / "o", embedded_tokenizer, 64)
    out = pack_sft_file(src, tmp_path / "o", embedded_tokenizer, 64, packed=False, on_error="skip")
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4] and {r["kind"] for r in rejects} == {"invalid"}
    assert read_manifest(out)["counts"] == {"in": 4, "kept": 1, "dropped": 3, "truncated": 0,
                                            "dropped_by_reason": {"invalid": 3}, "rows": 1, "rejected": 3}
    ds = read_packed_dataset(out)
    assert ds[0]["position_ids"] == list(range(len(ds[0]["input_ids"])))


def test_pack_cpt_corpus(tmp_path: Path, embedded_tokenizer: Any) -> None:
    corpus = tmp_path / "c.jsonl"
    texts = ["国有资产监督管理。", "混合所有制改革。" * 20, "产权登记"]
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts) + "{}\n")
    out = pack_cpt_corpus([corpus], tmp_path / "cpt", embedded_tokenizer, 32, on_error="skip")
    ds = read_packed_dataset(out)
    eos = embedded_tokenizer.eos_token_id
    stream = [t for r in ds for t in r["input_ids"]]
    expected = [t for x in texts for t in [*embedded_tokenizer(x, add_special_tokens=False)["input_ids"], eos]]
    assert stream == expected
    assert all(len(r["input_ids"]) == 32 for r in list(ds)[:-1])
    assert read_manifest(out)["counts"]["dropped"] == 1 and read_manifest(out)["counts"]["kept"] == 3
    assert read_packed_meta(out)["separate_documents"] is True
