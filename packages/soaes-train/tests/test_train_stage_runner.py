"""Curriculum runner: stages chain (each manifest names its parent), finished stages are skipped, a killed
stage resumes, a missing parent output is one clear error; the three-stage SmolLM2 curriculum runs on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import TrainerCallback

from soaes_core import read_manifest
from soaes_core.errors import ConfigError
from soaes_train import trainer as trainer_mod
from soaes_train.stage_runner import load_train_recipe, run_train_recipe, stage_model_dir, train_recipe_from_dict


def _tiny_recipe(base: Path, out: Path, chat: Path, docs: Path, steps: int = 2) -> dict:
    train = {"max_steps": steps, "per_device_train_batch_size": 2, "save_steps": 1, "logging_steps": 1,
             "learning_rate": 1e-3, "min_lr": 1e-4, "save_total_limit": 1}
    return {"name": "tiny", "base_model": str(base), "output_dir": str(out),
            "defaults": {"data": {"max_length": 96}, "train": train},
            "stages": [{"name": "cpt", "kind": "cpt", "data": {"paths": [str(docs)]}},
                       {"name": "sft_stage1", "kind": "sft", "data": {"paths": [str(chat)]},
                        "train": {"lr_scheduler": "constant_with_warmup"}},
                       {"name": "sft_stage2", "kind": "sft", "data": {"paths": [str(chat)]},
                        "train": {"lr_scheduler": "constant_with_warmup"}}]}


class _Crash(RuntimeError):
    pass


def test_tiny_curriculum_chains_skips_and_resumes(tiny_model_copy: Path, chat_jsonl: Path, text_jsonl: Path,
                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = train_recipe_from_dict(_tiny_recipe(tiny_model_copy, tmp_path / "run", chat_jsonl, text_jsonl))
    # running stage 2 before stage 1 exists: one clear error naming the missing parent
    with pytest.raises(ConfigError, match=r"stage 'sft_stage2' starts from stage 'sft_stage1', whose output .* "
                                          r"does not exist; run 'sft_stage1' first"):
        run_train_recipe(recipe, only=["sft_stage2"])

    # kill stage sft_stage1 after its first checkpoint
    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if "sft_stage1" in args.output_dir:
                raise _Crash("killed")

    real = trainer_mod._train_stage
    monkeypatch.setattr(trainer_mod, "_train_stage",
                        lambda *a, **k: real(*a, **{**k, "callbacks": [Kill()]}))
    with pytest.raises(_Crash):
        run_train_recipe(recipe)
    monkeypatch.setattr(trainer_mod, "_train_stage", real)
    assert read_manifest(stage_model_dir(recipe, "cpt")) is not None
    assert read_manifest(stage_model_dir(recipe, "sft_stage1")) is None

    events: list[tuple[str, str]] = []
    results = run_train_recipe(recipe, on_stage=lambda n, e: events.append((n, e)))
    assert events[0] == ("cpt", "skip")
    assert [r.skipped for r in results] == [True, False, False]
    assert results[1].resumed_from and results[1].resumed_from.endswith("checkpoint-1")
    m1 = read_manifest(stage_model_dir(recipe, "sft_stage1"))
    m2 = read_manifest(stage_model_dir(recipe, "sft_stage2"))
    assert read_manifest(stage_model_dir(recipe, "cpt"))["parent_model"]["spec"] == str(tiny_model_copy)
    assert m1["parent_model"] == {**m1["parent_model"], "spec": str(stage_model_dir(recipe, "cpt")), "stage": "cpt"}
    assert m2["parent_model"]["stage"] == "sft_stage1"
    assert m2["config"]["kind"] == "sft" and m2["counts"]["rows"] > 0
    # everything finished: a re-run skips all; a changed config is refused without --force
    assert all(r.skipped for r in run_train_recipe(recipe))
    changed = train_recipe_from_dict(_tiny_recipe(tiny_model_copy, tmp_path / "run", chat_jsonl, text_jsonl, steps=3))
    with pytest.raises(ConfigError, match="different config or parent; use --force"):
        run_train_recipe(changed, only=["cpt"])


def test_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stages\[0\].deepspeed: deepspeed.offload_param needs ZeRO stage 3"):
        train_recipe_from_dict({"name": "x", "base_model": "m", "stages": [
            {"name": "a", "kind": "sft", "deepspeed": {"enabled": True, "stage": 2, "offload_param": True}}]})
    with pytest.raises(ConfigError, match=r"stages\[0\].kind: expected one of 'cpt', 'sft', got 'sf'"):
        train_recipe_from_dict({"name": "x", "stages": [{"name": "a", "kind": "sf"}]})
    r = train_recipe_from_dict({"name": "x", "base_model": "m", "stages": [
        {"name": "a", "kind": "cpt"}, {"name": "b", "kind": "sft", "model": "stage:zzz"}]})
    with pytest.raises(ConfigError, match="names no stage"):
        run_train_recipe(r, only=["b"])
    with pytest.raises(ConfigError, match="no stage 'c'"):
        run_train_recipe(r, only=["c"])
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nstages:\n  - {name: a, kind: cpt, train: {learning_rate: -1}}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: stages\[0\].train: train.learning_rate must be > 0"):
        load_train_recipe(p)


def test_overrides_apply_to_every_stage_or_one(tmp_path: Path) -> None:
    data = {"name": "x", "base_model": "m", "defaults": {"train": {"max_steps": 5}},
            "stages": [{"name": "a", "kind": "cpt"}, {"name": "b", "kind": "sft"}]}
    r = train_recipe_from_dict(data, overrides={"train.learning_rate": "2e-5", "stages.b.train.max_steps": "7",
                                          "output_dir": str(tmp_path)})
    assert [s.train.learning_rate for s in r.stages] == [2e-5, 2e-5]
    assert [s.train.max_steps for s in r.stages] == [5, 7]
    assert r.output_dir == str(tmp_path)


@pytest.mark.slow
def test_smollm2_three_stage_curriculum_on_cpu(tmp_path: Path) -> None:
    """Acceptance 4: the shipped CPU recipe (sample corpus, 256-token windows, a few steps per stage)."""
    recipe = load_train_recipe("smollm2-135m-cpu", overrides={"output_dir": str(tmp_path / "run"),
                                                        "train.max_steps": "2", "train.save_steps": "100",
                                                        "train.per_device_train_batch_size": "1"})
    results = run_train_recipe(recipe)
    assert [r.name for r in results] == ["cpt", "sft_stage1", "sft_stage2"]
    parents = [read_manifest(r.model_dir)["parent_model"] for r in results]
    assert parents[0]["spec"] == "embedded:smollm2-135m" and parents[0]["stage"] is None
    assert parents[1]["stage"] == "cpt" and parents[1]["spec"] == str(results[0].model_dir)
    assert parents[2]["stage"] == "sft_stage1" and parents[2]["spec"] == str(results[1].model_dir)
    for r in results:
        m = read_manifest(r.model_dir)
        assert m["training"]["packing_logit_gap"] < 1e-4
        assert m["training"]["metrics"]["global_step"] == 2
        assert (r.model_dir / "model.safetensors").is_file() and (r.model_dir / "loss_curve.png").is_file()


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_with_the_same_loss_curve(tiny_model_copy: Path, chat_jsonl: Path, text_jsonl: Path,
                                                             tmp_path: Path) -> None:
    """A real kill: `soaes-train run` in a subprocess gets SIGKILL after its second checkpoint; re-running
    resumes the stage and the loss curve equals an uninterrupted run."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    def recipe(out: Path) -> Path:
        data = _tiny_recipe(tiny_model_copy, out, chat_jsonl, text_jsonl, steps=10)
        data["stages"] = data["stages"][1:2]
        data["defaults"]["train"]["save_total_limit"] = 3
        p = tmp_path / f"{out.name}.yaml"
        p.write_text(yaml.safe_dump(data))
        return p

    ref = run_train_recipe(load_train_recipe(recipe(tmp_path / "ref")))[0]
    path = recipe(tmp_path / "run")
    # without the launcher variables an earlier in-process DeepSpeed test set (its MASTER_PORT is still bound here)
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, "SOAES_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "soaes_train.cli", "run", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "run" / "sft_stage1" / "checkpoints" / "checkpoint-2" / ".soaes_complete"
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists()
    res = run_train_recipe(load_train_recipe(path))[0]
    assert res.resumed_from is not None and not res.resumed_from.endswith("checkpoint-10")
    curve = json.loads((res.model_dir / "loss_curve.json").read_text())["loss"]
    ref_curve = json.loads((ref.model_dir / "loss_curve.json").read_text())["loss"]
    assert len(curve) == 10 and curve == pytest.approx(ref_curve, rel=1e-5)
