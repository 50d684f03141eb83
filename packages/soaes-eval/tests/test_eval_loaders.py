"""Local benchmark readers: public-release layouts, and one clear error per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soaes_core.errors import ConfigError, DataError
from soaes_eval.tasks.loaders import (
    SAMPLES_DIR,
    load_ceval_subject,
    load_cmmlu_subject,
    load_domain,
    read_choice_csv,
    resolve_data_dir,
)

CMMLU_HEADER = ",Question,A,B,C,D,Answer\n"


def _cmmlu(tmp: Path, test_body: str, header: str = CMMLU_HEADER) -> Path:
    for split in ("test", "dev"):
        (tmp / split).mkdir(parents=True, exist_ok=True)
        (tmp / split / "agronomy.csv").write_text(header + test_body, encoding="utf-8")
    return tmp


def test_samples_load_in_public_layouts() -> None:
    ds = load_cmmlu_subject("agronomy", cmmlu_dir=str(SAMPLES_DIR / "cmmlu"), version=1.0)
    assert set(ds) == {"test", "dev"} and ds["test"][0]["Answer"] in "ABCD"
    assert {"Question", "A", "B", "C", "D", "Answer"} <= set(ds["test"].column_names)
    ce = load_ceval_subject("law", data_dir=str(SAMPLES_DIR))
    assert set(ce) == {"val", "dev"} and ce["dev"][0]["explanation"]
    dom = load_domain("qa.jsonl", data_dir=str(SAMPLES_DIR))
    assert len(dom["test"]) == 8 and set(dom["test"].column_names) == {"id", "prompt", "reference"}


def test_csv_with_quotes_bom_and_blank_lines(tmp_path: Path) -> None:
    body = '0,"含逗号, 和""引号""的题目",甲,乙,丙,丁, C \n\n1,第二题,1,2,3,4,A\n'
    path = _cmmlu(tmp_path, body, header="\ufeff" + CMMLU_HEADER) / "test" / "agronomy.csv"
    rows = read_choice_csv(path, ("Question", "A", "B", "C", "D", "Answer"), "Answer")
    assert [r["Question"] for r in rows] == ['含逗号, 和"引号"的题目', "第二题"]
    assert rows[0]["Answer"] == "C"  # surrounding spaces stripped


def test_missing_column(tmp_path: Path) -> None:
    _cmmlu(tmp_path, "0,题,1,2,3,4\n", header=",Question,A,B,C,D\n")
    with pytest.raises(DataError, match=r"agronomy\.csv:1: field 'Answer': missing column"):
        load_cmmlu_subject("agronomy", cmmlu_dir=str(tmp_path))


def test_answer_outside_a_to_d(tmp_path: Path) -> None:
    _cmmlu(tmp_path, "0,题,1,2,3,4,A\n1,题二,1,2,3,4,E\n")
    with pytest.raises(DataError, match=r"agronomy\.csv:3: field 'Answer': answer 'E' is not one of A, B, C, D"):
        load_cmmlu_subject("agronomy", cmmlu_dir=str(tmp_path))


def test_wrong_cell_count_and_empty_files(tmp_path: Path) -> None:
    _cmmlu(tmp_path, "0,题,1,2,3,A\n")
    with pytest.raises(DataError, match=r":2: 6 cells but the header has 7"):
        load_cmmlu_subject("agronomy", cmmlu_dir=str(tmp_path))
    _cmmlu(tmp_path, "")
    with pytest.raises(DataError, match="no items in file"):
        load_cmmlu_subject("agronomy", cmmlu_dir=str(tmp_path))
    (tmp_path / "test" / "agronomy.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        load_cmmlu_subject("agronomy", cmmlu_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"anatomy\.csv: file not found"):
        load_cmmlu_subject("anatomy", cmmlu_dir=str(tmp_path))


def test_ceval_missing_column(tmp_path: Path) -> None:
    for split in ("val", "dev"):
        (tmp_path / split).mkdir()
        (tmp_path / split / f"law_{split}.csv").write_text("id,question,A,B,C,D\n0,q,1,2,3,4\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"law_val\.csv:1: field 'answer'"):
        load_ceval_subject("law", ceval_dir=str(tmp_path))


def test_domain_records(tmp_path: Path) -> None:
    (tmp_path / "qa.jsonl").write_text(json.dumps({"prompt": "问", "reference": "答"}, ensure_ascii=False) + "\n"
                                       + json.dumps({"prompt": "问二"}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"qa\.jsonl:2: field 'reference'"):
        load_domain("qa.jsonl", domain_dir=str(tmp_path))
    (tmp_path / "report.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        load_domain("report.jsonl", domain_dir=str(tmp_path))


def test_data_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SOAES_CMMLU_DIR", "SOAES_EVAL_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SOAES_CACHE", str(tmp_path / "cache"))  # nothing fetched: the error says how to get it
    with pytest.raises(ConfigError, match=r"no cmmlu data directory.*or run `soaes-eval fetch cmmlu`"):
        resolve_data_dir("cmmlu", {"version": 1.0})
    with pytest.raises(ConfigError, match=r"no domain data directory: .* set SOAES_DOMAIN_DIR; samples"):
        resolve_data_dir("domain", {})
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_data_dir("cmmlu", {"cmmlu_dir": str(tmp_path / "nope")})
    monkeypatch.setenv("SOAES_EVAL_DATA_DIR", str(SAMPLES_DIR))
    assert resolve_data_dir("cmmlu", {}) == SAMPLES_DIR / "cmmlu"
    assert resolve_data_dir("cmmlu", {"cmmlu_dir": str(tmp_path)}) == tmp_path  # explicit wins
