"""Stage outputs besides the model: the loss curve (JSON + PNG) read from the Trainer's log history."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soaes_core import atomic_write_bytes, atomic_write_json


def loss_curve(log_history: Sequence[dict[str, Any]]) -> dict[str, list[float]]:
    """Training-loss points (step, loss, learning rate, grad norm) from `Trainer.state.log_history`."""
    out: dict[str, list[float]] = {"step": [], "loss": [], "learning_rate": [], "grad_norm": []}
    for entry in log_history:
        if "loss" not in entry or "step" not in entry:
            continue
        out["step"].append(int(entry["step"]))
        out["loss"].append(float(entry["loss"]))
        out["learning_rate"].append(float(entry.get("learning_rate", float("nan"))))
        out["grad_norm"].append(float(entry.get("grad_norm", float("nan"))))
    return out


def mean_logged_loss(curve: dict[str, list[float]], global_step: int) -> float | None:
    """Mean loss per optimiser step over steps 1..`global_step`, from the curve's logged points (each the mean over
    the steps since the previous one); None when the curve does not reach `global_step`."""
    steps, losses = curve["step"], curve["loss"]
    if not steps or steps[-1] != global_step:
        return None
    total, prev = 0.0, 0
    for step, loss in zip(steps, losses, strict=True):
        total += loss * (step - prev)
        prev = step
    return total / global_step


def write_loss_curve(out_dir: str | os.PathLike[str], curve: dict[str, list[float]], title: str) -> list[Path]:
    """Write `loss_curve.json` and `loss_curve.png` (loss and learning rate against step) into `out_dir`."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = [atomic_write_json(out_dir / "loss_curve.json", curve)]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(curve["step"], curve["loss"], marker="." if len(curve["step"]) < 50 else None, color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curve["learning_rate"]:
        ax2 = ax.twinx()
        ax2.plot(curve["step"], curve["learning_rate"], color="tab:orange", alpha=0.7)
        ax2.set_ylabel("learning rate", color="tab:orange")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    paths.append(atomic_write_bytes(out_dir / "loss_curve.png", buf.getvalue()))
    return paths
