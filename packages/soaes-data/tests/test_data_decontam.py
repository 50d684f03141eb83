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


QUESTION_A = "国有资本经营预算支出主要用于哪些方面的资本性支出"
QUESTION_B = "企业国有资产交易应当遵循等价有偿和公开公平公正的原则吗"
QUESTION_C = "下列关于注册会计师审计独立性要求的表述中正确的是哪一项"


def _benchmarks(root: Path) -> Path:
    """A parent folder with cmmlu/ (test|dev/<subject>.csv) and ceval/ (dev|val|test/<subject>_<split>.csv)."""
    files = {
        "cmmlu/test/economics.csv": f",Question,A,B,C,D,Answer\n0,{QUESTION_A},甲,乙,丙,丁,B\n1,短题？,甲,乙,丙,丁,A\n",
        "cmmlu/dev/economics.csv": ",Question,A,B,C,D,Answer\n0,示例题？,甲,乙,丙,丁,A\n",
        "ceval/val/law_val.csv": f"id,question,A,B,C,D,answer,explanation\n0,{QUESTION_B},是,否,不一定,无关,A,\n",
        "ceval/dev/law_dev.csv": "id,question,A,B,C,D,answer,explanation\n0,示例？,是,否,不一定,无关,A,因为\n",
        "ceval/test/accountant_test.csv": f"id,question,A,B,C,D\n0,{QUESTION_C},甲,乙,丙,丁\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def test_benchmark_folders_report_per_benchmark_and_subject(tmp_path: Path) -> None:
    from soaes_data.decontam import OverlapReport, is_contaminated, reject_reason

    root = _benchmarks(tmp_path / "bench")
    cfg = DecontamConfig(eval_dirs=[str(root)], use_fetched=False)
    assert cfg.benchmark_dirs() == {"ceval": root / "ceval", "cmmlu": root / "cmmlu"} and cfg.has_sources()
    # a single release folder is named by its layout
    assert DecontamConfig(eval_dirs=[str(root / "ceval")], use_fetched=False).benchmark_dirs() == {
        "ceval": root / "ceval"}
    index = NgramIndex.from_config(cfg)
    assert index.describe() == {"ceval": {"accountant": 1, "law": 2}, "cmmlu": {"economics": 3}}

    docs = {"a": f"网页：{QUESTION_A}。另见{QUESTION_C}", "b": f"转载 {QUESTION_B} 答案是A",
            "c": "完全无关的一段文字，讲的是园艺和烹饪，与任何考试无关。", "d": "甲乙丙丁 ABCD 0 1 2"}
    halves = [OverlapReport(index.describe()), OverlapReport(index.describe())]
    reasons = {}
    for k, (rid, text) in enumerate(docs.items()):
        found = index.overlaps(text)
        if is_contaminated(found):
            reasons[rid] = reject_reason(found)
        halves[k % 2].add(rid, found)
    # the reason names the item sharing most n-grams (QUESTION_C is longer than QUESTION_A)
    assert reasons == {"a": "contaminated:ceval/accountant", "b": "contaminated:ceval/law"}
    # reports of two tasks merge into the report of one (also through their JSON form)
    merged = OverlapReport.from_dict(json.loads(json.dumps(halves[0].to_dict()))).merge(halves[1]).to_dict()
    assert merged["records_checked"] == 4 and merged["records_contaminated"] == 2
    cm, ce = merged["benchmarks"]["cmmlu"], merged["benchmarks"]["ceval"]
    assert cm["items_indexed"] == 3 and cm["records"] == 1 and ce["items_indexed"] == 3 and ce["records"] == 2
    assert set(ce["subjects"]) == {"law", "accountant"} and ce["subjects"]["accountant"]["records"] == 1
    eco = cm["subjects"]["economics"]
    assert eco["eval_items"] == 1 and eco["eval_item_ids"] == [f"{root / 'cmmlu' / 'test' / 'economics.csv'}#0"]
    assert eco["examples"][0]["record"] == "a" and eco["examples"][0]["example"] in normalise(QUESTION_A)
    assert eco["ngrams"] == len(normalise(QUESTION_A)) - 13 + 1  # every 13-gram of the question, once


def normalise(text: str) -> str:
    from soaes_data.dedup import normalise_for_dedup

    return normalise_for_dedup(text)


def test_fetched_benchmarks_are_found_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from soaes_data.decontam import FETCH_MARKER, fetched_benchmark_dirs

    monkeypatch.setenv("SOAES_CACHE", str(tmp_path / "cache"))
    assert fetched_benchmark_dirs() == {} and not DecontamConfig().has_sources()
    bench = tmp_path / "cache" / "benchmarks"
    _benchmarks(tmp_path / "staging")
    (tmp_path / "staging" / "ceval").rename(bench.mkdir(parents=True) or bench / "ceval")
    assert fetched_benchmark_dirs() == {}  # unpacked but not marked complete: not used
    (bench / "ceval" / FETCH_MARKER).write_text("{}", encoding="utf-8")
    assert fetched_benchmark_dirs() == {"ceval": bench / "ceval"}
    assert DecontamConfig().has_sources() and not DecontamConfig(use_fetched=False).has_sources()
    index = NgramIndex.from_config(DecontamConfig(eval_files=[]))
    assert index.overlaps(f"……{QUESTION_B}……")[0].subject == "law"
    # the same folder given explicitly and fetched is indexed once
    assert DecontamConfig(eval_dirs=[str(bench / "ceval")]).benchmark_dirs() == {"ceval": bench / "ceval"}


def test_benchmark_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="benchmark folder not found"):
        DecontamConfig(eval_dirs=[str(tmp_path / "nope")], use_fetched=False).benchmark_dirs()
    (tmp_path / "empty" / "other").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no subject CSVs \(expected <split>/<subject>.csv"):
        DecontamConfig(eval_dirs=[str(tmp_path / "empty")], use_fetched=False).benchmark_dirs()
    (tmp_path / "odd" / "test").mkdir(parents=True)
    (tmp_path / "odd" / "test" / "x.csv").write_text("foo,bar\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x\.csv:1: no question/choice columns"):
        NgramIndex(dirs=[tmp_path / "odd"])


def test_cli_decontaminate_against_benchmark_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from soaes_data.cli import main

    monkeypatch.setenv("SOAES_CACHE", str(tmp_path / "cache"))  # nothing fetched
    root = _benchmarks(tmp_path / "bench")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"id": "x", "text": f"摘录：{QUESTION_B}"}, {"id": "y", "text": "园艺与烹饪的一段无关文字，长度足够长。"}]),
        encoding="utf-8")
    r = CliRunner().invoke(main, ["decontaminate", str(docs), "--eval-dir", str(root), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"in": 2, "kept": 1, "dropped": 1}
    rejects = [json.loads(line) for line in (tmp_path / "o" / "rejects.jsonl").read_text(encoding="utf-8").split("\n")
               if line]
    assert [(x["id"], x["reason"]) for x in rejects] == [("x", "contaminated:ceval/law")]
    rep = json.loads((tmp_path / "o" / "overlap_report.json").read_text(encoding="utf-8"))
    assert rep["records_checked"] == 2 and rep["records_contaminated"] == 1
    assert rep["benchmarks"]["ceval"]["subjects"]["law"]["records"] == 1 and rep["benchmarks"]["cmmlu"]["records"] == 0
    r = CliRunner().invoke(main, ["decontaminate", str(docs), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "nothing to decontaminate against" in r.output


def test_hash_index_pickles_and_never_reports_a_collision(tmp_path: Path) -> None:
    import pickle

    import numpy as np

    from soaes_data.decontam import ngram_hashes

    index = NgramIndex(dirs={"cmmlu": _benchmarks(tmp_path / "b") / "cmmlu"})
    leaked = f"材料：{QUESTION_A}。"
    copy = pickle.loads(pickle.dumps(index))  # what an executor worker gets
    assert copy.overlaps(leaked) == index.overlaps(leaked) and copy.overlaps(leaked)[0].subject == "economics"
    # forge hash "collisions": every n-gram hash of a clean text now points at item 0, whose text lacks them
    clean = "完全无关的一段文字，讲的是园艺和烹饪，与任何考试无关。"
    forged = ngram_hashes(np.frombuffer(normalise(clean).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64), 13)
    keys = np.concatenate([copy.keys, forged])
    order = np.argsort(keys, kind="stable")
    copy.keys, copy.owner = keys[order], np.concatenate([copy.owner, np.zeros(len(forged), np.int32)])[order]
    copy._filter = None
    assert copy.overlaps(clean) == [] and copy.overlaps(leaked) == index.overlaps(leaked)
