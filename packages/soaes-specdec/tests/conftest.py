"""Shared helpers for soaes-specdec tests: seeded tiny random Qwen2 models built directly from a config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and the shared CI box is oversubscribed: use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_qwen2(seed: int, layers: int = 2, vocab: int = 512, hidden: int = 64, init: float = 0.2,
                max_positions: int = 256, heads: int = 4, kv_heads: int = 2) -> Any:
    """A seeded random Qwen2ForCausalLM (tied head); larger `init` gives peakier next-token distributions."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, initializer_range=init, bos_token_id=0, eos_token_id=1,
                         pad_token_id=0)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def qwen2_factory() -> Callable[..., Any]:
    return build_qwen2
