"""Stage data: CPT windows, SFT masks + packing, tokenized datasets, and one clear error per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soaes_core.errors import DataError
from soaes_train.config import DataConfig
from soaes_train.data import prepare_data, resolve_data_path, truncate_packed_row


def test_cpt_jsonl_windows(embedded_tokenizer, text_jsonl: Path) -> None:
    d = prepare_data(DataConfig(paths=[str(text_jsonl)], max_length=64), "cpt", embedded_tokenizer)
    assert d.packed and d.counts["records"] == 20
    assert all(len(r["input_ids"]) <= 64 for r in d.rows)
    assert all(r["labels"][0] == -100 and r["position_ids"][0] == 0 for r in d.rows)
    joined = DataConfig(paths=[str(text_jsonl)], max_length=64, separate_documents=False)
    d2 = prepare_data(joined, "cpt", embedded_tokenizer)
    assert all(r["position_ids"] == list(range(len(r["input_ids"]))) for r in d2.rows)


def test_sft_packed_and_padded(embedded_tokenizer, chat_jsonl: Path) -> None:
    packed = prepare_data(DataConfig(paths=[str(chat_jsonl)], max_length=128), "sft", embedded_tokenizer)
    padded = prepare_data(DataConfig(paths=[str(chat_jsonl)], max_length=128, packing=False), "sft",
                          embedded_tokenizer)
    assert packed.packed and not padded.packed
    assert len(padded.rows) == 24 and len(packed.rows) < 24
    assert packed.counts["tokens"] == padded.counts["tokens"]
    assert packed.counts["supervised_tokens"] == padded.counts["supervised_tokens"] > 0
    # assistant-only loss: the user turn is masked
    assert padded.rows[0]["labels"][:5] == [-100] * 5


def test_overlong_truncate_counts_or_errors(embedded_tokenizer, chat_jsonl: Path) -> None:
    d = prepare_data(DataConfig(paths=[str(chat_jsonl)], max_length=50), "sft", embedded_tokenizer)
    assert d.counts["truncated"] > 0
    assert d.counts["truncated"] + d.counts["rejected"] <= 24
    assert all(len(r["input_ids"]) <= 50 for r in d.rows)
    with pytest.raises(DataError, match=r"chat\.jsonl:\d+: field 'messages': \d+ tokens > data.max_length 50"):
        prepare_data(DataConfig(paths=[str(chat_jsonl)], max_length=50, overlong="error"), "sft", embedded_tokenizer)


def test_missing_required_field_names_file_and_line(embedded_tokenizer, chat_jsonl: Path, tmp_path: Path) -> None:
    lines = chat_jsonl.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["conversation"] = bad.pop("messages")
    lines[2] = json.dumps(bad)
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field 'messages': missing required field"):
        prepare_data(DataConfig(paths=[str(p)]), "sft", embedded_tokenizer)
    with pytest.raises(DataError, match=r"field 'body'"):
        prepare_data(DataConfig(paths=[str(p)], text_field="body"), "cpt", embedded_tokenizer)


def test_parquet_missing_column(embedded_tokenizer, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "tok.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [4, 5]]}), p)
    with pytest.raises(DataError, match=r"tok\.parquet: field 'labels': dataset lacks required column 'labels'"):
        prepare_data(DataConfig(paths=[str(p)]), "sft", embedded_tokenizer)
    d = prepare_data(DataConfig(paths=[str(p)]), "cpt", embedded_tokenizer)  # CPT: labels = input_ids
    assert d.counts["tokens"] == 5


def test_reads_soaes_data_packed_dataset(embedded_tokenizer, chat_jsonl: Path, tmp_path: Path) -> None:
    from soaes_data.tokenize_pack import pack_sft_file

    out = pack_sft_file(chat_jsonl, tmp_path / "packed", embedded_tokenizer, 128)
    d = prepare_data(DataConfig(paths=[str(out)], max_length=128), "sft", embedded_tokenizer)
    direct = prepare_data(DataConfig(paths=[str(chat_jsonl)], max_length=128), "sft", embedded_tokenizer)
    assert d.counts["tokens"] == direct.counts["tokens"]
    assert d.counts["supervised_tokens"] == direct.counts["supervised_tokens"]
    # rows longer than this stage's max_length: truncated and counted, or an error
    short = prepare_data(DataConfig(paths=[str(out)], max_length=100), "sft", embedded_tokenizer)
    assert short.counts["truncated"] > 0 and all(len(r["input_ids"]) <= 100 for r in short.rows)
    with pytest.raises(DataError, match=r"data\.max_length 100"):
        prepare_data(DataConfig(paths=[str(out)], max_length=100, overlong="error"), "sft", embedded_tokenizer)


def test_no_such_path_and_samples(embedded_tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        prepare_data(DataConfig(paths=[str(tmp_path / "nope.jsonl")]), "sft", embedded_tokenizer)
    assert resolve_data_path("sample:sft/expert_pool.jsonl").is_file()


def test_truncate_packed_row() -> None:
    row = {"input_ids": list(range(10)), "labels": list(range(10)), "position_ids": [0, 1, 2, 3, 0, 1, 2, 0, 1, 2],
           "seq_lengths": [4, 3, 3]}
    t = truncate_packed_row(row, 6)
    assert t["seq_lengths"] == [4, 2] and len(t["input_ids"]) == 6


def test_conversation_without_assistant_turn_is_rejected_with_reason(embedded_tokenizer, chat_jsonl: Path,
                                                                      tmp_path: Path) -> None:
    lines = chat_jsonl.read_text().splitlines()
    lines.insert(1, json.dumps({"messages": [{"role": "user", "content": "only a question"}]}))
    p = tmp_path / "with_reject.jsonl"
    p.write_text("\n".join(lines) + "\n")
    d = prepare_data(DataConfig(paths=[str(p)], max_length=128), "sft", embedded_tokenizer)
    assert d.counts["records"] == 25 and d.counts["rejected"] == 1 and d.counts["sequences"] == 24
    assert d.rejects[0]["line"] == 2 and "no assistant turn" in d.rejects[0]["reason"]
    bad = tmp_path / "malformed.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"malformed\.jsonl:1: .*role 'robot'"):
        prepare_data(DataConfig(paths=[str(bad)]), "sft", embedded_tokenizer)
