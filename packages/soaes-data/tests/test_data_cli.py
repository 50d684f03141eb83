"""CLI: curate, pack, split, curriculum, inspect, stats run on the shipped sample; errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from soaes_data.cli import main
from soaes_data.samples import sample_path


def test_cli_end_to_end(tmp_path: Path) -> None:
    run = CliRunner()
    r = run.invoke(main, ["curate", str(sample_path("recipe.yaml")), "-o", str(tmp_path / "cur")])
    assert r.exit_code == 0, r.output
    assert "dedup_near" in r.output and "near_duplicate_of=2" in r.output
    r = run.invoke(main, ["curate", str(sample_path("recipe.yaml")), "-o", str(tmp_path / "cur")])
    assert "(unchanged, skipped)" in r.output
    pool = str(sample_path("sft/expert_pool.jsonl"))
    r = run.invoke(main, ["split", pool, "-o", str(tmp_path / "sp")])
    assert r.exit_code == 0 and json.loads(r.output)["test"] == 2
    r = run.invoke(main, ["curriculum", pool, "-o", str(tmp_path / "cv")])
    assert r.exit_code == 0 and (tmp_path / "cv" / "relevance_hist.png").is_file()
    r = run.invoke(main, ["pack", pool, "-o", str(tmp_path / "pk"), "--max-length", "1024"])
    assert r.exit_code == 0 and "utilisation" in r.output, r.output
    r = run.invoke(main, ["pack", str(tmp_path / "cur" / "final" / "docs.jsonl"), "--mode", "cpt", "-o",
                          str(tmp_path / "cpt"), "--max-length", "256"])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["inspect", pool, "-n", "18", "--chat-template", "qwen2.5"])
    assert r.exit_code == 0 and "You are Qwen" in r.output and "[[关于国有企业财务监督工作的报告" in r.output
    r = run.invoke(main, ["inspect", str(tmp_path / "pk")])
    assert r.exit_code == 0 and "<|im_end|>]]" in r.output
    r = run.invoke(main, ["stats", str(tmp_path / "cpt"), "-o", str(tmp_path / "st")])
    assert r.exit_code == 0 and (tmp_path / "st" / "length_hist.png").is_file()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n', encoding="utf-8")
    r = CliRunner().invoke(main, ["pack", str(bad), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "bad.jsonl:1" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["split", str(bad), "-o", str(tmp_path / "s"), "--train", "0.5"])
    assert r.exit_code == 2 and "sum to 1" in r.output


def test_cli_decontaminate_synth_review(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    run = CliRunner()
    pool = sample_path("sft/expert_pool.jsonl")
    first = json.loads(pool.read_text(encoding="utf-8").splitlines()[0])
    evals = tmp_path / "test.jsonl"
    evals.write_text(json.dumps({"question": first["messages"][0]["content"]}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    r = run.invoke(main, ["decontaminate", str(pool), "--eval", str(evals), "-o", str(tmp_path / "dc")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"in": 22, "kept": 21, "dropped": 1}
    overlaps = (tmp_path / "dc" / "overlaps.jsonl").read_text(encoding="utf-8")
    assert first["id"] in overlaps
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d0", "text": "国有资产监督管理。"}, ensure_ascii=False) + "\n", encoding="utf-8")
    r = run.invoke(main, ["synth", str(docs), "-o", str(tmp_path / "review.csv"), "--model", str(tiny_qwen2_dir),
                          "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "review.csv").is_file() and (tmp_path / "review.rejects.jsonl").is_file()
    reviewed = tmp_path / "reviewed.jsonl"
    reviewed.write_text("\n".join(json.dumps({"id": f"x{k}", "question": "问？", "answer": "答。", "status": s},
                                             ensure_ascii=False) for k, s in enumerate(["approved", "rejected"])),
                        encoding="utf-8")
    r = run.invoke(main, ["review-import", str(reviewed), "-o", str(tmp_path / "approved.jsonl")])
    assert r.exit_code == 0 and json.loads(r.output)["kept"] == 1
    r = run.invoke(main, ["synth", str(docs), "-o", str(tmp_path / "r.csv"), "--backend", "openai"])
    assert r.exit_code == 2 and "--base-url" in r.output


def _three_docs(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = ["国有资产监督管理委员会发布年度报告。", "企业财务监督工作取得新进展。", "国有企业改革三年行动方案。"]
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                    encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"inputs": ["corpus"], "output_dir": "unused", "stages": ["read", "clean"],
                                  "output_format": "jsonl"}), encoding="utf-8")
    return recipe


def test_curate_caps_tasks_and_workers_to_the_documents(tmp_path: Path) -> None:
    """Issue 29: --tasks 100000 on 3 documents runs 3 tasks (was 100000, each writing logs and markers), with one
    note on stderr; the manifest records the effective values."""
    from soaes_core import read_manifest
    from soaes_data.pipeline import load_curation_config, plan_curation

    recipe = _three_docs(tmp_path)
    cfg = load_curation_config(recipe, {"tasks": 100000, "workers": 8, "output_dir": str(tmp_path / "o")})
    assert [ph.tasks for ph in plan_curation(cfg)] == [3, 1]  # segment, finalize
    r = CliRunner().invoke(main, ["curate", str(recipe), "-o", str(tmp_path / "big"), "--tasks", "100000",
                                  "--workers", "8"])
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines() == ["note: tasks 100000 capped to 3: the inputs hold 3 document(s) and file(s); "
                                     "workers 8 capped to 3: one task runs on one worker"]
    manifest = read_manifest(tmp_path / "big" / "final")
    assert manifest["counts"]["kept"] == 3
    assert (manifest["config"]["tasks"], manifest["config"]["workers"]) == (3, 3)
    r = CliRunner().invoke(main, ["curate", str(recipe), "-o", str(tmp_path / "small"), "--tasks", "3"])
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert (sum(1 for _ in (tmp_path / "big").rglob("*")) == sum(1 for _ in (tmp_path / "small").rglob("*")))


def test_list_options_add_up_when_repeated(tmp_path: Path) -> None:
    """`--eval A --eval B` and `--eval A,B` both decontaminate against A and B (a repeat is never dropped), and a
    missing one is one error line."""
    from soaes_core import read_manifest

    pool = sample_path("sft/expert_pool.jsonl")
    rows = [json.loads(line) for line in pool.read_text(encoding="utf-8").splitlines()[:2]]
    evals = []
    for k, rec in enumerate(rows):
        evals.append(tmp_path / f"e{k}.jsonl")
        evals[-1].write_text(json.dumps({"q": rec["messages"][0]["content"]}, ensure_ascii=False) + "\n", "utf-8")
    for args in (["--eval", str(evals[0]), "--eval", str(evals[1])], ["--eval", f"{evals[0]},{evals[1]}"]):
        out = tmp_path / f"dc{len(args)}"
        r = CliRunner().invoke(main, ["decontaminate", str(pool), *args, "--no-fetched", "-o", str(out)])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output) == {"in": 22, "kept": 20, "dropped": 2}
        assert {"eval0", "eval1"} <= set(read_manifest(out)["inputs"])
    r = CliRunner().invoke(main, ["decontaminate", str(pool), "--eval", str(evals[0]), "--eval",
                                  str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "missing.jsonl: evaluation file not found" in r.output
