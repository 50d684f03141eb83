"""A pre-allocated key/value cache whose rollback is moving per-row length pointers (as in gpt-fast and vLLM).

The cache owns fixed buffers [layers][batch, kv_heads, capacity, head_dim]; rows write at their own
offsets, so rows of a batch may hold different numbers of tokens. Entries beyond a row's length are stale
and are masked out, then overwritten by the next write: rolling back costs nothing.
"""

from __future__ import annotations

import torch

from soaes_core.errors import InvalidArgumentError


class StaticKVCache:
    """Per-layer key and value buffers plus per-row valid lengths [B] (the pointers).

    The lengths change only through `set_lengths`, `rollback` and `reset` (as gpt-fast moves `input_pos`),
    so every place that moves a pointer is a method call one can search for.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                 lengths: torch.Tensor | None = None) -> None:
        self.keys, self.values = keys, values
        self._lengths = (lengths.clone() if lengths is not None
                         else torch.zeros(keys[0].shape[0], dtype=torch.long, device=keys[0].device))

    @classmethod
    def allocate(cls, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> StaticKVCache:
        """Zeroed buffers for `batch` rows of up to `capacity` tokens each."""
        shape = (batch, kv_heads, capacity, head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(keys=keys, values=values)

    @property
    def lengths(self) -> torch.Tensor:
        """Valid tokens per row [B] (read-only: move it with `set_lengths` / `rollback` / `reset`)."""
        return self._lengths

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
        self._lengths = torch.zeros_like(self._lengths)

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Mark the first `lengths[b]` positions of each row valid, after a forward wrote them (or to drop
        entries past them: only the pointer moves, no data is touched). Copied, so the caller may reuse `lengths`."""
        if lengths.shape != self._lengths.shape:
            raise InvalidArgumentError(f"lengths must have shape {tuple(self._lengths.shape)}, "
                                       f"got {tuple(lengths.shape)}")
        self._lengths = lengths.to(dtype=torch.long, device=self._lengths.device, copy=True)

    def rollback(self, lengths: torch.Tensor) -> None:
        """Truncate each row to at most `lengths[b]` tokens: only the pointer moves, no data is touched."""
        self._lengths = torch.minimum(self._lengths, lengths)


def write_block(buffer: torch.Tensor, new: torch.Tensor, common_start: int | None, positions: torch.Tensor) -> None:
    """Write `new` [B, H, T, D] into `buffer` at per-row `positions` [B, T] (a slice when all rows agree)."""
    if common_start is not None:
        buffer[:, :, common_start:common_start + new.shape[2]] = new
    else:
        index = positions[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[3])
        buffer.scatter_(2, index, new)
