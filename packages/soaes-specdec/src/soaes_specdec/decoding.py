"""Decoders sharing one sampling path: plain autoregressive, prompt lookup, and draft-model speculative decoding
(with a layer draft, a causal LM of its own, or a feature-conditioned `FeatureDraft` that reads the target's
hidden states).

All three draw every token through `sampling.sample_next` / `verify.verify_block`, so for greedy decoding
their outputs are identical token for token and for sampling they draw from the same distribution. Rows of a
batch advance independently (per-row cache lengths), and every row stops exactly at EOS or
`max_new_tokens`, even in the middle of a speculative block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from soaes_core.errors import InvalidArgumentError

from . import sampling, verify
from .draft import RestrictedLMHead
from .feature_draft import FeatureDraft, check_draft_target
from .feature_runner import FeatureDraftRunner
from .lookup import find_ngram_continuation, propose_ngram_continuations
from .runner import CachedCausalLM
from .sampling import SamplingParams

# Called after every step with each row's newly appended tokens (e.g. to stream text to a terminal).
Streamer = Callable[[list[list[int]]], None]

# The draft's sampler (module level so statistical tests can swap in known-bad samplers to show they fail).
draft_sample: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = sampling.sample_next


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


def _as_runner(model: Any, batch_invariant: bool = False) -> CachedCausalLM:
    """`model` as a cached runner; with `batch_invariant`, one that runs each row alone and each cached
    continuation token by token, bit-identical to plain batch-1 decoding (runner.py)."""
    if isinstance(model, (FeatureDraft, FeatureDraftRunner)):
        raise InvalidArgumentError("a feature draft (FeatureDraft) cannot decode on its own or serve as a target: it "
                                   "reads a target's hidden states; pass it as the draft of "
                                   "SpeculativeDecoder(target, draft)")
    runner = model if isinstance(model, CachedCausalLM) else CachedCausalLM(model)
    return runner.with_batch_invariance() if batch_invariant else runner


def _check_prepack(runner: CachedCausalLM, prepack: bool) -> bool:
    """`prepack` as a bool, refused in one line where the runner cannot pack (`CachedCausalLM.require_prepack`)."""
    if not isinstance(prepack, bool):
        raise InvalidArgumentError(f"prepack must be True or False, got {prepack!r}")
    if prepack:
        runner.require_prepack()
    return prepack


def _pad_id(runner: CachedCausalLM, eos: list[int]) -> int:
    pad = getattr(runner.config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return int(pad)


def _prefill(runner: CachedCausalLM, rows: _Rows, need_logits: bool = True) -> torch.Tensor | None:
    """Run every prompt through `runner`, set its cache lengths; logits [B, V] at each prompt's last token."""
    starts = torch.zeros(rows.batch, dtype=torch.long, device=rows.tokens.device)
    logits = runner.forward(_prompt_block(rows), starts, logits_at=rows.prompt_lengths - 1, need_logits=need_logits)
    runner.cache.set_lengths(rows.prompt_lengths)
    return logits


# ----------------------------------------------------------------------------------------- autoregressive


def _start_rows(runner: CachedCausalLM, input_ids: Any, attention_mask: torch.Tensor | None, max_new_tokens: int,
                block: int, eos_token_id: int | Sequence[int] | None, streamer: Streamer | None) -> _Rows:
    """Validate the prompts, build the row state for blocks of `block` tokens and size `runner`'s cache for them."""
    prompts = normalise_prompts(input_ids, attention_mask)
    check_lengths(runner, prompts, max_new_tokens)
    eos = eos_set(eos_token_id)
    block = min(block, max_new_tokens)  # blocks propose at most max_new_tokens - 1 tokens (cap_block_width)
    rows = _Rows(prompts, max_new_tokens, block, _pad_id(runner, eos), eos, runner.device, streamer)
    runner.start(rows.batch, rows.max_prompt + max_new_tokens + block)
    return rows


def _prefill_and_sample_first(runner: CachedCausalLM, rows: _Rows, params: Sampling,
                              generator: torch.Generator | None, stats: SpecStats) -> None:
    """Prefill the target on the prompts and append the first new token of every row."""
    logits = _prefill(runner, rows)
    stats.target_calls += 1
    first, _ = _draw(logits, params, generator)
    rows.append(first.unsqueeze(1), torch.ones_like(first))


