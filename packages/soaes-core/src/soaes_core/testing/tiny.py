"""Build a tiny random `Qwen2ForCausalLM` with a real tokenizer, deterministically from a seed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..models import DEFAULT_MODEL, load_tokenizer

TINY_QWEN2_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def make_tiny_qwen2(out_dir: str | os.PathLike[str], seed: int = 0, tokenizer_spec: str = DEFAULT_MODEL,
                    **overrides: Any) -> Path:
    """Save a seeded random Qwen2 (vocab = the tokenizer's) plus that tokenizer to `out_dir`; returns it.

    The default tokenizer is the embedded SmolLM2 one (real BPE + chat template, 49,152 tokens).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = load_tokenizer(tokenizer_spec)
    params = {**TINY_QWEN2_DEFAULTS, **overrides}
    params.setdefault("vocab_size", len(tok))
    config = Qwen2Config(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, **params)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
