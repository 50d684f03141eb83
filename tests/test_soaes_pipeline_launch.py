"""`soaes pipeline run` with a training stage under a launcher: the cpt stage's `launch:` section starts the
soaes-train CLI under torchrun with two gloo processes, the pipeline reads its manifest back, and a second run skips
the stage (its launch settings other than the process count and DeepSpeed are not in the fingerprint)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import yaml
from click.testing import CliRunner

from soaes.cli import main
from soaes.pipeline import load_pipeline_recipe, plan_pipeline, stage_dirname
from soaes_core import read_manifest


def test_cpt_under_torchrun_through_pipeline_run_then_skips(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    base = tmp_path / "w"
    shutil.copytree(tiny_qwen2_dir, base / "target")
    rng = random.Random(0)
    words = "the state owned enterprise shall register changes of capital within thirty days".split()
    (base / "docs.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))}) + "\n"
        for _ in range(30)), encoding="utf-8")
    recipe = base / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "launch", "target": "target", "stages": ["pack", "cpt"],
        "pack": {"max_length": 128, "cpt_data": "docs.jsonl"},
        "cpt": {"max_length": 128, "train": {"max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1,
                                             "learning_rate": 1e-3},
                "launch": {"launcher": "torchrun", "nproc_per_node": 2}}}), encoding="utf-8")
    run = base / "run"
    res = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(run)])
    assert res.exit_code == 0, res.output
    cpt = run / "stages" / stage_dirname("cpt")
    stage_manifest = read_manifest(cpt)
    assert stage_manifest["counts"]["launch"] == {"launcher": "torchrun", "processes": 2, "log": "train.log"}
    assert stage_manifest["counts"]["metrics"]["global_step"] == 2
    training = read_manifest(cpt / "model")["training"]  # written by the launched processes
    assert training["world_size"] == 2
    assert len(json.loads((cpt / "model" / "loss_curve.json").read_text())["loss"]) == 2
    assert "torch.distributed.run" in (cpt / "train.log").read_text()
    assert not (cpt / "checkpoints").exists()

    # a different port or launcher with the same process count changes nothing the stage computes
    again = CliRunner().invoke(main, ["pipeline", "run", str(recipe), "-o", str(run), "--set",
                                      "cpt.launch.launcher=deepspeed", "--set", "cpt.launch.master_port=29999"])
    assert again.exit_code == 0, again.output
    assert read_manifest(cpt)["created"] == stage_manifest["created"]  # not rerun
    # one process more changes the global batch: the stage is out of date
    plan = {p.name: p.status for p in plan_pipeline(
        load_pipeline_recipe(recipe, overrides={"cpt.launch.nproc_per_node": 3}), run)}
    assert plan == {"pack": "up-to-date", "cpt": "will run"}
