"""`soaes-data curate` end to end on the shipped sample (datatrove local executor): counts balance at every
stage, planted duplicates removed, known strings survive, bad input accounted for, re-runs skip, killed runs
resume at task granularity, the same documents are kept with 1 or 4 tasks (and on Ray, see
test_data_executors.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import make_samples
import pytest
import yaml

from soaes_core import read_manifest
from soaes_core.errors import ConfigError, DataError
from soaes_core.testing.killed import killed_atomic_writer, killed_file_write
from soaes_data.pipeline import load_curation_config, run_curation
from soaes_data.readers import FieldMap, iter_records
from soaes_data.samples import sample_path
from soaes_data.steps import RelevanceStep


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _load(path: Any, overrides: dict[str, Any] | None = None) -> Any:
    """The curation recipe, never decontaminating against benchmarks a user fetched into their cache."""
    return load_curation_config(path, {"decontaminate.use_fetched": False, **(overrides or {})})


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("curate") / "out"
    run_curation(_load(sample_path("recipe.yaml"), {"output_dir": str(out)}))
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
        assert read_manifest(stage_dir)["counts"]["kept"] == s["kept"]
    docs = _lines(curated / "final" / "docs.jsonl")
    rejects = _lines(curated / "final" / "rejects.jsonl")
    assert final["counts"]["in"] == 37 == len(docs) + len(rejects)
    assert final["counts"]["kept"] == len(docs) == stages[-1]["kept"] and final["counts"]["dropped"] == len(rejects)
    assert (curated / "final" / "docs.parquet").is_file()


def _article_ids() -> dict[int | None, str]:
    """Line number → content id of the sample's articles.jsonl."""
    path = sample_path("corpus") / "articles.jsonl"
    return {d.meta["line"]: d.id for d in iter_records(path, FieldMap()) if not isinstance(d, DataError)}


def test_planted_duplicates_removed(curated: Path) -> None:
    rejects = _lines(curated / "final" / "rejects.jsonl")
    read = _article_ids()
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
    reports = run_curation(_load(sample_path("recipe.yaml"), {"output_dir": str(curated)}))
    assert all(r.skipped for r in reports)
    reports = run_curation(_load(sample_path("recipe.yaml"), {"output_dir": str(curated),
                                                                  "relevance.min_score": 0.9}))
    # only the last segment re-runs: it starts by applying the dedup clusters (which are not recomputed)
    assert [r.skipped for r in reports] == [True] * 6 + [False] * 3
    assert reports[-1].counts["kept"] < reports[-2].counts["kept"]
    run_curation(_load(sample_path("recipe.yaml"), {"output_dir": str(curated)}))  # restore


def test_rerun_removes_temps_of_a_killed_run(curated: Path) -> None:
    """A run killed while writing a stage (or final/) leaves `stages/.NN_name.….tmp`; the next run removes it,
    even when that stage is already finished and skipped (issue 15, defect 9)."""
    done = next((curated / "stages").glob("*_length"))
    killed_atomic_writer(done)
    killed_atomic_writer(curated / "final")
    shard_dir = next(p for p in sorted((curated / "work").rglob("*")) if p.is_dir())
    shard = killed_file_write(shard_dir / "00000.jsonl")  # a task killed while writing its shard
    assert [p for p in (curated / "stages").iterdir() if p.name.endswith(".tmp")]
    reports = run_curation(_load(sample_path("recipe.yaml"), {"output_dir": str(curated)}))
    assert all(r.skipped for r in reports)
    assert not [p for p in [*curated.iterdir(), *(curated / "stages").iterdir()] if p.name.endswith(".tmp")]
    assert not shard.exists()


def test_interrupted_run_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, curated: Path) -> None:
    """A run killed in task 2 of 4 of a phase resumes at that task (datatrove's completion markers): tasks 0
    and 1 are not run again, and the output is the same as an uninterrupted run's (with 1 task)."""
    out = tmp_path / "out"
    cfg = _load(sample_path("recipe.yaml"), {"output_dir": str(out), "tasks": 4})
    real = RelevanceStep.setup
    ran: list[int] = []

    def crash(self: RelevanceStep, rank: int) -> None:
        ran.append(rank)
        if rank == 2 and crash.armed:  # type: ignore[attr-defined]
            raise KeyboardInterrupt
        real(self, rank)

    crash.armed = True  # type: ignore[attr-defined]
    monkeypatch.setattr(RelevanceStep, "setup", crash)
    with pytest.raises(KeyboardInterrupt):
        run_curation(cfg)
    assert ran == [0, 1, 2] and not (out / "final").exists()
    crash.armed = False  # type: ignore[attr-defined]
    reports = run_curation(cfg)
    assert ran == [0, 1, 2, 2, 3]
    assert [r.skipped for r in reports] == [True] * 6 + [False] * 3
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
    run_curation(_load(recipe))
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
        run_curation(_load(recipe))


