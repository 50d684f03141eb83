"""`soaes-train recipes`, `soaes-train run` (a one-stage recipe on the tiny Qwen2) and error exits."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from soaes_core import read_manifest
from soaes_train.cli import main


def test_recipes_lists_shipped() -> None:
    res = CliRunner().invoke(main, ["recipes"])
    assert res.exit_code == 0, res.output
    assert "qwen2.5-72b-paper" in res.output and "smollm2-135m-cpu" in res.output


def test_run_one_stage_then_skip(tiny_model_copy: Path, chat_jsonl: Path, tmp_path: Path) -> None:
    recipe = {"name": "one", "base_model": str(tiny_model_copy), "output_dir": str(tmp_path / "out"),
              "stages": [{"name": "sft", "kind": "sft", "data": {"paths": [str(chat_jsonl)], "max_length": 96},
                          "train": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3}}]}
    p = tmp_path / "one.yaml"
    p.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(main, ["run", str(p), "--set", "train.save_steps=1"])
    assert res.exit_code == 0, res.output
    assert "attention=sdpa" in res.output
    m = read_manifest(tmp_path / "out" / "sft" / "model")
    assert m["config"]["train"]["save_steps"] == 1
    again = CliRunner().invoke(main, ["run", str(p), "--set", "train.save_steps=1"])
    assert again.exit_code == 0 and "(skipped)" in again.output


def test_run_bad_recipe_exits_with_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: b\nstages:\n  - {name: a, kind: sft, deepspeed: {stage: 2, offload_param: true}}\n")
    res = CliRunner().invoke(main, ["run", str(p)])
    assert res.exit_code == 2
    assert "offload_param needs ZeRO stage 3" in res.output
    assert "Traceback" not in res.output


def test_run_help_lists_every_settable_key() -> None:
    """`--set` keys come from the dataclasses: the soaes settings and the TrainingArguments passed through."""
    res = CliRunner().invoke(main, ["run", "--help"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    for key in ("output_dir", "train.learning_rate float, default 1e-05: Peak learning rate",
                "train.label_smoothing_factor", "data.max_length int, default 2048", "deepspeed.stage"):
        assert key in text, key


def test_run_bad_set_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("name: r\nstages:\n  - {name: a, kind: sft}\n")
    res = CliRunner().invoke(main, ["run", str(p), "--set", "train.max_steps"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "error: --set: expected KEY=VALUE, got 'train.max_steps'"]
    res = CliRunner().invoke(main, ["run", str(p), "--set", "train.save_stepz=3"])
    assert res.exit_code == 2 and "r.yaml: stages[0].train.save_stepz: unknown key (did you mean 'save_steps'?)" in (
        res.output)