def _plain_step(runner: CachedCausalLM, rows: _Rows, params: Sampling, generator: torch.Generator | None,
                stats: SpecStats) -> None:
    """One plain decoding step: a target call on every row's pending token, one token appended per active row."""
    starts = rows.lengths - 1
    active_rows = int(rows.active.sum())
    logits = runner.forward(rows.last_tokens().unsqueeze(1), starts, logits_at=torch.zeros_like(starts))
    runner.cache.set_lengths(rows.lengths)
    stats.target_calls += 1
    stats.decode_row_calls += active_rows
    token, _ = _draw(logits, params, generator)
    stats.decode_tokens += int(rows.append(token.unsqueeze(1), torch.ones_like(token)).sum())


@torch.inference_mode()
def autoregressive_generate(model: Any, input_ids: Any, max_new_tokens: int, do_sample: bool = False,
                            temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                            eos_token_id: int | Sequence[int] | None = None,
                            generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
                            streamer: Streamer | None = None, batch_invariant: bool = False) -> SpecDecodeOutput:
    """Plain KV-cached decoding (one target call per token) with the same sampling code as the other decoders.

    `batch_invariant` steps the rows of a batch one at a time, so each equals its batch-1 decoding bit for bit.
    """
    t0 = time.perf_counter()
    runner = _as_runner(model, batch_invariant)
    params = SamplingParams(do_sample, temperature, top_p, top_k)
    rows = _start_rows(runner, input_ids, attention_mask, max_new_tokens, 1, eos_token_id, streamer)
    stats = SpecStats()
    _prefill_and_sample_first(runner, rows, params, generator, stats)
    while bool(rows.active.any()):
        _plain_step(runner, rows, params, generator, stats)
    stats.wall_time_s = time.perf_counter() - t0
    return rows.output(stats)


# ----------------------------------------------------------------------------------------- speculative step


def padded_block_width(target: CachedCausalLM, batch: int, width: int, max_width: int) -> int:
    """The draft width a verify of `width` drafts per row runs at: `width`, or a wider one (at most `max_width`)
    whose batch x (width + 1) rows have prepacked weights that were measured faster than the unpadded pass
    (`CachedCausalLM.pass_rows`). Padding rows are computed and discarded."""
    if width < 1:
        return width
    rows = target.pass_rows(batch * (width + 1))
    padded = rows // batch - 1
    return padded if rows % batch == 0 and width < padded <= max_width else width


def prepack_rows(batch: int, widths: Iterable[int]) -> list[int]:
    """The row counts a verify of each block width in `widths` uses for `batch` rows: batch x (width + 1)."""
    return sorted({batch * (w + 1) for w in widths if w > 0})


def _verify_and_append(target: CachedCausalLM, rows: _Rows, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                       num_draft: torch.Tensor, params: Sampling, generator: torch.Generator | None,
                       stats: SpecStats, use_kernel: bool | None, return_hidden: bool = False,
                       from_lookup: torch.Tensor | None = None, max_width: int = 0) -> torch.Tensor | None:
    """One target call over [pending token, drafts...]; accept, append, roll the target cache back. With
    `return_hidden`, returns the target's post-norm hidden states of the block's rows [B, n+1, H] (else None).
    `from_lookup` [B] marks rows whose drafts came from prompt lookup (counted apart in `stats`). When the target
    has prepacked weights, the block may be padded up to `max_width` drafts to reach a packed row count."""
    width = drafts.shape[1]
    old_lengths = rows.lengths.clone()
    active = rows.active.clone()
    block = torch.cat([rows.last_tokens().unsqueeze(1), drafts], dim=1)
    padded = padded_block_width(target, rows.batch, width, max_width)
    if padded > width:  # a prepacked row count: the pass is cheaper with the padding than without its pack
        block = _pad_columns(block, padded + 1)
    hidden = None
    if return_hidden:
        logits, hidden = target.forward(block, old_lengths - 1, return_hidden=True)
        hidden = hidden[:, :width + 1]
    else:
        logits = target.forward(block, old_lengths - 1)
    logits = logits[:, :width + 1]  # padding rows are never verified (nor warped)
    stats.target_calls += 1
    num_accepted, next_token = _verify_block(logits, drafts, draft_probs, num_draft, params, generator, use_kernel)
    stats.record_block(num_draft, num_accepted, active, width)
    if from_lookup is not None:
        mine = active & from_lookup
        stats.lookup_proposed += int(num_draft[mine].sum())
        stats.lookup_accepted += int(num_accepted[mine].sum())
    emitted = torch.cat([drafts, next_token.unsqueeze(1)], dim=1)
    emitted.scatter_(1, num_accepted.unsqueeze(1), next_token.unsqueeze(1))
    kept = rows.append(emitted, num_accepted + 1)
    stats.decode_row_calls += int(active.sum())
    stats.decode_tokens += int(kept.sum())
    target.cache.set_lengths(rows.lengths - 1)  # pending token not yet in the cache; rejected entries are stale
    return hidden


