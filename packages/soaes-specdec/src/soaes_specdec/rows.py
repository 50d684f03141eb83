"""The state of rows that decode together, shared by every decoder: the token buffer with per-row lengths and stop
flags (`_Rows`), per-row sampling (`RowSampling`), the counters (`SpecStats`) and the output (`SpecDecodeOutput`).

Rows of a batch advance independently (per-row lengths), and every row stops exactly at EOS or `max_new_tokens`,
even in the middle of a speculative block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from soaes_core.errors import InvalidArgumentError

from . import sampling, verify
from .runner import CachedCausalLM
from .sampling import SamplingParams

# Called after every step with each row's newly appended tokens (e.g. to stream text to a terminal).
Streamer = Callable[[list[list[int]]], None]


@dataclass
class SpecStats:
    """Counters of one generate call. acceptance_rate = accepted / proposed (draft tokens); mean_accepted_length =
    new tokens per row per decode-phase target call (bonus token included; the prefill call is not counted)."""

    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    new_tokens: int = 0
    decode_row_calls: int = 0
    decode_tokens: int = 0
    wall_time_s: float = 0.0
    position_proposed: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)
    lookup_proposed: int = 0  # of `proposed`: tokens that came from prompt lookup (SpeculativeDecoder lookup_tokens)
    lookup_accepted: int = 0
    block_sizes: dict[int, int] = field(default_factory=dict)  # decode steps per block size n (0 = a plain step)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.decode_tokens / self.decode_row_calls if self.decode_row_calls else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """P(draft token i accepted) per block position i (counts every block that proposed position i)."""
        return [a / p if p else 0.0 for a, p in zip(self.position_accepted, self.position_proposed, strict=False)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "proposed": self.proposed, "accepted": self.accepted, "target_calls": self.target_calls,
            "draft_calls": self.draft_calls, "new_tokens": self.new_tokens,
            "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length,
            "wall_time_s": self.wall_time_s, "tokens_per_s": self.tokens_per_s,
            "acceptance_by_position": self.acceptance_by_position,
            "lookup_proposed": self.lookup_proposed, "lookup_accepted": self.lookup_accepted,
            "block_sizes": {str(n): c for n, c in sorted(self.block_sizes.items())},
        }

    def __add__(self, other: SpecStats) -> SpecStats:
        """Counters of both runs summed (per-position counts element-wise, the shorter list padded with 0)."""
        if not isinstance(other, SpecStats):
            return NotImplemented
        width = max(len(self.position_proposed), len(other.position_proposed))

        def padded(xs: list[int]) -> list[int]:
            return xs + [0] * (width - len(xs))

        return SpecStats(
            proposed=self.proposed + other.proposed, accepted=self.accepted + other.accepted,
            target_calls=self.target_calls + other.target_calls, draft_calls=self.draft_calls + other.draft_calls,
            new_tokens=self.new_tokens + other.new_tokens,
            decode_row_calls=self.decode_row_calls + other.decode_row_calls,
            decode_tokens=self.decode_tokens + other.decode_tokens, wall_time_s=self.wall_time_s + other.wall_time_s,
            lookup_proposed=self.lookup_proposed + other.lookup_proposed,
            lookup_accepted=self.lookup_accepted + other.lookup_accepted,
            block_sizes={n: self.block_sizes.get(n, 0) + other.block_sizes.get(n, 0)
                         for n in sorted({*self.block_sizes, *other.block_sizes})},
            position_proposed=[a + b for a, b in zip(padded(self.position_proposed),
                                                     padded(other.position_proposed), strict=True)],
            position_accepted=[a + b for a, b in zip(padded(self.position_accepted),
                                                     padded(other.position_accepted), strict=True)])

    @classmethod
    def merge(cls, stats: Iterable[SpecStats]) -> SpecStats:
        """The counters of many generate calls summed into one (rates then are ratios of the totals)."""
        total = cls()
        for s in stats:
            total = total + s
        return total

    def record_block(self, num_draft: torch.Tensor, num_accepted: torch.Tensor, active: torch.Tensor,
                     width: int) -> None:
        """Add one verification's per-row outcomes (active rows only) to the counters."""
        if len(self.position_proposed) < width:
            grow = width - len(self.position_proposed)
            self.position_proposed += [0] * grow
            self.position_accepted += [0] * grow
        nd, na = num_draft[active], num_accepted[active]
        self.proposed += int(nd.sum())
        self.accepted += int(na.sum())
        for i in range(width):
            self.position_proposed[i] += int((nd > i).sum())
            self.position_accepted[i] += int((na > i).sum())


