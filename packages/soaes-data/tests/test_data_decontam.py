"""Decontamination: long n-gram overlaps with eval items are found and reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soaes_core.errors import DataError
from soaes_data.decontam import DecontamConfig, NgramIndex, read_eval_items


def test_overlaps_found_and_reported(tmp_path: Path) -> None:
    evals = tmp_path / "cmmlu.jsonl"
    evals.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in [
        {"question": "国有资本经营预算支出主要用于哪些方面？", "choices": ["A", "B"], "answer": "A"},
        {"question": "下列哪项属于企业国有资产交易的原则？", "answer": "等价有偿和公开公平公正"},
    ]) + "\n", encoding="utf-8")
    csv = tmp_path / "ceval.csv"
    csv.write_text("id,question,A\n0,三角形内角和等于多少度？请给出答案,180\n", encoding="utf-8")
    index = NgramIndex([evals, csv], n=13)
    assert index.items == 3
    clean = "国有企业应当建立健全合规管理体系，设立首席合规官。"
    assert index.overlaps(clean) == []
    leaked = "训练文本：国有资本经营预算支出主要用于哪些方面？答案是补充社保基金。"
    found = index.overlaps(leaked)
    assert len(found) == 1 and found[0].eval_file == str(evals) and found[0].eval_item == 0 and found[0].count >= 5
    # formatting differences (spaces, punctuation) do not hide an overlap
    assert index.overlaps("三 角 形 内 角 和 等 于 多 少 度 ， 请 给 出 答 案")[0].eval_file == str(csv)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_eval_items(tmp_path / "x.jsonl")
    bad = tmp_path / "b.jsonl"
    bad.write_text("{}\n{oops\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"b.jsonl:2"):
        read_eval_items(bad)
    with pytest.raises(ValueError):
        DecontamConfig(ngram=2)


def test_decontaminate_records(tmp_path: Path) -> None:
    from soaes_data.decontam import decontaminate_records

    evals = tmp_path / "e.txt"
    evals.write_text("国有资本经营预算支出主要用于哪些方面\n", encoding="utf-8")
    recs = [{"id": "a", "messages": [{"role": "user", "content": "国有资本经营预算支出主要用于哪些方面？"},
                                     {"role": "assistant", "content": "略"}]},
            {"id": "b", "text": "完全无关的一段文字，讲的是园艺和烹饪。"}]
    kept, rejects, report = decontaminate_records(recs, NgramIndex([evals], 13))
    assert [r["id"] for r in kept] == ["b"] and rejects[0]["reason"] == "contaminated:e.txt"
    assert report[0]["record"] == "a" and report[0]["eval_item"] == 0