class SpeculativeDecoder:
    """Draft-model speculative decoding (Leviathan et al. 2023), exact for greedy and sampling.

    The draft proposes n tokens with its own cache; the target verifies them plus a bonus position in one
    call; both caches roll back by moving length pointers. `draft_confidence` > 0 enables dynamic draft
    length: drafting stops early once every active row's top draft probability falls below it.
    `batch_invariant=True` verifies token by token through plain decoding's one-row calls: greedy output then
    equals plain batch-1 decoding bit for bit in every dtype (bfloat16 included), but a verify costs n+1 steps.

    `lookup_tokens` > 0 adds prompt lookup: a row whose last `lookup_min_ngram`..`lookup_max_ngram` tokens occurred
    earlier in its prompt or output proposes the (up to `lookup_tokens`) tokens that followed, free of draft cost,
    instead of the draft's; rows without a match use the draft (no draft call when every row has one). Domain
    answers that quote their question or passage gain most. Exactness is unchanged (a lookup proposal is a
    one-hot q). `lookup_extend=True` also appends lookup tokens after the draft's n where text + drafts repeats an
    earlier n-gram (up to `lookup_tokens` in all). `lookup_mix=m` (sampling) draws a lookup row's first proposal from
    m * onehot(lookup's token) + (1 - m) * q_draft (`_mix_lookup_and_draft`).

    `prepack=True` (fp32 on a CPU with MKL) packs the target's weights for the verify's row counts, batch x (n + 1)
    and batch x (lookup_tokens + 1), on the first `generate`, and pads shorter lookup blocks up to a packed count:
    cheaper verification at one weight copy per row count (runner.py). Refused in one line where it cannot work.

    `draft` is a layer draft (a causal LM sharing the target's vocabulary, or its `CachedCausalLM`) or a
    feature-conditioned `FeatureDraft` (or its `FeatureDraftRunner`): the target's prefill and verify passes then
    also return their post-norm hidden states, the draft proposes from (feature, token) pairs, and after each
    verify it catches up on the accepted tokens and the bonus with the target's true features (its speculative
    cache entries rolled back), whose last row yields the next block's first proposal.
    """

    def __init__(self, target: Any, draft: Any, num_speculative_tokens: int = 3, draft_confidence: float = 0.0,
                 use_kernel: bool | None = None, batch_invariant: bool = False, lookup_tokens: int = 0,
                 lookup_max_ngram: int = 3, lookup_min_ngram: int = 2, lookup_extend: bool = False,
                 lookup_mix: float = 0.0, prepack: bool = False) -> None:
        self.target = _as_runner(target, batch_invariant)
        self.prepack = _check_prepack(self.target, prepack)
        self.feature: FeatureDraftRunner | None = None
        if isinstance(draft, (FeatureDraft, FeatureDraftRunner)):
            self.feature = draft if isinstance(draft, FeatureDraftRunner) else FeatureDraftRunner(draft)
            self.draft = self.feature.lm
            target_hidden = int(self.target.config.hidden_size)
            if self.feature.hidden_size != target_hidden:
                raise InvalidArgumentError(
                    f"the feature draft's hidden size ({self.feature.hidden_size}) differs from the target's "
                    f"({target_hidden}): a feature draft reads the target's hidden states, so it must be built for "
                    "this target")
            if self.feature.device != self.target.device:
                raise InvalidArgumentError(f"the feature draft is on {self.feature.device} but the target on "
                                           f"{self.target.device}: move both to one device")
        else:
            self.draft = _as_runner(draft)
        head = self.draft.head
        self._draft_head_ids = head.token_ids if isinstance(head, RestrictedLMHead) else None
        self.num_speculative_tokens = check_num_speculative_tokens(num_speculative_tokens)
        if self.target.vocab_size != self.draft.vocab_size:
            raise InvalidArgumentError(
                f"target and draft vocabularies differ ({self.target.vocab_size} vs {self.draft.vocab_size} "
                "output rows): speculative decoding needs a shared tokenizer and vocabulary")
        if self.feature is not None:
            check_draft_target(self.feature.draft, self.target.model)  # built for this target, or told otherwise
        if not 0.0 <= draft_confidence < 1.0:
            raise InvalidArgumentError(f"draft_confidence must be in [0, 1), got {draft_confidence!r}")
        self.draft_confidence = draft_confidence
        self.use_kernel = use_kernel
        if not isinstance(lookup_tokens, int) or isinstance(lookup_tokens, bool) or lookup_tokens < 0:
            raise InvalidArgumentError(
                f"lookup_tokens must be an int >= 0 (0 = no prompt lookup), got {lookup_tokens!r}")
        if not (isinstance(lookup_min_ngram, int) and isinstance(lookup_max_ngram, int)
                and 1 <= lookup_min_ngram <= lookup_max_ngram):
            raise InvalidArgumentError(f"need 1 <= lookup_min_ngram <= lookup_max_ngram, got {lookup_min_ngram!r} "
                                       f"and {lookup_max_ngram!r}")
        self.lookup_tokens = int(lookup_tokens)
        self.lookup_max_ngram, self.lookup_min_ngram = lookup_max_ngram, lookup_min_ngram
        if not isinstance(lookup_extend, bool):
            raise InvalidArgumentError(f"lookup_extend must be True or False, got {lookup_extend!r}")
        if lookup_extend and self.lookup_tokens <= self.num_speculative_tokens:
            raise InvalidArgumentError(
                f"lookup_extend appends lookup tokens after the draft's {self.num_speculative_tokens}, up to "
                f"lookup_tokens in all: lookup_tokens must exceed num_speculative_tokens, got {self.lookup_tokens}")
        self.lookup_extend = lookup_extend
        if not (isinstance(lookup_mix, (int, float)) and not isinstance(lookup_mix, bool) and 0.0 <= lookup_mix < 1.0):
            raise InvalidArgumentError(f"lookup_mix must be a number in [0, 1), got {lookup_mix!r}")
        if lookup_mix > 0 and not self.lookup_tokens:
            raise InvalidArgumentError("lookup_mix mixes prompt lookup's proposal with the draft's: it needs "
                                       "lookup_tokens > 0")
        self.lookup_mix = float(lookup_mix)

    def _block_width(self) -> int:
        """The most tokens one block proposes (draft or lookup)."""
        return max(self.num_speculative_tokens, self.lookup_tokens)

    def _draft_or_lookup(self, rows: _Rows, params: Sampling,
                         propose: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
                         generator: torch.Generator | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """One block's proposals (drafts [B, w], q [B, w, V] when sampling, num_draft [B], from_lookup [B] or None):
        prompt-lookup continuations where a row has one (see the class docstring), `propose()` for the others."""
        if not self.lookup_tokens:
            drafts, probs = propose()
            return drafts, probs, torch.full_like(rows.lengths, drafts.shape[1]), None
        found, counts = propose_ngram_continuations(rows.tokens, rows.lengths, rows.active,
                                                    _row_cap(self.lookup_tokens, rows),
                                                    self.lookup_max_ngram, self.lookup_min_ngram)
        use = counts > 0
        vocab = self.target.vocab_size
        if params.do_sample and self.lookup_mix > 0 and bool(use[rows.active].any()):
            return self._mix_lookup_and_draft(found, counts, use, propose, generator)
        if bool(use[rows.active].all()):  # every live row has a continuation: no draft call this block
            return found, (_one_hot(found, vocab) if params.do_sample else None), counts, use
        drafts, probs = propose()
        num_draft = torch.full_like(rows.lengths, drafts.shape[1])
        if self.lookup_extend:
            drafts, probs, num_draft = self._extend_with_lookup(rows, drafts, probs, rows.active & ~use, vocab)
        if not bool(use.any()):
            return drafts, probs, num_draft, use
        return (*_merge_proposals(found, counts, drafts, probs, num_draft, use, vocab), use)

    def _mix_lookup_and_draft(self, found: torch.Tensor, counts: torch.Tensor, use: torch.Tensor,
                              propose: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
                              generator: torch.Generator | None,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`lookup_mix` (sampling): a row with a lookup continuation draws its first proposal from the mixture
        q' = m * onehot(lookup's first token) + (1 - m) * q_draft (a coin picks the lookup's token or the draft's
        sample), verified against q'. If the proposal is the lookup's token the block goes on with the lookup's
        tokens (one-hot q), else with the draft's. Each position's q is the distribution its token was drawn from
        given the tokens before it, so rejection sampling stays exact; where lookup and draft disagree the mixture
        can be accepted where either alone would be rejected."""
        drafts, probs = propose()
        assert probs is not None
        m, vocab = drafts.shape[1], probs.shape[-1]
        lam = self.lookup_mix
        gen_device = generator.device if generator is not None else drafts.device
        coin = torch.rand(drafts.shape[0], dtype=torch.float64, device=gen_device, generator=generator)
        coin = coin.to(drafts.device) < lam
        take = use & (coin | (drafts[:, 0] == found[:, 0]))  # the first proposal is the lookup's token
        merged, q, num_draft = _merge_proposals(found, counts, drafts, probs, torch.full_like(counts, m), take, vocab)
        assert q is not None
        mixture = lam * _one_hot(found[:, :1], vocab)[:, 0] + (1.0 - lam) * probs[:, 0]
        q[:, 0] = torch.where(use[:, None], mixture, q[:, 0])
        return merged, q, num_draft, take

    def _extend_with_lookup(self, rows: _Rows, drafts: torch.Tensor, probs: torch.Tensor | None,
                            rows_to_extend: torch.Tensor, vocab: int,
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`lookup_extend`: after the draft's m tokens, a row whose text + drafts ends in an n-gram seen earlier
        proposes what followed it too (up to lookup_tokens - m tokens, one-hot q): (drafts, q, num_draft)."""
        m = drafts.shape[1]
        room = _row_cap(self.lookup_tokens, rows) - m
        num_draft = torch.full_like(rows.lengths, m)
        if room < 1:
            return drafts, probs, num_draft
        extensions: dict[int, list[int]] = {}
        for b in torch.nonzero(rows_to_extend).flatten().tolist():
            text = rows.tokens[b, :int(rows.lengths[b])].tolist() + drafts[b].tolist()
            ext = find_ngram_continuation(text, room, self.lookup_max_ngram, self.lookup_min_ngram)
            if ext:
                extensions[b] = ext
        if not extensions:
            return drafts, probs, num_draft
        width = m + max(len(e) for e in extensions.values())
        drafts = _pad_columns(drafts, width)
        if probs is not None:
            probs = _pad_columns(probs, width)
        for b, ext in extensions.items():
            tail = torch.tensor(ext, dtype=drafts.dtype, device=drafts.device)
            drafts[b, m:m + len(ext)] = tail
            if probs is not None:
                probs[b, m:m + len(ext)] = 0.0
                probs[b, torch.arange(m, m + len(ext), device=probs.device), tail] = 1.0
            num_draft[b] = m + len(ext)
        return drafts, probs, num_draft

    def _sample_drafts(self, logits: torch.Tensor, step: Callable[[int, torch.Tensor], torch.Tensor],
                       rows: _Rows, params: Sampling, generator: torch.Generator | None,
                       stats: SpecStats) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw up to n draft tokens: the first from `logits`, each next from `step(i, previous token)` (one draft
        call); stops early under `draft_confidence`. Returns tokens [B, m] and their warped q [B, m, V] (sampling)."""
        tokens, probs = [], []
        n = _row_cap(self.num_speculative_tokens, rows)
        for i in range(n):
            if i > 0:
                logits = step(i, tokens[-1])
                stats.draft_calls += 1
            tok, q = self._sample_proposal(logits, params, generator)
            tokens.append(tok)
            if q is not None:
                probs.append(q)
            if self.draft_confidence > 0 and i + 1 < n:
                top = (q if q is not None else torch.softmax(logits, dim=-1)).max(dim=-1).values
                if not bool((top[rows.active] >= self.draft_confidence).any()):
                    break
        return torch.stack(tokens, dim=1), (torch.stack(probs, dim=1) if probs else None)

    def _sample_proposal(self, logits: torch.Tensor, params: Sampling, generator: torch.Generator | None,
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One draft token per row and the full-vocabulary q it was drawn from. A draft whose head is restricted to
        a token subset (-inf logits elsewhere) is warped and sampled over that subset only, ~10x fewer entries than
        the vocabulary, and q is scattered back; the tokens outside it have probability 0 either way."""
        head_ids = self._draft_head_ids
        if not params.do_sample or head_ids is None:
            return _draw(logits, params, generator, draft_sample, draft=True)
        sub, q_sub = _draw(logits.index_select(-1, head_ids), params, generator, draft_sample, draft=True)
        assert q_sub is not None
        q = q_sub.new_zeros(*q_sub.shape[:-1], logits.shape[-1]).index_copy_(-1, head_ids, q_sub)
        return head_ids[sub], q

    def _propose(self, rows: _Rows, params: Sampling, generator: torch.Generator | None,
                 stats: SpecStats) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft n tokens per row (catching the draft cache up on tokens it has not seen first)."""
        draft = self.draft
        behind = rows.lengths - draft.cache.lengths  # >= 1: pending token, plus the bonus after full acceptance
        width = int(behind.max())
        cols = draft.cache.lengths[:, None] + torch.arange(width, device=behind.device)[None, :]
        block = rows.tokens.gather(1, cols.clamp(max=rows.tokens.shape[1] - 1))
        logits = draft.forward(block, draft.cache.lengths, logits_at=behind - 1)
        stats.draft_calls += 1
        draft.cache.set_lengths(rows.lengths)
        at = torch.zeros_like(rows.lengths)

        def step(i: int, token: torch.Tensor) -> torch.Tensor:
            return draft.forward(token.unsqueeze(1), rows.lengths + i - 1, logits_at=at)

        drafts, probs = self._sample_drafts(logits, step, rows, params, generator, stats)
        draft.cache.set_lengths(rows.lengths + drafts.shape[1] - 1)  # the last proposal is not in the cache
        return drafts, probs

    def _propose_from_features(self, rows: _Rows, first: tuple[torch.Tensor, torch.Tensor], params: Sampling,
                               generator: torch.Generator | None, stats: SpecStats,
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feature draft: the first proposal from `first` (logits, g) of the last true-feature pass, each next one
        from a step on (g, previous token) at the draft positions after the pending token's."""
        assert self.feature is not None
        feature = self.feature
        logits, state = first
        base = rows.lengths - 1  # the draft cache's length: (true feature, token) pairs up to the pending token
        at = torch.zeros_like(base)

        def step(i: int, token: torch.Tensor) -> torch.Tensor:
            nonlocal state
            out, state = feature.step(state.unsqueeze(1), token.unsqueeze(1), base + i - 1, logits_at=at)
            return out

        drafts, probs = self._sample_drafts(logits, step, rows, params, generator, stats)
        feature.cache.set_lengths(base)  # the speculative entries go: the catch-up rewrites them with true features
        return drafts, probs

    def _catch_up(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor,
                  stats: SpecStats) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature draft after a verify: run the rows' newly appended tokens (accepted drafts + bonus) with the
        target's true features at the positions before them (the verify's rows 0..k), from draft position
        old_length - 1 on; returns (logits, g) at each row's last new token: the next block's first proposal."""
        assert self.feature is not None
        kept = rows.lengths - old_lengths  # k + 1 for rows still active; stopped rows' results are unused
        width = max(int(kept.max()), 1)
        cols = old_lengths[:, None] + torch.arange(width, device=kept.device)[None, :]
        tokens = rows.tokens.gather(1, cols.clamp(max=rows.tokens.shape[1] - 1))
        out = self.feature.step(hidden[:, :width], tokens, old_lengths - 1, logits_at=(kept - 1).clamp(min=0))
        stats.draft_calls += 1
        self.feature.cache.set_lengths(rows.lengths - 1)
        return out

    @torch.inference_mode()
    def generate(self, input_ids: Any, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, eos_token_id: int | Sequence[int] | None = None,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
                 streamer: Streamer | None = None) -> SpecDecodeOutput:
        """Generate up to `max_new_tokens` per row; same arguments and output as `autoregressive_generate`."""
        t0 = time.perf_counter()
        params = SamplingParams(do_sample, temperature, top_p, top_k)
        n = self._block_width()
        rows = _start_rows(self.target, input_ids, attention_mask, max_new_tokens, n + 1, eos_token_id, streamer)
        if self.prepack:
            self.target.prepack(prepack_rows(rows.batch, (self.num_speculative_tokens, self.lookup_tokens)))
        self.draft.start(rows.batch, rows.tokens.shape[1])
        stats = SpecStats()
        if self.feature is not None:
            self._generate_from_features(rows, params, generator, stats)
            stats.wall_time_s = time.perf_counter() - t0
            return rows.output(stats)
        self._prefill_layer_draft(rows, params, generator, stats)
        while bool(rows.active.any()):
            self._layer_step(rows, params, generator, stats)
        stats.wall_time_s = time.perf_counter() - t0
        return rows.output(stats)

    def _prefill_layer_draft(self, rows: _Rows, params: Sampling, generator: torch.Generator | None,
                             stats: SpecStats) -> None:
        """Prefill the (layer) draft and the target on the prompts and append each row's first token."""
        _prefill(self.draft, rows, need_logits=False)  # before the first token is appended: prompts only
        stats.draft_calls += 1
        _prefill_and_sample_first(self.target, rows, params, generator, stats)

    def _layer_step(self, rows: _Rows, params: Sampling, generator: torch.Generator | None,
                    stats: SpecStats) -> None:
        """One block with a layer draft (or prompt lookup): propose, verify, append, roll both caches back."""
        drafts, probs, num_draft, from_lookup = self._draft_or_lookup(
            rows, params, partial(self._propose, rows, params, generator, stats), generator)
        if from_lookup is not None:  # the draft's speculative entries of lookup rows are not what is verified
            self.draft.cache.rollback(torch.where(from_lookup, rows.lengths, self.draft.cache.lengths))
        _verify_and_append(self.target, rows, drafts, probs, num_draft, params, generator, stats,
                           self.use_kernel, from_lookup=from_lookup, max_width=_row_cap(self._block_width(), rows))
        # The draft holds old_len + k - 1 tokens (it never saw its last proposal); keep only the valid prefix.
        self.draft.cache.rollback(rows.lengths - 1)

    def _generate_from_features(self, rows: _Rows, params: Sampling, generator: torch.Generator | None,
                                stats: SpecStats) -> None:
        """The decoding loop with a feature draft (see the class docstring); the draft cache holds rows.lengths - 1
        (true feature, token) pairs after every cycle."""
        first = self._prefill_features(rows, params, generator, stats)
        while bool(rows.active.any()):
            first = self._feature_step(rows, first, params, generator, stats)

    def _prefill_features(self, rows: _Rows, params: Sampling, generator: torch.Generator | None,
                          stats: SpecStats) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill the target on the prompts, append each row's first token and run the feature draft over the
        prompts' true features; returns (logits, g) of the next block's first proposal."""
        assert self.feature is not None
        starts = torch.zeros(rows.batch, dtype=torch.long, device=rows.tokens.device)
        last = rows.prompt_lengths - 1
        logits, features = self.target.forward(_prompt_block(rows), starts, logits_at=last, return_hidden="all")
        self.target.cache.set_lengths(rows.prompt_lengths)
        stats.target_calls += 1
        token, _ = _draw(logits, params, generator)
        rows.append(token.unsqueeze(1), torch.ones_like(token))
        # draft positions 0..L-1 read (f[p], x[p+1]); x[L] is the token just sampled
        first = self.feature.step(features, rows.tokens[:, 1:rows.max_prompt + 1], starts, logits_at=last)
        self.feature.cache.set_lengths(rows.lengths - 1)
        stats.draft_calls += 1
        return first

    def _feature_step(self, rows: _Rows, first: tuple[torch.Tensor, torch.Tensor], params: Sampling,
                      generator: torch.Generator | None, stats: SpecStats) -> tuple[torch.Tensor, torch.Tensor]:
        """One block with a feature draft: propose from `first`, verify, append, catch the draft up; returns the
        next block's `first` (unchanged when no row is left active)."""
        drafts, probs, num_draft, from_lookup = self._draft_or_lookup(
            rows, params, partial(self._propose_from_features, rows, first, params, generator, stats), generator)
        old_lengths = rows.lengths.clone()
        hidden = _verify_and_append(self.target, rows, drafts, probs, num_draft, params, generator, stats,
                                    self.use_kernel, return_hidden=True, from_lookup=from_lookup,
                                    max_width=_row_cap(self._block_width(), rows))
        if bool(rows.active.any()):
            first = self._catch_up(rows, old_lengths, hidden, stats)
        return first


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """`x` [B, w, ...] right-padded with zeros to `width` columns."""
    if x.shape[1] >= width:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], width - x.shape[1], *x.shape[2:]))], dim=1)


