"""Online distillation during speculative decoding (after Liu et al., "Online Speculative Decoding", 2023).

Requests are served with `soaes_specdec.SpeculativeDecoder`. After each request the target's and draft's
logits on the served sequence are compared; positions where the draft's token would be rejected (its
argmax differs from the target's) are buffered with the target's logits there. When the buffer holds
`buffer_threshold` positions the draft takes `update_steps` optimizer steps of `distillation_loss` on them
and the buffer is cleared. The acceptance of every request is recorded, so the stream shows whether the
draft adapts. (A serving system has the target logits from verification already; here one teacher-forced
pass recomputes the same values, which keeps the decoder untouched.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from soaes_core.errors import InvalidArgumentError
from soaes_specdec.decoding import SpeculativeDecoder

from .losses import distillation_loss
from .trainer import KDConfig


@dataclass
class OnlineConfig:
    """Serving and update settings of online distillation."""

    num_speculative_tokens: int = 3
    max_new_tokens: int = 64
    do_sample: bool = False
    top_p: float = 1.0
    buffer_threshold: int = 64
    update_steps: int = 4
    learning_rate: float = 5e-4
    kd: KDConfig = field(default_factory=KDConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.buffer_threshold < 1 or self.update_steps < 1:
            raise ValueError("buffer_threshold and update_steps must be ≥ 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


@dataclass
class OnlineResult:
    """Per-request acceptance over the stream and the updates made."""

    acceptance: list[float]
    proposed: list[int]
    accepted: list[int]
    updates: int
    buffered_positions: int

    def window_acceptance(self, start: int, end: int | None = None) -> float:
        """Token-weighted acceptance (accepted / proposed) over requests [start, end)."""
        p = sum(self.proposed[start:end])
        return sum(self.accepted[start:end]) / p if p else 0.0


@torch.no_grad()
def rejected_positions(target: Any, draft: Any, sequence: torch.Tensor, first: int) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Positions t ≥ first-1 (predicting generated tokens) where the draft's argmax ≠ the target's, with the
    target's logits there: (positions (N,), target logits (N, V))."""
    ids = sequence[None]
    t_logits = target(input_ids=ids, use_cache=False).logits[0, first - 1:-1].float()
    d_logits = draft(input_ids=ids, use_cache=False).logits[0, first - 1:-1].float()
    bad = (t_logits.argmax(-1) != d_logits.argmax(-1)).nonzero().squeeze(-1)
    return bad + first - 1, t_logits[bad]


def online_distill(target: Any, draft: Any, prompts: Sequence[Sequence[int]], config: OnlineConfig | None = None,
                   eos_token_id: int | Sequence[int] | None = None) -> OnlineResult:
    """Serve `prompts` in order with speculative decoding, updating `draft` in place from rejected positions."""
    cfg = config or OnlineConfig()
    if not prompts:
        raise InvalidArgumentError("online distillation needs at least one prompt")
    target.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=cfg.learning_rate)
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=cfg.num_speculative_tokens)
    gen = torch.Generator().manual_seed(cfg.seed)
    buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (sequence, positions, target logits)
    buffered = 0
    result = OnlineResult([], [], [], 0, 0)
    for prompt in prompts:
        draft.eval()
        out = decoder.generate(torch.tensor([list(prompt)]), max_new_tokens=cfg.max_new_tokens,
                               do_sample=cfg.do_sample, top_p=cfg.top_p, eos_token_id=eos_token_id, generator=gen)
        s = out.stats
        result.acceptance.append(s.acceptance_rate)
        result.proposed.append(s.proposed)
        result.accepted.append(s.accepted)
        seq = out.sequences[0, :out.sequence_lengths[0]].clone()
        if seq.numel() <= len(prompt):
            continue
        pos, t_logits = rejected_positions(target, draft, seq, len(prompt))
        if pos.numel():
            buffer.append((seq, pos, t_logits))
            buffered += int(pos.numel())
            result.buffered_positions += int(pos.numel())
        if buffered >= cfg.buffer_threshold:
            _update(draft, optimizer, buffer, cfg)
            result.updates += 1
            buffer, buffered = [], 0
    draft.eval()
    return result


def _update(draft: Any, optimizer: torch.optim.Optimizer, buffer: list[tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]],
            cfg: OnlineConfig) -> None:
    draft.train()
    for _ in range(cfg.update_steps):
        optimizer.zero_grad()
        total = 0.0
        for seq, pos, t_logits in buffer:
            logits = draft(input_ids=seq[None], use_cache=False).logits[0, pos]
            labels = seq[pos + 1]
            loss = distillation_loss(logits[None], t_logits[None], labels[None], alpha=cfg.kd.alpha,
                                     temperature=cfg.kd.temperature, divergence=cfg.kd.divergence,
                                     shift_labels=False) * (pos.numel() / sum(p.numel() for _, p, _ in buffer))
            loss.backward()
            total += float(loss)
        optimizer.step()
    optimizer.zero_grad()
