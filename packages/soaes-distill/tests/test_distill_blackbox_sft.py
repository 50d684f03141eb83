"""Black-box SFT (kd.alpha = 0): the draft trains on token data alone, with no teacher model and no logit store;
any alpha > 0 without a teacher is one clear error. Step budgets: a run stops at max_steps, a time cap says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from soaes_core import load_model
from soaes_core.errors import InvalidArgumentError
from soaes_core.testing import make_tiny_qwen2
from soaes_distill.cli import main
from soaes_distill.losses import distillation_loss
from soaes_distill.recipe import DistillRecipe, DraftTrainConfig, run_distill
from soaes_distill.trainer import KDConfig

TRAIN = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "save_steps": 1000,
         "bf16": False, "verify_packing": False, "lr_scheduler": "constant"}


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen2(tmp_path_factory.mktemp("sft-student"), seed=3, num_hidden_layers=1)


def test_loss_without_teacher_is_cross_entropy_only_at_alpha_zero() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert float(distillation_loss(logits, None, labels, alpha=0.0)) == pytest.approx(float(ce), rel=1e-6)
    with pytest.raises(InvalidArgumentError, match="needs the teacher's logits"):
        distillation_loss(logits, None, labels, alpha=0.5)


def test_blackbox_sft_trains_with_no_teacher_or_store(tmp_path, token_dataset, student_dir, monkeypatch) -> None:
    monkeypatch.setenv("SOAES_PROGRESS", "0")
    before = load_model(student_dir, dtype=torch.float32, device="cpu")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({"student": str(student_dir), "train_data": str(token_dataset),
                                      "output_dir": str(tmp_path / "run"), "kd": {"alpha": 0.0}, "train": TRAIN}))
    res = CliRunner().invoke(main, ["train", str(recipe), "--set", "train.max_steps=4"])
    assert res.exit_code == 0, res.output
    history = [json.loads(line) for line in (tmp_path / "run" / "kd_history.jsonl").read_text().splitlines()]
    assert len(history) == 4 and all(h["kd"] == 0.0 and h["loss"] == pytest.approx(h["ce"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]  # it learns the labels
    after = load_model(tmp_path / "run" / "model", dtype=torch.float32, device="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["method"] == "blackbox_sft" and "teacher_logits" not in manifest["inputs"]
    assert manifest["stopped_by"] == "max_steps" and manifest["steps"] == manifest["planned_steps"] == 4
    # a KD weight without a teacher is one line naming the fix
    res = CliRunner().invoke(main, ["train", str(recipe), "--set", "kd.alpha=0.5"])
    assert res.exit_code == 2 and "black-box SFT on token data alone needs kd.alpha: 0" in res.output
    assert "Traceback" not in res.output


def test_defaults_are_the_domain_draft_papers_offline_setting() -> None:
    r = DistillRecipe(student="s", train_data="d", output_dir="o", teacher="t")
    assert (r.train.learning_rate, r.train.num_train_epochs, r.train.per_device_train_batch_size) == (2e-5, 3.0, 8)


def test_a_time_cap_ends_a_step_budgeted_run_and_says_so(tmp_path, token_dataset, student_dir, monkeypatch) -> None:
    monkeypatch.setenv("SOAES_PROGRESS", "0")
    res = run_distill(DistillRecipe(student=str(student_dir), train_data=str(token_dataset),
                                    output_dir=str(tmp_path / "cap"), time_budget_s=1e-9,
                                    kd=KDConfig(alpha=0.0), train=DraftTrainConfig(**{**TRAIN, "max_steps": 50})))
    assert res.stop is not None and res.stop.stopped_by == "time_budget" and res.stop.steps == 1
    manifest = json.loads((tmp_path / "cap" / "manifest.json").read_text())
    assert manifest["stopped_by"] == "time_budget" and manifest["planned_steps"] == 50
    message = manifest["stop_message"]
    assert "stopped by the time budget" in message and "1 of the planned 50 steps" in message
