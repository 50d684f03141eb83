"""A compiled one-token decoding step for `CachedCausalLM`: the whole step (embedding, norms, rotary, attention, MLPs,
head) traced once by `torch.compile` (inductor) into one graph, so the small ops around the matrix products are fused
into a few kernels and the per-op Python dispatch of the eager step goes away.

The step has fixed shapes, as in gpt-fast: K/V are written at the row's position with `index_copy_` and the query
attends over the whole cache buffer with positions past its own masked out, so a decoding loop runs one graph for
every position (no recompilation as the sequence grows; caches grow in power-of-two buckets). Masked keys contribute
exactly zero, the projections run the path the runner would run for one row (`stream_linear` or `F.linear`), and the
fused norms round like the eager ones up to float summation order: greedy output equals the eager runner's token for
token (tested).

Only one-row, one-token passes take the compiled step; prefill, verification blocks, batches, hidden-state requests
and feature-draft inputs run the eager `CachedCausalLM.forward` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from soaes_core.errors import InvalidArgumentError

from .runner import CachedCausalLM, apply_rotary, stream_linear

MIN_CAPACITY = 256
"""Caches are allocated at a power of two of at least this many tokens: a compiled step is specialised to its cache's
size, so growing the cache in buckets keeps recompilations to one per doubling."""

BACKENDS = ("inductor", "eager")
"""`torch.compile` backends the step accepts: "inductor" (fused C++ kernels) and "eager" (the same fixed-shape step
run op by op, no compiler: for checking and for hosts without a C++ toolchain)."""


class DecodeStep(torch.nn.Module):
    """One token of one row through a `CachedCausalLM`'s own modules (shared, not copied), over fixed-size caches."""

    def __init__(self, runner: CachedCausalLM, path: str) -> None:
        super().__init__()
        self.embed, self.norm, self.rotary, self.head = runner.embed, runner.norm, runner.rotary, runner.head
        self.layers = torch.nn.ModuleList(runner.layers)
        self.gated = list(runner._gated_mlp)
        self.head_dim, self.scaling = runner.head_dim, runner.scaling
        self.gqa = runner.num_heads != runner.num_kv_heads
        self.stream = path == "stream"

    def _linear(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        if self.stream and type(module) is torch.nn.Linear:
            return stream_linear(x, module.weight, module.bias)
        if self.stream and hasattr(module, "sub_weight"):  # a restricted draft head: its kept rows streamed
            return module(x, linear=stream_linear)
        return module(x)

    def forward(self, token: torch.Tensor, position: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> torch.Tensor:
        """Logits [1, 1, V] (fp32) of `token` [1, 1] at `position` [1]; writes its K/V into `keys`/`values`."""
        h = self.embed(token)
        cos, sin = self.rotary(h, position[None])
        slots = torch.arange(keys[0].shape[2], device=token.device)
        mask = (torch.zeros(slots.shape, dtype=h.dtype, device=h.device)
                .masked_fill(slots > position, float("-inf")).view(1, 1, 1, -1))
        for idx, layer in enumerate(self.layers):
            attn, x = layer.self_attn, layer.input_layernorm(h)
            q = self._linear(attn.q_proj, x).view(1, 1, -1, self.head_dim)
            k = self._linear(attn.k_proj, x).view(1, 1, -1, self.head_dim)
            v = self._linear(attn.v_proj, x).view(1, 1, -1, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            keys[idx].index_copy_(2, position, k)
            values[idx].index_copy_(2, position, v)
            out = F.scaled_dot_product_attention(q, keys[idx], values[idx], attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=self.gqa)
            h = h + self._linear(attn.o_proj, out.transpose(1, 2).reshape(1, 1, -1))
            x, mlp = layer.post_attention_layernorm(h), layer.mlp
            if self.gated[idx]:
                h = h + self._linear(mlp.down_proj,
                                     mlp.act_fn(self._linear(mlp.gate_proj, x)) * self._linear(mlp.up_proj, x))
            else:
                h = h + mlp(x)
        return self._linear(self.head, self.norm(h)).float()


class CompiledCachedCausalLM(CachedCausalLM):
    """A `CachedCausalLM` whose one-row, one-token passes run a compiled `DecodeStep` (compiled on first use, once
    per projection path and cache shape); every other pass runs the eager forward. A drop-in runner for
    `autoregressive_generate` and as the target or draft of the decoders."""

    def __init__(self, model: Any, linear: str = "auto", backend: str = "inductor") -> None:
        if backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        super().__init__(model, linear=linear)
        self.backend = backend
        self._steps: dict[str, Callable[..., torch.Tensor]] = {}

    def start(self, batch: int, capacity: int) -> Any:
        """`CachedCausalLM.start` with the capacity rounded up to a power of two >= `MIN_CAPACITY`."""
        return super().start(batch, max(MIN_CAPACITY, 1 << max(int(capacity) - 1, 0).bit_length()))

    def _step_for(self, path: str) -> Callable[..., torch.Tensor]:
        if path not in self._steps:
            step = DecodeStep(self, path)
            self._steps[path] = (step if self.backend == "eager"
                                 else torch.compile(step, backend=self.backend, fullgraph=True, dynamic=False))
        return self._steps[path]

    def forward(self, tokens: torch.Tensor, starts: torch.Tensor, logits_at: torch.Tensor | None = None,
                need_logits: bool = True, inputs_embeds: torch.Tensor | None = None,
                return_hidden: bool | str = False) -> Any:
        """`CachedCausalLM.forward`, through the compiled step for one row and one token (logits wanted)."""
        one = (tuple(tokens.shape) == (1, 1) and need_logits and inputs_embeds is None and not return_hidden
               and self.cache is not None and not self.batch_invariant)
        if not one or int(starts[0]) + 1 > self.cache.capacity:  # a full cache: the eager forward refuses it
            return super().forward(tokens, starts, logits_at, need_logits, inputs_embeds, return_hidden)
        path = self.path_for_rows(1)
        if path == "prepacked":  # never chosen for one row; keep the eager forward's semantics if it were
            return super().forward(tokens, starts, logits_at, need_logits, inputs_embeds, return_hidden)
        self._path = path
        with torch.no_grad():
            logits = self._step_for(path)(tokens, starts.to(torch.long).reshape(1), self.cache.keys, self.cache.values)
        return logits[:, 0] if logits_at is not None else logits


def compile_decode_step(runner: CachedCausalLM, backend: str = "inductor") -> CompiledCachedCausalLM:
    """A `CompiledCachedCausalLM` over `runner`'s model with `runner`'s one-row projection path."""
    if isinstance(runner, CompiledCachedCausalLM) and runner.backend == backend:
        return runner
    one = runner.path_for_rows(1)
    return CompiledCachedCausalLM(runner.model, linear=one if one in ("stream", "module") else runner.linear_mode,
                                  backend=backend)
