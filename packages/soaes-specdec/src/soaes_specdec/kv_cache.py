"""A pre-allocated key/value cache whose rollback is moving per-row length pointers (as in gpt-fast and vLLM).

The cache owns fixed buffers [layers][batch, kv_heads, capacity, head_dim]; rows write at their own
offsets, so rows of a batch may hold different numbers of tokens. Entries beyond a row's length are stale
and are masked out, then overwritten by the next write: rolling back costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StaticKVCache:
    """Per-layer key and value buffers plus per-row valid lengths [B] (the pointers)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @classmethod
    def allocate(cls, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> StaticKVCache:
        """Zeroed buffers for `batch` rows of up to `capacity` tokens each."""
        shape = (batch, kv_heads, capacity, head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(keys=keys, values=values, lengths=torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def fits(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether these buffers can be reused for a run of this shape."""
        k = self.keys[0]
        return k.shape[0] == batch and k.shape[2] >= capacity and k.dtype == dtype and k.device == device

    def reset(self) -> None:
        """Forget every row's contents (buffers are kept)."""
        self.lengths = torch.zeros_like(self.lengths)

    def rollback(self, lengths: torch.Tensor) -> None:
        """Truncate each row to `lengths[b]` tokens: only the pointer moves, no data is touched."""
        self.lengths = torch.minimum(self.lengths, lengths)


def write_block(buffer: torch.Tensor, new: torch.Tensor, common_start: int | None, positions: torch.Tensor) -> None:
    """Write `new` [B, H, T, D] into `buffer` at per-row `positions` [B, T] (a slice when all rows agree)."""
    if common_start is not None:
        buffer[:, :, common_start:common_start + new.shape[2]] = new
    else:
        index = positions[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[3])
        buffer.scatter_(2, index, new)