@dataclass
class SpecDecodeOutput:
    """`sequences` [B, L] = prompt + new tokens, right-padded with `pad_token_id`; `sequence_lengths` per row."""

    sequences: torch.Tensor
    stats: SpecStats
    sequence_lengths: list[int]
    prompt_lengths: list[int]

    def new_tokens(self, row: int = 0) -> list[int]:
        """The generated tokens of one row (no prompt, no padding)."""
        return self.sequences[row, self.prompt_lengths[row]:self.sequence_lengths[row]].tolist()


# ----------------------------------------------------------------------------------------- argument checks


def normalise_prompts(input_ids: Any, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Ragged list of 1-D LongTensor prompts from a [B, P] tensor (+ optional 0/1 padding mask) or a list."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2:
            raise InvalidArgumentError(f"input_ids must be 1-D or 2-D, got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            rows = list(ids)
        else:
            mask = attention_mask.reshape(ids.shape).bool()
            rows = [row[m] for row, m in zip(ids, mask, strict=False)]
    elif isinstance(input_ids, Sequence):
        rows = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in input_ids]
    else:
        raise InvalidArgumentError(
            f"input_ids must be a tensor or a list of token lists, got {type(input_ids).__name__}")
    if not rows:
        raise InvalidArgumentError("input_ids is empty: give at least one prompt")
    for i, r in enumerate(rows):
        if r.numel() == 0:
            raise InvalidArgumentError(f"prompt {i} is empty: every prompt needs at least one token")
    return [r.long() for r in rows]


def eos_set(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """EOS ids as a list (empty = never stop early)."""
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def check_lengths(runner: CachedCausalLM, prompts: list[torch.Tensor], max_new_tokens: int) -> None:
    """max_new_tokens >= 1, token ids inside the vocabulary, prompt + max_new_tokens within the context."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    longest = max(r.numel() for r in prompts)
    if runner.max_positions and longest + max_new_tokens > runner.max_positions:
        raise InvalidArgumentError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{runner.max_positions} tokens")
    for i, r in enumerate(prompts):
        if int(r.min()) < 0 or int(r.max()) >= runner.vocab_size:
            raise InvalidArgumentError(f"prompt {i} has token ids outside the vocabulary [0, {runner.vocab_size})")


def check_num_speculative_tokens(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidArgumentError(f"num_speculative_tokens must be an int >= 1, got {n!r}")
    return n


def cap_block_width(width: int, remaining: int) -> int:
    """`width` proposals per block capped to the `remaining` new tokens (at least 1): a block appends at most
    `remaining` tokens, so a proposal past them is never used."""
    return max(1, min(width, remaining))


def _row_cap(width: int, rows: _Rows) -> int:
    """`cap_block_width` for the active row with the most new tokens left."""
    return cap_block_width(width, int(torch.where(rows.active, rows.budget, 0).max()))


# ----------------------------------------------------------------------------------------- per-row sampling


class RowSampling:
    """Per-row sampling settings and random streams, for a batch whose rows were asked for with different settings
    (a `session.DecodeSession`'s requests). Row r draws its draft proposals from `draft_generators[r]` and its
    target tokens and verification uniforms from `target_generators[r]`, with its own `params[r]`, so what it
    draws does not depend on the other rows; `do_sample` is True when any row samples. With `budgets` (each row's
    new tokens left), a row verifies at most budget - 1 proposals, those it can keep, whatever width the block has."""

    def __init__(self, params: Sequence[SamplingParams], draft_generators: Sequence[torch.Generator],
                 target_generators: Sequence[torch.Generator], budgets: Sequence[int] | None = None) -> None:
        if not len(params) == len(draft_generators) == len(target_generators):
            raise InvalidArgumentError("RowSampling needs one SamplingParams and two generators per row")
        self.params = list(params)
        self.draft_generators, self.target_generators = list(draft_generators), list(target_generators)
        self.budgets = None if budgets is None else [int(b) for b in budgets]
        self.do_sample = any(p.do_sample for p in self.params)

    def sample(self, logits: torch.Tensor, sampler: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
               draft: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`sampler` on each row with that row's params and generator: tokens [B] and q [B, V] (one-hot for greedy
        rows) when any row samples, else None."""
        gens = self.draft_generators if draft else self.target_generators
        tokens, probs = [], []
        for r, params in enumerate(self.params):
            tok, q = sampler(logits[r:r + 1], params, gens[r] if params.do_sample else None)
            tokens.append(tok)
            if self.do_sample:
                probs.append(q if q is not None else torch.nn.functional.one_hot(tok, logits.shape[-1]).float())
        return torch.cat(tokens), (torch.cat(probs) if probs else None)

    def verify(self, logits: torch.Tensor, drafts: torch.Tensor, probs: torch.Tensor | None,
               num_draft: torch.Tensor | None, use_kernel: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`verify.verify_block` row by row over each row's real proposals only (its uniforms then depend on its
        own proposal count, not the block's width): (num_accepted [B], next_token [B])."""
        accepted, tokens = [], []
        for r, params in enumerate(self.params):
            nd = drafts.shape[1] if num_draft is None else int(num_draft[r])
            if self.budgets is not None:  # later proposals could not be kept: verifying them only draws uniforms
                nd = min(nd, max(self.budgets[r] - 1, 0))
            q = probs[r:r + 1, :nd] if (probs is not None and params.do_sample) else None
            a, t = verify.verify_block(logits[r:r + 1, :nd + 1], drafts[r:r + 1, :nd], q, None, params,
                                       self.target_generators[r] if params.do_sample else None, use_kernel=use_kernel)
            accepted.append(a)
            tokens.append(t)
        return torch.cat(accepted), torch.cat(tokens)


Sampling = SamplingParams | RowSampling


def _draw(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None,
          sampler: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = sampling.sample_next,
          draft: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row through `sampler`: one call for the batch, or row by row under `RowSampling`."""
    if isinstance(params, RowSampling):
        return params.sample(logits, sampler, draft)
    return sampler(logits, params, generator)


def _verify_block(logits: torch.Tensor, drafts: torch.Tensor, probs: torch.Tensor | None,
                  num_draft: torch.Tensor | None, params: Sampling, generator: torch.Generator | None,
                  use_kernel: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify.verify_block` for the batch, or row by row under `RowSampling`."""
    if isinstance(params, RowSampling):
        return params.verify(logits, drafts, probs, num_draft, use_kernel)
    return verify.verify_block(logits, drafts, probs, num_draft, params, generator, use_kernel=use_kernel)


# ----------------------------------------------------------------------------------------- shared state


class _Rows:
    """Per-row token buffer, lengths and stop flags of one batched generation."""

    def __init__(self, prompts: list[torch.Tensor], max_new_tokens: int, slack: int, pad_id: int,
                 eos: list[int], device: torch.device, streamer: Streamer | None = None) -> None:
        self.streamer = streamer
        self.batch = len(prompts)
        self.prompt_lengths = torch.tensor([p.numel() for p in prompts], device=device)
        self.max_prompt = int(self.prompt_lengths.max())
        self.tokens = torch.full((self.batch, self.max_prompt + max_new_tokens + slack), pad_id,
                                 dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            self.tokens[i, :p.numel()] = p.to(device)
        self.lengths = self.prompt_lengths.clone()
        self.budget = torch.full((self.batch,), max_new_tokens, device=device)
        self.active = torch.ones(self.batch, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.pad_id = pad_id

    @classmethod
    def slots(cls, batch: int, width: int, pad_id: int, eos: list[int], device: torch.device) -> _Rows:
        """Empty state for `batch` slots of up to `width` tokens each, filled by `fill` (a step session's rows)."""
        rows = cls.__new__(cls)
        rows.streamer, rows.batch, rows.max_prompt, rows.pad_id = None, batch, 0, pad_id
        rows.tokens = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
        rows.prompt_lengths = torch.zeros(batch, dtype=torch.long, device=device)
        rows.lengths = torch.zeros_like(rows.prompt_lengths)
        rows.budget = torch.zeros_like(rows.prompt_lengths)
        rows.active = torch.zeros(batch, dtype=torch.bool, device=device)
        rows.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        return rows

    def fill(self, slot: int, prompt: torch.Tensor, max_new_tokens: int) -> None:
        """Put a new prompt in `slot` (active, nothing generated yet)."""
        n = prompt.numel()
        self.tokens[slot].fill_(self.pad_id)
        self.tokens[slot, :n] = prompt.to(self.tokens.device)
        self.prompt_lengths[slot] = self.lengths[slot] = n
        self.budget[slot] = max_new_tokens
        self.active[slot] = True

    def move(self, src: int, dst: int) -> None:
        """Copy the state of slot `src` into slot `dst`."""
        for t in (self.tokens, self.prompt_lengths, self.lengths, self.budget, self.active):
            t[dst] = t[src]

    def view(self, start: int, stop: int, streamer: Streamer | None = None) -> _Rows:
        """Slots start..stop-1 as a batch of their own that shares this state's storage (its appends land here)."""
        rows = _Rows.__new__(_Rows)
        rows.streamer, rows.batch, rows.pad_id, rows.eos = streamer, stop - start, self.pad_id, self.eos
        for name in ("tokens", "prompt_lengths", "lengths", "budget", "active"):
            setattr(rows, name, getattr(self, name)[start:stop])
        rows.max_prompt = int(rows.prompt_lengths.max()) if stop > start else 0
        return rows

    def last_tokens(self) -> torch.Tensor:
        """[B] the newest token of each row (the pending input of the next target call)."""
        return self.tokens.gather(1, (self.lengths - 1).unsqueeze(1)).squeeze(1)

    def append(self, block: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Append block[b, :counts[b]] to active rows, cut at EOS and the token budget; returns counts kept."""
        width = block.shape[1]
        counts = torch.minimum(counts, self.budget) * self.active
        offsets = torch.arange(width, device=block.device)
        if self.eos is not None:
            is_eos = torch.isin(block, self.eos) & (offsets[None, :] < counts[:, None])
            has_eos = is_eos.any(dim=1)
            first_eos = torch.argmax(is_eos.to(torch.int8), dim=1)
            counts = torch.where(has_eos, first_eos + 1, counts)
        else:
            has_eos = torch.zeros_like(self.active)
        positions = self.lengths[:, None] + offsets[None, :]
        keep = offsets[None, :] < counts[:, None]
        current = self.tokens.gather(1, positions)
        self.tokens.scatter_(1, positions, torch.where(keep, block, current))
        if self.streamer is not None:
            self.streamer([row[:c] for row, c in zip(block.tolist(), counts.tolist(), strict=True)])
        self.lengths += counts
        self.budget -= counts
        self.active &= ~has_eos & (self.budget > 0)
        return counts

    def output(self, stats: SpecStats) -> SpecDecodeOutput:
        total = int(self.lengths.max())
        seqs = self.tokens[:, :total].clone()
        col = torch.arange(total, device=seqs.device)
        seqs[col[None, :] >= self.lengths[:, None]] = self.pad_id
        stats.new_tokens = int((self.lengths - self.prompt_lengths).sum())
        return SpecDecodeOutput(sequences=seqs, stats=stats, sequence_lengths=self.lengths.tolist(),
                                prompt_lengths=self.prompt_lengths.tolist())


def _prompt_block(rows: _Rows) -> torch.Tensor:
    return rows.tokens[:, :rows.max_prompt]


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` [B, w, ...] right-padded with zeros to `width` columns."""
    if x.shape[1] >= width:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], width - x.shape[1], *x.shape[2:]))], dim=1)


def _one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """The q of deterministic proposals: fp32 one-hot rows [B, w, V]."""
    probs = torch.zeros(*tokens.shape, vocab, device=tokens.device)
    return probs.scatter_(2, tokens.unsqueeze(2), 1.0)