def test_recipe_errors(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inputs: [x]\noutput_dir: o\nstages: [read, dedupe]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown stage"):
        _load(recipe)
    recipe.write_text("inputs: [x]\noutput_dir: o\ndedup: {treshold: 0.5}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="threshold"):
        _load(recipe)
    recipe.write_text("inputs: [missing]\noutput_dir: o\n", encoding="utf-8")
    with pytest.raises(DataError, match="no such file"):
        run_curation(_load(recipe, {"output_dir": str(tmp_path / "o")}))


def _numbered_corpus(tmp_path: Path, n: int = 1200) -> Path:
    docs = [{"text": f"{make_samples.DOMAIN_DOCS[k % 20][1]}编号{k}。"} for k in range(n)]
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return src


def test_tasks_and_workers_give_same_result(tmp_path: Path) -> None:
    """1 task, 4 tasks in one process, 4 tasks on 2 worker processes: the same documents, in the same order."""
    src = _numbered_corpus(tmp_path)
    outs = []
    for tasks, workers in ((1, 1), (4, 1), (4, 2)):
        recipe = tmp_path / f"r{tasks}{workers}.yaml"
        recipe.write_text(yaml.safe_dump({"inputs": [str(src)], "output_dir": str(tmp_path / f"o{tasks}{workers}"),
                                          "tasks": tasks, "workers": workers,
                                          "stages": ["read", "clean", "pii", "quality", "dedup_exact", "dedup_near"],
                                          "output_format": "jsonl"}), encoding="utf-8")
        run_curation(_load(recipe))
        outs.append((tmp_path / f"o{tasks}{workers}" / "final" / "docs.jsonl").read_text())
    assert outs[0] == outs[1] == outs[2]
    # copies differing only in "编号k" are near-duplicates of the first of their text (MinHash may let a few
    # of the shortest texts with 3-digit k, true Jaccard just above 0.8, through)
    assert 20 <= len(outs[0].splitlines()) <= 40
    kept = [json.loads(x)["text"] for x in outs[0].splitlines()]
    assert kept[:20] == [f"{make_samples.DOMAIN_DOCS[k][1]}编号{k}。" for k in range(20)]  # the first of each


def test_output_inside_input_refused(tmp_path: Path) -> None:
    """Issue 15, defect 4: `output_dir` inside an input folder would be read back as documents by the next run."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": make_samples.DOMAIN_DOCS[0][1]}, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"inputs": ["corpus"], "output_dir": str(corpus / "out")}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"output_dir .*out is inside input .*corpus"):
        run_curation(_load(recipe))
    assert not (corpus / "out").exists()
    with pytest.raises(ConfigError, match="inside output_dir"):
        run_curation(_load(recipe, {"output_dir": str(tmp_path)}))
    run_curation(_load(recipe, {"output_dir": str(tmp_path / "out"), "stages": ["read"]}))
    assert read_manifest(tmp_path / "out" / "final")["counts"]["kept"] == 1


def test_plugin_stage_is_one_class_and_one_registry_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from soaes_data.steps import STAGE_REGISTRY, CurationStep

    class KeywordStep(CurationStep):
        stage = "keyword"

        def process(self, doc: Any) -> str | None:
            return None if self.config["word"] in doc.text else f"keyword:no_{self.config['word']}"

    monkeypatch.setitem(STAGE_REGISTRY, "keyword", KeywordStep)
    src = _numbered_corpus(tmp_path, 40)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"inputs": [str(src)], "output_dir": str(tmp_path / "o"), "tasks": 2,
                                      "stages": ["read", "keyword"], "options": {"keyword": {"word": "国资委"}}}),
                      encoding="utf-8")
    reports = run_curation(_load(recipe))
    expected = sum("国资委" in json.loads(x)["text"] for x in src.read_text(encoding="utf-8").splitlines())
    assert 0 < expected < 40
    assert reports[-1].name == "keyword" and reports[-1].counts["kept"] == expected
    assert reports[-1].counts["dropped_by_reason"] == {"keyword": 40 - expected}


def test_decontamination_is_a_default_stage_when_benchmarks_exist(tmp_path: Path) -> None:
    """With a folder of CMMLU-style subject CSVs, the default stages decontaminate: the document quoting a
    question is dropped, and overlaps are reported per benchmark and subject (counted over all tasks)."""
    question = make_samples.DOMAIN_DOCS[7][1][:40]
    bench = tmp_path / "bench" / "test"
    bench.mkdir(parents=True)
    (bench / "state_assets.csv").write_text(f",Question,A,B,C,D,Answer\n0,{question},甲,乙,丙,丁,A\n", encoding="utf-8")
    src = _numbered_corpus(tmp_path, 20)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"inputs": [str(src)], "output_dir": str(tmp_path / "o"), "tasks": 2,
                                      "relevance": {"min_score": 0.0},
                                      "decontaminate": {"eval_dirs": [str(tmp_path / "bench")]}}), encoding="utf-8")
    reports = run_curation(_load(recipe))
    assert reports[-1].name == "decontaminate"
    assert reports[-1].counts["dropped_by_reason"] == {"contaminated": 1}
    report = json.loads((reports[-1].dir / "decontamination.json").read_text(encoding="utf-8"))
    assert report["records_checked"] == reports[-1].counts["in"] and report["records_contaminated"] == 1
    assert report["benchmarks"]["cmmlu"]["subjects"]["state_assets"]["records"] == 1
    rejects = _lines(reports[-1].dir / "rejects.jsonl")
    assert rejects[0]["reason"] == "contaminated:cmmlu/state_assets" and question in rejects[0]["text"]
    overlaps = _lines(reports[-1].dir / "overlaps.jsonl")
    assert overlaps and {o["benchmark"] for o in overlaps} == {"cmmlu"}
    # without benchmark data the stage is left out
    reports = run_curation(_load(recipe, {"decontaminate.eval_dirs": [], "output_dir": str(tmp_path / "o2")}))
    assert reports[-1].name == "relevance"