def _merge_proposals(found: torch.Tensor, counts: torch.Tensor, drafts: torch.Tensor, probs: torch.Tensor | None,
                     num_draft: torch.Tensor, pick: torch.Tensor, vocab: int,
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per row, the lookup's proposals (one-hot q, `counts`) where `pick`, else the draft's (`probs`, `num_draft`):
    (tokens [B, w], q [B, w, V] or None, num_draft [B]), both sides right-padded to the wider one."""
    width = max(drafts.shape[1], found.shape[1])
    found, drafts = _pad_columns(found, width), _pad_columns(drafts, width)
    merged = torch.where(pick[:, None], found, drafts)
    if probs is not None:
        probs = torch.where(pick[:, None, None], _one_hot(found, vocab), _pad_columns(probs, width))
    return merged, probs, torch.where(pick, counts, num_draft)


def _one_hot(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """The q of deterministic proposals: fp32 one-hot rows [B, w, V]."""
    probs = torch.zeros(*tokens.shape, vocab, device=tokens.device)
    return probs.scatter_(2, tokens.unsqueeze(2), 1.0)


class PromptLookupDecoder:
    """Prompt-lookup decoding: drafts are n-gram continuations found in the prompt + generated text.

    The draft is deterministic, so its q is one-hot and rejection sampling stays exact: a proposal x is
    accepted with probability p(x), and a rejection resamples from p with x removed. `batch_invariant` and `prepack`
    as in `SpeculativeDecoder`.
    """

    def __init__(self, target: Any, num_speculative_tokens: int = 3, max_ngram: int = 3,
                 batch_invariant: bool = False, prepack: bool = False) -> None:
        self.target = _as_runner(target, batch_invariant)
        self.prepack = _check_prepack(self.target, prepack)
        self.num_speculative_tokens = check_num_speculative_tokens(num_speculative_tokens)
        if not isinstance(max_ngram, int) or max_ngram < 1:
            raise InvalidArgumentError(f"max_ngram must be an int >= 1, got {max_ngram!r}")
        self.max_ngram = max_ngram

    @torch.inference_mode()
    def generate(self, input_ids: Any, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, eos_token_id: int | Sequence[int] | None = None,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
                 streamer: Streamer | None = None) -> SpecDecodeOutput:
        """Generate up to `max_new_tokens` per row; same arguments and output as `autoregressive_generate`."""
        t0 = time.perf_counter()
        params = SamplingParams(do_sample, temperature, top_p, top_k)
        n = self.num_speculative_tokens
        rows = _start_rows(self.target, input_ids, attention_mask, max_new_tokens, n + 1, eos_token_id, streamer)
        if self.prepack:
            self.target.prepack(prepack_rows(rows.batch, (n,)))
        stats = SpecStats()
        _prefill_and_sample_first(self.target, rows, params, generator, stats)
        vocab = self.target.vocab_size
        while bool(rows.active.any()):
            width = _row_cap(n, rows)
            drafts, num_draft = propose_ngram_continuations(rows.tokens, rows.lengths, rows.active, width,
                                                            self.max_ngram)
            probs = _one_hot(drafts, vocab) if params.do_sample and drafts.shape[1] > 0 else None
            _verify_and_append(self.target, rows, drafts, probs, num_draft, params, generator, stats, False,
                               max_width=width)
        stats.wall_time_s = time.perf_counter() - t0
        return rows.output(stats)
