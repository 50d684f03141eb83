"""`soaes pipeline` freshness from content: edited inputs, replaced target weights and damaged outputs rerun their
stage; an empty, invalid or binary stage manifest means a rerun with one line saying why (plan and run)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from soaes.cli import main
from soaes.pipeline import load_pipeline_recipe, plan_pipeline, run_pipeline, stage_dirname
from soaes_core import verify_outputs

STAGES = ["curate", "pack", "cpt", "eval"]


@pytest.fixture(scope="module")
def data_run(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2_dir: Path) -> Path:
    """A recipe folder (recipe.yaml, target/ = a tiny Qwen2, evaldata/ = the shipped eval samples) whose run/ has
    curate and pack done (relative paths: they resolve against the recipe's folder)."""
    from soaes_eval.tasks.loaders import SAMPLES_DIR

    base = tmp_path_factory.mktemp("fresh") / "w"
    base.mkdir()
    shutil.copytree(tiny_qwen2_dir, base / "target")
    shutil.copytree(SAMPLES_DIR, base / "evaldata")
    (base / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "fresh", "target": "target", "stages": STAGES, "pack": {"max_length": 128},
        "eval": {"data_dir": "evaldata", "general_tasks": ["soaes_cmmlu_agronomy"]}}), encoding="utf-8")
    summary = run_pipeline(load_pipeline_recipe(base / "recipe.yaml"), base / "run", until="pack")
    assert summary.ran == ["curate", "pack"]
    return base


@pytest.fixture
def work(data_run: Path, tmp_path: Path) -> Path:
    """A private copy of `data_run` to change."""
    return Path(shutil.copytree(data_run, tmp_path / "w"))


def _plan(work: Path) -> dict[str, tuple[str, str]]:
    return {p.name: (p.status, p.reason) for p in plan_pipeline(load_pipeline_recipe(work / "recipe.yaml"),
                                                                 work / "run")}


def _rewrite_keeping_stat(path: Path, data: bytes) -> None:
    """Replace a file's content in place with `data` of the same size, and put its mtime back."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_copied_run_is_up_to_date(work: Path) -> None:
    plan = _plan(work)
    assert plan["curate"][0] == plan["pack"][0] == "up-to-date"
    assert plan["cpt"] == ("will run", "no previous output")


def test_same_size_corruption_of_an_output_reruns_its_stage(work: Path) -> None:
    pack = work / "run" / "stages" / stage_dirname("pack")
    shard = sorted((pack / "cpt").rglob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    _rewrite_keeping_stat(shard, bytes(data))
    plan = _plan(work)
    assert plan["curate"][0] == "up-to-date"
    rel = shard.relative_to(pack).as_posix()
    assert plan["pack"] == ("will run", f"output {rel!r} changed since it was written")
    res = CliRunner().invoke(main, ["pipeline", "run", str(work / "recipe.yaml"), "-o", str(work / "run"),
                                    "--until", "pack"])
    assert res.exit_code == 0, res.output
    assert "curate: up to date" in res.output and "pack: ran in" in res.output
    assert f"(output {rel!r} changed" in res.output
    assert verify_outputs(pack) == []


def test_target_weights_replaced_at_the_same_path_rerun_pack_and_cpt(work: Path, tmp_path: Path) -> None:
    from soaes_core.testing.tiny import make_tiny_qwen2

    before = {p.name: p.fingerprint for p in plan_pipeline(load_pipeline_recipe(work / "recipe.yaml"), work / "run")}
    other = make_tiny_qwen2(tmp_path / "other", seed=1)  # same shapes, other weights
    weights = work / "target" / "model.safetensors"
    _rewrite_keeping_stat(weights, (other / "model.safetensors").read_bytes())
    plan = _plan(work)
    assert plan["curate"][0] == "up-to-date"
    assert plan["pack"] == ("will run", "input 'tokenizer' changed")
    after = {p.name: p.fingerprint for p in plan_pipeline(load_pipeline_recipe(work / "recipe.yaml"), work / "run")}
    for stage in ("cpt", "eval"):  # CPT starts from the target; eval scores it as the base model
        key = "model" if stage == "cpt" else "base"
        assert before[stage]["inputs"][key]["path"] == str(work / "target")
        assert before[stage]["inputs"][key]["sha256"] != after[stage]["inputs"][key]["sha256"]


def test_edited_eval_set_changes_the_eval_fingerprint(work: Path) -> None:
    recipe = load_pipeline_recipe(work / "recipe.yaml")
    before = {p.name: p.fingerprint for p in plan_pipeline(recipe, work / "run")}["eval"]
    qa = work / "evaldata" / "domain" / "qa.jsonl"
    lines = qa.read_text(encoding="utf-8").splitlines(keepends=True)
    qa.write_text("".join(lines[1:] + lines[:1]), encoding="utf-8")  # same size, same set, other order
    after = {p.name: p.fingerprint for p in plan_pipeline(recipe, work / "run")}["eval"]
    assert before["inputs"]["file:eval_data"]["sha256"] != after["inputs"]["file:eval_data"]["sha256"]
    assert before["config_sha256"] == after["config_sha256"]


@pytest.mark.parametrize("content", [b"", b"{not json", b"\x00\xff\xfe binary \x81", b"[1, 2]"],
                         ids=["empty", "invalid", "binary", "not-a-manifest"])
def test_damaged_manifest_means_a_rerun_in_plan(work: Path, content: bytes) -> None:
    manifest = work / "run" / "stages" / stage_dirname("pack") / "manifest.json"
    manifest.write_bytes(content)
    plan = _plan(work)
    status, reason = plan["pack"]
    assert status == "will run" and reason.startswith(f"{manifest} is corrupt (") and reason.endswith("rerunning "
                                                                                                       "the stage")
    assert plan["curate"][0] == "up-to-date" and plan["cpt"] == ("will run", "input stage 'pack' will run")
    res = CliRunner().invoke(main, ["pipeline", "plan", str(work / "recipe.yaml"), "-o", str(work / "run")])
    assert res.exit_code == 0, res.output
    assert len([ln for ln in res.output.splitlines() if "corrupt" in ln]) == 1


def test_damaged_manifest_means_a_rerun_in_run(work: Path) -> None:
    pack = work / "run" / "stages" / stage_dirname("pack")
    (pack / "manifest.json").write_bytes(b"\x00\xff\xfe")
    args = ["pipeline", "run", str(work / "recipe.yaml"), "-o", str(work / "run")]
    # a stage that needs it, run alone, says so in one line
    res = CliRunner().invoke(main, [*args, "--from", "cpt", "--until", "cpt"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'cpt' needs the output of stage 'pack'" in lines[0] and "corrupt" in lines[0]
    res = CliRunner().invoke(main, [*args, "--until", "pack"])
    assert res.exit_code == 0, res.output
    assert "pack: ran in" in res.output and "is corrupt (not UTF-8 text): rerunning the stage" in res.output
    assert verify_outputs(pack) == []
    assert _plan(work)["pack"][0] == "up-to-date"
