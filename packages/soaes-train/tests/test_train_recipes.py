"""Shipped recipes parse, and the paper recipes carry the paper's settings."""

from __future__ import annotations

import pytest

from soaes_core.errors import ConfigError
from soaes_train.recipes import list_recipes, resolve_recipe
from soaes_train.stage_runner import load_train_recipe

PAPER_GPUS = 8


def test_every_shipped_recipe_parses() -> None:
    names = list_recipes()
    assert {"qwen2.5-7b-paper", "qwen2.5-72b-paper", "qwen2.5-72b-ablations", "tiny-qwen2-cpu",
            "smollm2-135m-cpu"} <= set(names)
    for name in names:
        assert load_train_recipe(name).stages


@pytest.mark.parametrize("name", ["qwen2.5-7b-paper", "qwen2.5-72b-paper"])
def test_paper_recipe_settings(name: str) -> None:
    r = load_train_recipe(name)
    cpt, s1, s2 = (r.stage(n) for n in ("cpt", "sft_stage1", "sft_stage2"))
    for s in (cpt, s1, s2):
        assert s.train.warmup_ratio == 0.05 and s.train.num_train_epochs == 1
        assert s.data.max_length == 8192 and s.train.gradient_checkpointing
        assert s.deepspeed.enabled and s.deepspeed.stage == 3 and s.deepspeed.offload_optimizer
    gb = lambda s: s.train.per_device_train_batch_size * s.train.gradient_accumulation_steps * PAPER_GPUS  # noqa: E731
    assert (gb(cpt), gb(s1), gb(s2)) == (64, 64, 8)
    assert gb(cpt) * cpt.data.max_length == pytest.approx(0.5e6, rel=0.05)  # ~0.5M tokens per batch
    assert (cpt.train.lr_scheduler, cpt.train.learning_rate, cpt.train.min_lr) == ("cosine_floor", 1e-5, 1e-6)
    assert (s1.train.lr_scheduler, s1.train.learning_rate) == ("constant_with_warmup", 1e-6)
    assert (s2.train.lr_scheduler, s2.train.learning_rate) == ("constant_with_warmup", 3.5e-6)
    assert s1.data.packing and s2.data.packing


def test_ablation_branches() -> None:
    r = load_train_recipe("qwen2.5-72b-ablations")
    assert r.stage("stage2_only").model == "hf:Qwen/Qwen2.5-72B"
    assert r.stage("instruct_stage2").model == "hf:Qwen/Qwen2.5-72B-Instruct"
    assert r.stage("cpt_joint_sft").model == "stage:cpt" and len(r.stage("cpt_joint_sft").data.paths) == 2
    assert r.stage("cpt_stage1_stage2").model == "stage:cpt_stage1"


def test_unknown_recipe() -> None:
    with pytest.raises(ConfigError, match="no such recipe file or shipped recipe"):
        resolve_recipe("nope")
