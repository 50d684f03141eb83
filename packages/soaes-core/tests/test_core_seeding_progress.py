"""Seeding reproduces random streams; progress passes items through unchanged."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from soaes_core.progress import progress, progress_enabled
from soaes_core.seeding import seed_everything


def test_seed_everything_reproduces_all_streams() -> None:
    def draw() -> tuple[float, float, float, float]:
        g = seed_everything(123)
        return (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=g)))

    assert draw() == draw()


def test_progress_passthrough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOAES_PROGRESS", "0")
    assert not progress_enabled()
    assert list(progress(range(5), desc="x")) == [0, 1, 2, 3, 4]
    monkeypatch.setenv("SOAES_PROGRESS", "1")
    assert progress_enabled()
