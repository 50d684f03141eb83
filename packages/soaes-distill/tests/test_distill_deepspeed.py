"""KD of a draft under real DeepSpeed in one CPU process (gloo): ZeRO-3 with optimizer and parameter offload
from stored top-k + tail-sample logits, and ZeRO-2 with an online teacher. The KD loss goes down and the saved
draft reloads, differs from its initialisation and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from soaes_core import read_manifest
from soaes_core.testing import make_tiny_qwen2
from soaes_distill.dump import DumpConfig, run_dump
from soaes_distill.recipe import DistillRecipe, run_distill
from soaes_distill.trainer import KDConfig
from soaes_train.config import DeepSpeedConfig, TrainConfig

STEPS = 16


@pytest.fixture(scope="module")
def ds_student_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen2(tmp_path_factory.mktemp("ds-student"), seed=3, num_hidden_layers=1)


@pytest.mark.parametrize("zero", [3, 2])
def test_kd_under_deepspeed_zero(zero: int, tmp_path: Path, token_dataset: Path, tiny_qwen2_dir: Path,
                                 tiny_qwen2, embedded_tokenizer, ds_student_dir: Path) -> None:
    offline = zero == 3
    store_dir = None
    if offline:
        store_dir = tmp_path / "logits"
        run_dump(DumpConfig(dataset=str(token_dataset), output_dir=str(store_dir), top_k=8, temperatures=[2.0],
                            tail_samples=8, examples_per_shard=6), model=tiny_qwen2, tokenizer=embedded_tokenizer)
    recipe = DistillRecipe(
        student=str(ds_student_dir), train_data=str(token_dataset), output_dir=str(tmp_path / "run"),
        teacher=None if offline else str(tiny_qwen2_dir), teacher_logits=str(store_dir) if offline else None,
        kd=KDConfig(alpha=0.5, temperature=2.0),
        train=TrainConfig(learning_rate=3e-3, max_steps=STEPS, per_device_train_batch_size=4, logging_steps=4,
                          save_steps=1000, bf16=False, verify_packing=False),
        deepspeed=DeepSpeedConfig(enabled=True, stage=zero, offload_optimizer=True, offload_param=zero == 3))
    res = run_distill(recipe)
    losses = [h["loss"] for h in res.kd_history]
    assert len(losses) == STEPS
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    cfg = read_manifest(tmp_path / "run")["config"]
    assert cfg["deepspeed"]["enabled"] is True and cfg["deepspeed"]["stage"] == zero
    trained = AutoModelForCausalLM.from_pretrained(res.model_dir, dtype=torch.float32)
    init = AutoModelForCausalLM.from_pretrained(ds_student_dir, dtype=torch.float32)
    w, w0 = trained.model.layers[0].mlp.up_proj.weight, init.model.layers[0].mlp.up_proj.weight
    assert w.shape == w0.shape and not torch.equal(w, w0)  # gathered (not a ZeRO-3 shard) and trained
    ids = torch.tensor([[1, 2, 3]])
    assert trained.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                            do_sample=False).shape == (1, 7)
    assert json.loads((tmp_path / "run" / "loss_curve.json").read_text())["loss"]
    # DeepSpeed's process-wide state is cleared: a later plain load is not partitioned
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()
