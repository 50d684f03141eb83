"""The paper's schedules: hand-computed values at chosen steps, and transformers' schedulers (what training
actually uses) equal to the formulas at every step."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import TrainingArguments, get_scheduler

from soaes_train.config import TrainConfig
from soaes_train.schedules import cosine_floor_lr, hf_scheduler_args, lr_at_step, warmup_steps


def test_paper_cpt_cosine_floor_values() -> None:
    # CPT: 1e-5 → 1e-6 cosine, warmup ratio 0.05; 200 steps → 10 warmup steps, 190 decay steps
    train = TrainConfig(learning_rate=1e-5, min_lr=1e-6, lr_scheduler="cosine_floor", warmup_ratio=0.05)
    assert warmup_steps(200, 0.05) == 10
    assert lr_at_step(train, 0, 200) == 0.0
    assert lr_at_step(train, 5, 200) == pytest.approx(0.5e-5)
    assert lr_at_step(train, 10, 200) == pytest.approx(1e-5)
    assert lr_at_step(train, 105, 200) == pytest.approx(1e-6 + 9e-6 * 0.5)  # half-way through the decay
    assert lr_at_step(train, 200, 200) == pytest.approx(1e-6)  # the floor
    q = 10 + 190 // 4
    assert lr_at_step(train, q, 200) == pytest.approx(1e-6 + 9e-6 * 0.5 * (1 + math.cos(math.pi * (q - 10) / 190)))


def test_paper_sft_constant_with_warmup_values() -> None:
    s1 = TrainConfig(learning_rate=1e-6, min_lr=0.0, lr_scheduler="constant_with_warmup", warmup_ratio=0.05)
    s2 = TrainConfig(learning_rate=3.5e-6, min_lr=0.0, lr_scheduler="constant_with_warmup", warmup_ratio=0.05)
    assert lr_at_step(s1, 2, 100) == pytest.approx(0.4e-6)  # warmup: 5 steps
    assert lr_at_step(s1, 5, 100) == pytest.approx(1e-6)
    assert lr_at_step(s1, 99, 100) == pytest.approx(1e-6)
    assert lr_at_step(s2, 50, 100) == pytest.approx(3.5e-6)


@pytest.mark.parametrize("kind,total", [("cosine_floor", 200), ("cosine_floor", 37), ("constant_with_warmup", 64),
                                        ("cosine", 50), ("linear", 50), ("constant", 10)])
def test_transformers_scheduler_matches_formula(kind: str, total: int) -> None:
    train = TrainConfig(learning_rate=1e-5, min_lr=1e-6 if kind == "cosine_floor" else 0.0, lr_scheduler=kind,
                        warmup_ratio=0.05 if kind != "constant" else 0.0)
    hf = hf_scheduler_args(train)
    args = TrainingArguments(output_dir="unused", learning_rate=train.learning_rate, report_to="none", **hf)
    warm = args.get_warmup_steps(total)
    assert warm == warmup_steps(total, train.warmup_ratio)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.learning_rate)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=warm, num_training_steps=total,
                          scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    for step in range(total + 1):
        assert sched.get_last_lr()[0] == pytest.approx(lr_at_step(train, step, total), rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step()


def test_cosine_floor_is_monotone_after_warmup() -> None:
    vals = [cosine_floor_lr(s, peak_lr=1e-5, min_lr=1e-6, total_steps=100, warmup=5) for s in range(5, 101)]
    assert all(a >= b for a, b in itertools.pairwise(vals))
    assert vals[0] == pytest.approx(1e-5) and vals[-1] == pytest.approx(1e-6)
