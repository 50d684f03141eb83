"""`soaes-data curate` end to end on the shipped sample: counts balance at every stage, planted duplicates
removed, known strings survive, bad input accounted for, re-runs skip and interrupted runs resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from soaes_core import read_manifest
from soaes_core.errors import ConfigError, DataError
from soaes_data import pipeline
from soaes_data.pipeline import load_recipe, run_recipe
from soaes_data.samples import make_samples, sample_path


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("curate") / "out"
    run_recipe(load_recipe(sample_path("recipe.yaml"), {"output_dir": str(out)}))
    return out


def test_counts_balance_every_stage(curated: Path) -> None:
    final = read_manifest(curated / "final")
    stages = final["stages"]
    assert [s["name"] for s in stages] == ["read", "clean", "pii", "length", "language", "quality", "dedup_exact",
                                           "dedup_near", "relevance"]
    for prev, cur in itertools.pairwise(stages):
        assert cur["in"] == prev["kept"]
    for s in stages:
        assert s["in"] == s["kept"] + s["dropped"] == s["kept"] + sum(s["dropped_by_reason"].values())
        stage_dir = next((curated / "stages").glob(f"*_{s['name']}"))
        assert len(_lines(stage_dir / "rejects.jsonl")) == s["dropped"]
        assert len(_lines(stage_dir / "docs.jsonl")) == s["kept"]
    docs = _lines(curated / "final" / "docs.jsonl")
    rejects = _lines(curated / "final" / "rejects.jsonl")
    assert final["counts"]["in"] == 37 == len(docs) + len(rejects)
    assert final["counts"]["kept"] == len(docs) and final["counts"]["dropped"] == len(rejects)
    assert (curated / "final" / "docs.parquet").is_file()


def test_planted_duplicates_removed(curated: Path) -> None:
    rejects = _lines(curated / "final" / "rejects.jsonl")
    read = {d["meta"].get("line"): d["id"] for d in _lines(next((curated / "stages").glob("*_read")) / "docs.jsonl")
            if d["source"].endswith("articles.jsonl")}
    by_line = {r["line"]: r["reason"] for r in rejects if r["source"].endswith("articles.jsonl")}
    assert by_line[11] == f"exact_duplicate_of:{read[2]}"
    assert by_line[16] == f"near_duplicate_of:{read[3]}"
    assert by_line[23] == f"near_duplicate_of:{read[5]}"
    clusters = json.loads(next((curated / "stages").glob("*_dedup_near")).joinpath("clusters.json").read_text())
    assert clusters == {read[3]: [read[16]], read[5]: [read[23]]}
    texts = [d["text"] for d in _lines(curated / "final" / "docs.jsonl")]
    assert texts.count(make_samples.DOMAIN_DOCS[1][1]) == 1


def test_known_strings_and_cleaning_in_output(curated: Path) -> None:
    docs = _lines(curated / "final" / "docs.jsonl")
    by_format = {d["meta"].get("format"): d["text"] for d in docs if d["meta"].get("format") != "txt"}
    gb = next(d for d in docs if d["source"].endswith("notice_gb18030.txt"))
    assert make_samples.KNOWN_GB18030 in gb["text"] and gb["meta"]["encoding"] == "gb18030"
    assert make_samples.KNOWN_HTML in by_format["html"]
    assert make_samples.KNOWN_DOCX in by_format["docx"]
    assert make_samples.KNOWN_PDF in by_format["pdf"] and make_samples.PDF_HEADER not in by_format["pdf"]
    all_text = "\n".join(d["text"] for d in docs)
    assert "13812345678" not in all_text and "[PHONE]" in all_text
    assert "国有资产监督管理委员会负责监管" in all_text  # Traditional → Simplified
    assert "红烧肉" not in all_text and "Weekend hiking" not in all_text


def test_rerun_skips_and_config_change_reruns_downstream(curated: Path, tmp_path: Path) -> None:
    reports = run_recipe(load_recipe(sample_path("recipe.yaml"), {"output_dir": str(curated)}))
    assert all(r.skipped for r in reports)
    reports = run_recipe(load_recipe(sample_path("recipe.yaml"), {"output_dir": str(curated),
                                                                  "relevance.min_score": 0.9}))
    assert [r.skipped for r in reports] == [True] * 8 + [False]
    run_recipe(load_recipe(sample_path("recipe.yaml"), {"output_dir": str(curated)}))  # restore


def test_interrupted_run_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, curated: Path) -> None:
    out = tmp_path / "out"
    cfg = load_recipe(sample_path("recipe.yaml"), {"output_dir": str(out)})
    real = pipeline.run_stage

    def crash(name: str, *args: Any) -> Any:
        if name == "dedup_near":
            raise KeyboardInterrupt
        return real(name, *args)

    monkeypatch.setattr(pipeline, "run_stage", crash)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(cfg)
    assert not list((out / "stages").glob("*_dedup_near")) and not (out / "final").exists()
    monkeypatch.setattr(pipeline, "run_stage", real)
    reports = run_recipe(cfg)
    assert [r.skipped for r in reports] == [True] * 7 + [False, False]
    assert (out / "final" / "docs.jsonl").read_text() == (curated / "final" / "docs.jsonl").read_text()


def _bad_corpus(tmp_path: Path) -> Path:
    d = tmp_path / "bad"
    d.mkdir()
    good = json.dumps({"text": make_samples.DOMAIN_DOCS[0][1]}, ensure_ascii=False)
    (d / "a.jsonl").write_text(f"{good}\n{{not json\n{json.dumps({'body': 'x'})}\n", encoding="utf-8")
    (d / "b.txt").write_bytes(bytes(range(256)) * 8)
    (d / "c.pdf").write_bytes(b"%PDF-1.4 broken")
    (d / "d.txt").write_bytes(b"")
    (d / "e.txt").write_text(make_samples.DOMAIN_DOCS[3][1], encoding="utf-8")
    return d


def test_bad_input_nothing_lost(tmp_path: Path) -> None:
    d = _bad_corpus(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"inputs": [str(d)], "output_dir": str(tmp_path / "o"), "on_error": "skip",
                                      "stages": ["read", "clean", "dedup_exact"]}), encoding="utf-8")
    run_recipe(load_recipe(recipe))
    read = read_manifest(next((tmp_path / "o" / "stages").glob("*_read")))
    assert read["counts"] == {"in": 7, "kept": 2, "dropped": 5, "dropped_by_reason": {"read_error": 5}}
    rejects = _lines(tmp_path / "o" / "final" / "rejects.jsonl")
    reasons = {(Path(r["source"]).name, r["line"]): r["reason"] for r in rejects}
    assert "invalid JSON" in reasons[("a.jsonl", 2)]
    assert "field 'text'" in reasons[("a.jsonl", 3)] and "missing field" in reasons[("a.jsonl", 3)]
    assert "undecodable" in reasons[("b.txt", None)]
    assert "PDF" in reasons[("c.pdf", None)]
    assert "empty file" in reasons[("d.txt", None)]
    # strict mode: the first problem is a clear error naming file and line
    recipe.write_text(yaml.safe_dump({"inputs": [str(d)], "output_dir": str(tmp_path / "o2"), "on_error": "raise"}),
                      encoding="utf-8")
    with pytest.raises(DataError, match=r"a.jsonl:2: invalid JSON"):
        run_recipe(load_recipe(recipe))


def test_recipe_errors(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inputs: [x]\noutput_dir: o\nstages: [read, dedupe]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown stage"):
        load_recipe(recipe)
    recipe.write_text("inputs: [x]\noutput_dir: o\ndedup: {treshold: 0.5}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="threshold"):
        load_recipe(recipe)
    recipe.write_text("inputs: [missing]\noutput_dir: o\n", encoding="utf-8")
    with pytest.raises(DataError, match="no such file"):
        run_recipe(load_recipe(recipe, {"output_dir": str(tmp_path / "o")}))


def test_num_proc_gives_same_result(tmp_path: Path) -> None:
    docs = [{"text": f"{make_samples.DOMAIN_DOCS[k % 20][1]}编号{k}。"} for k in range(1200)]
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    outs = []
    for n in (1, 2):
        recipe = tmp_path / f"r{n}.yaml"
        recipe.write_text(yaml.safe_dump({"inputs": [str(src)], "output_dir": str(tmp_path / f"o{n}"), "num_proc": n,
                                          "stages": ["read", "clean", "pii", "quality", "dedup_near"],
                                          "output_format": "jsonl"}), encoding="utf-8")
        run_recipe(load_recipe(recipe))
        outs.append((tmp_path / f"o{n}" / "final" / "docs.jsonl").read_text())
    assert outs[0] == outs[1]
    # copies differing only in "编号k" are near-duplicates of the first of their text (MinHash may let a few
    # of the shortest texts with 3-digit k, true Jaccard just above 0.8, through)
    assert 20 <= len(outs[0].splitlines()) <= 40
