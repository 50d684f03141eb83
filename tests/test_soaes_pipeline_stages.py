"""The data stages of `soaes pipeline` on the shipped samples: curate → decontaminate → pack, as a slice."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from soaes.cli import main
from soaes.pipeline import load_pipeline_recipe, plan_pipeline, stage_dirname


def test_curate_decontaminate_pack_slice(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "data-only", "stages": ["curate", "decontaminate", "pack", "cpt"],
                                      "pack": {"max_length": 128}}), encoding="utf-8")
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(run), "--until", "pack"])
    assert res.exit_code == 0, res.output
    dec = json.loads((run / "stages" / stage_dirname("decontaminate") / "manifest.json").read_text())
    for name, c in dec["counts"].items():
        assert c["in"] == c["kept"] + c["dropped"] and c["in"] > 0, name
    pack = json.loads((run / "stages" / stage_dirname("pack") / "manifest.json").read_text())
    # packing reads the decontaminated files, and records their hashes
    assert pack["pipeline"]["inputs"]["corpus"]["path"].endswith(f"{stage_dirname('decontaminate')}/docs.jsonl")
    assert pack["pipeline"]["inputs"]["sft_stage1"]["path"].endswith("sft_stage1.jsonl")
    assert pack["counts"]["cpt"]["kept"] == dec["counts"]["docs"]["kept"]
    plans = {p.name: p.status for p in plan_pipeline(load_pipeline_recipe(recipe), run)}
    assert plans == {"curate": "up-to-date", "decontaminate": "up-to-date", "pack": "up-to-date", "cpt": "will run"}
    res = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(run), "--from", "pack",
                                    "--until", "pack"])
    assert res.exit_code == 0 and "pack: up to date" in res.output


def test_run_folder_inside_curation_input_refused_before_creating_anything(tmp_path: Path) -> None:
    """Issue 29: `-o` inside the curation recipe's input folder is refused in one line naming both, and leaves no
    folder behind (it was refused only when curate ran, after the run folder was made there)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": "国有资产监督管理。"}, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    (tmp_path / "curate.yaml").write_text(yaml.safe_dump({"inputs": ["corpus"], "output_dir": "unused"}),
                                          encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "c", "stages": ["curate"], "curate": {"recipe": "curate.yaml"}}),
                      encoding="utf-8")
    res = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(corpus / "run")])
    assert res.exit_code == 2, res.output
    real = corpus.resolve()
    assert res.output.strip() == (f"error: output folder {real / 'run'} is inside curation input {real}: curation "
                                  "would read its own outputs back as documents; choose an output folder outside "
                                  "the inputs")
    assert sorted(p.name for p in corpus.iterdir()) == ["a.jsonl"]


def test_teacher_prompts_committed_heldout_split_and_domain_queries(tmp_path: Path) -> None:
    """A committed held-out file is the held-out split; training prompts (given or generated from domain text)
    that share an 8-character span with a held-out prompt are dropped with the reason, never silently."""
    from soaes.pipeline.recipe import resolve_path
    from soaes.pipeline.stages.distill import teacher_answers_config
    from soaes_core import read_prompts
    from soaes_data.samples import sample_path
    from soaes_distill.teacher_answers import teacher_prompts

    pool = read_prompts(sample_path("sft/expert_pool.jsonl"))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"id": f"h{i}", "prompt": p["prompt"]}, ensure_ascii=False) + "\n"
                            for i, p in enumerate(pool[:3])), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "t", "trained_target": "embedded:smollm2-135m", "stages": ["teacher_data"],
        "teacher_data": {"prompts": ["sample:sft/expert_pool.jsonl"], "heldout_prompts": str(held),
                         "domain_queries": {"max_queries": 50, "num_terms": 20}}}), encoding="utf-8")
    rejects: list[dict] = []
    r = load_pipeline_recipe(recipe)
    train, heldout = teacher_prompts(teacher_answers_config(r, "embedded:smollm2-135m"), rejects,
                                     resolve=lambda v: resolve_path(r, v))
    assert [h["id"] for h in heldout] == ["h0", "h1", "h2"]
    held_texts = {h["prompt"] for h in heldout}
    assert not held_texts & {p["prompt"] for p in train}
    dropped = [r for r in rejects if "held-out" in r["reason"]]
    assert len(dropped) >= 3  # at least the three pool prompts that are the held-out ones
    pool_kept = [p for p in train if p["prompt"] in {q["prompt"] for q in pool}]
    assert len(pool_kept) + len([r for r in rejects if r.get("id") in {q["id"] for q in pool}]) == len(pool)
    assert len(train) > len(pool_kept)  # domain queries were added


def test_teacher_data_resumes_by_prompt_id_after_a_kill(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    """Killed after the training split (a fail point), the resumable teacher_data stage keeps the answers given and
    generates only the held-out ones; its files equal an uninterrupted run's."""
    from soaes.pipeline.stages import FAIL_ENV

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "t", "trained_target": str(tiny_qwen2_dir), "stages": ["teacher_data"], "threads": 1,
        "teacher_data": {"max_prompts": 6, "max_new_tokens": 4, "max_length": 96, "batch_size": 4}}),
        encoding="utf-8")
    runs = {}
    for name, fail in (("ref", None), ("killed", "teacher_data:after_train")):
        runs[name] = tmp_path / name
        env = {FAIL_ENV: fail} if fail else {}
        res = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(runs[name])], env=env)
        assert (res.exit_code == 0) == (fail is None), res.output
    partial = runs["killed"] / "stages" / f".{stage_dirname('teacher_data')}.partial"
    assert (partial / "answers.partial" / "train-greedy.jsonl").is_file()
    res = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(runs["killed"])])
    assert res.exit_code == 0, res.output
    stage = {k: v / "stages" / stage_dirname("teacher_data") for k, v in runs.items()}
    counts = json.loads((stage["killed"] / "manifest.json").read_text())["counts"]
    assert counts["resumed"] == counts["train"]["prompts"] > 0 and counts["heldout"]["prompts"] == 1
    files = sorted(p.name for p in stage["ref"].glob("*.jsonl"))
    assert files == sorted(p.name for p in stage["killed"].glob("*.jsonl")) and "train_records.jsonl" in files
    for name in files:
        assert (stage["ref"] / name).read_bytes() == (stage["killed"] / name).read_bytes(), name


def test_teacher_data_engine_vllm_checked_at_load(tmp_path: Path, monkeypatch) -> None:
    """`teacher_data.engine: vllm` without vLLM installed is one recipe error naming the section and the extra."""
    import pytest

    from soaes_core.errors import ConfigError
    from soaes_distill import teacher_answers

    monkeypatch.setattr(teacher_answers, "vllm_available", lambda: False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "t", "trained_target": "embedded:smollm2-135m",
                                      "stages": ["teacher_data"], "teacher_data": {"engine": "vllm"}}),
                      encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_pipeline_recipe(recipe)
    assert str(err.value) == (f"{recipe}: teacher_data: engine 'vllm': vLLM is not installed; install the extra: "
                              "pip install 'soaes-distill[vllm]'")
