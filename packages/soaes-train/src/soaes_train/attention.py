"""Choose the attention implementation for packed training and check that packing is exact.

`flash_attention_2` (optional extra `soaes-train[flash]`, CUDA only) runs packed rows through its varlen
kernel; otherwise SDPA (or eager) gets a block-diagonal causal mask that transformers builds from
`position_ids` restarting at 0 (`transformers.masking_utils.find_packed_sequence_indices`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Any

import torch

from soaes_core.errors import ConfigError

from .collator import PackedCollator, PackedLayout

log = logging.getLogger(__name__)


def flash_attn_available() -> bool:
    """True when the `flash_attn` package is importable and a CUDA device is present."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def available_attn_implementations() -> list[str]:
    """Attention implementations that can run packed batches exactly on this machine."""
    impls = ["sdpa", "eager"]
    if flash_attn_available():
        impls.insert(0, "flash_attention_2")
    return impls


def choose_attn_implementation(requested: str = "auto") -> str:
    """`auto` → flash_attention_2 when available, else sdpa; an explicit request is checked."""
    if requested == "auto":
        return available_attn_implementations()[0]
    if requested not in ("flash_attention_2", "sdpa", "eager"):
        raise ConfigError(f"train.attn_implementation: unknown implementation {requested!r}")
    if requested == "flash_attention_2" and not flash_attn_available():
        raise ConfigError("train.attn_implementation: flash_attention_2 needs CUDA and flash-attn "
                          "(pip install 'soaes-train[flash]'); use 'auto' or 'sdpa'")
    return requested


def packed_layout_for(attn_implementation: str) -> PackedLayout:
    """Flash varlen takes the whole batch as one flattened row; SDPA/eager keep rows (no T×T blow-up)."""
    return "flatten" if attn_implementation.startswith("flash") else "rows"


@torch.no_grad()
def packed_logits_gap(model: Any, sequences: Sequence[Sequence[int]], layout: PackedLayout = "rows",
                      pad_token_id: int = 0) -> float:
    """Max |packed − separate| / max|separate| over the logits of `sequences` run packed in one row versus
    one at a time. ~1e-6 in fp32 when packing is exact; O(1) when sequences leak into each other."""
    device = next(model.parameters()).device
    row = {"input_ids": [t for s in sequences for t in s],
           "position_ids": [p for s in sequences for p in range(len(s))]}
    batch = PackedCollator(pad_token_id=pad_token_id, layout=layout)([row])
    batch.pop("labels")
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    packed = model(**batch, use_cache=False).logits[0].float()
    sep = torch.cat([model(input_ids=torch.tensor([list(s)], device=device), use_cache=False).logits[0].float()
                     for s in sequences])
    return float((packed - sep).abs().max() / sep.abs().max().clamp_min(1e-12))
