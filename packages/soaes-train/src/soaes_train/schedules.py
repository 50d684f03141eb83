"""Learning-rate schedules of the paper as pure formulas, and their mapping onto transformers' schedulers.

The paper: warmup ratio 0.05 everywhere; CPT 1e-5 cosine-decayed to a floor of 1e-6; SFT constant after
warmup (stage 1: 1e-6, stage 2: 3.5e-6). Training uses transformers' own schedulers
(`cosine_with_min_lr`, `constant_with_warmup`); `lr_at_step` is the reference they are tested against.
"""

from __future__ import annotations

import math
from typing import Any

from .config import TrainConfig


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length as transformers computes it: ceil(ratio × total steps)."""
    return math.ceil(total_steps * warmup_ratio)


def cosine_floor_lr(step: int, *, peak_lr: float, min_lr: float, total_steps: int, warmup: int) -> float:
    """Linear warmup 0 → peak over `warmup` steps, then half-cosine from peak down to `min_lr` at the end:
    lr = min_lr + (peak − min_lr) · ½(1 + cos(π · (step − warmup)/(total − warmup)))."""
    if step < warmup:
        return peak_lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def constant_with_warmup_lr(step: int, *, peak_lr: float, warmup: int) -> float:
    """Linear warmup 0 → peak over `warmup` steps, then constant at peak."""
    if step < warmup:
        return peak_lr * step / max(1, warmup)
    return peak_lr


def lr_at_step(train: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate `train` prescribes for optimiser step `step` (0-based) of `total_steps`."""
    warm = warmup_steps(total_steps, train.warmup_ratio)
    if train.lr_scheduler == "cosine_floor":
        return cosine_floor_lr(step, peak_lr=train.learning_rate, min_lr=train.min_lr, total_steps=total_steps,
                               warmup=warm)
    if train.lr_scheduler == "constant_with_warmup":
        return constant_with_warmup_lr(step, peak_lr=train.learning_rate, warmup=warm)
    if train.lr_scheduler == "cosine":
        return cosine_floor_lr(step, peak_lr=train.learning_rate, min_lr=0.0, total_steps=total_steps, warmup=warm)
    if train.lr_scheduler == "linear":
        if step < warm:
            return train.learning_rate * step / max(1, warm)
        return train.learning_rate * max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return train.learning_rate  # constant


def hf_scheduler_args(train: TrainConfig) -> dict[str, Any]:
    """`TrainingArguments` keywords (`lr_scheduler_type`, `lr_scheduler_kwargs`, `warmup_steps`) for `train`.

    The warmup ratio is passed as a fraction to `warmup_steps` (transformers ≥ 5 takes a float < 1 as a
    ratio and rounds it up, like `warmup_steps()` above).
    """
    kind = {"cosine_floor": "cosine_with_min_lr", "constant_with_warmup": "constant_with_warmup",
            "cosine": "cosine", "linear": "linear", "constant": "constant"}[train.lr_scheduler]
    kwargs: dict[str, Any] = {"min_lr": train.min_lr} if kind == "cosine_with_min_lr" else {}
    return {"lr_scheduler_type": kind, "lr_scheduler_kwargs": kwargs, "warmup_steps": train.warmup_ratio}
