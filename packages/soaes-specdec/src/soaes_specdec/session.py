"""Decoding as steps over rows that join and leave between them (continuous batching, for a server).

`DecodeSession` runs a decoder of `decoding` one step at a time over a pool of row slots: `add_row` queues a prompt
with its own sampling settings and seed, `step` prefills the rows that joined (each alone, exactly as batch-1
decoding does) and then advances every row by one block (a speculative block, or one token for plain decoding) in
one batched call, and `remove_row` drops a row (a cancelled request). Rows occupy the first slots of caches
allocated once; a row that leaves is replaced by the last one (one row's cache entries copied), so every batched
call runs over a contiguous prefix of the caches, through the same proposal, verification and sampling code as
`generate`.

Greedy rows decode as plain greedy decoding does. A sampling row draws from generators seeded by (its seed, its
length, stream) at each step, so its draws depend on its own tokens only, never on the other rows: a request is
reproducible under its seed whatever runs beside it (up to the float rounding of batched matmuls, as in `generate`'s
batches; a `batch_invariant` decoder removes that too).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from soaes_core.errors import InvalidArgumentError

from .block_policy import AcceptanceTracker, choose_block_size
from .decoding import (
    PromptLookupDecoder,
    RowSampling,
    Sampling,
    SpecStats,
    SpeculativeDecoder,
    _as_runner,
    _pad_id,
    _plain_step,
    _prefill_and_sample_first,
    _Rows,
    eos_set,
    normalise_prompts,
)
from .kv_cache import StaticKVCache
from .proposers import FeatureDraftProposer
from .runner import CachedCausalLM
from .sampling import SamplingParams

_MASK64 = (1 << 64) - 1


def row_stream_seed(seed: int, position: int, stream: int) -> int:
    """A 63-bit seed for one row's draws at one length and stream (0 draft, 1 target): splitmix64 of the three."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


@dataclass
class RowUpdate:
    """What one `step` did to a row: the tokens it appended and whether it finished ("stop": EOS, "length")."""

    tokens: list[int]
    finished: bool
    finish_reason: str | None = None


class SlotTrackers:
    """The acceptance of a step session's rows: one `AcceptanceTracker` per slot (rows keep theirs when they move
    slots; a new row starts from the prior), and the block size for the slots a step runs, chosen for their count."""

    def __init__(self, max_rows: int, n_max: int) -> None:
        self.n_max = n_max
        self.slots = [AcceptanceTracker(1, n_max=n_max) for _ in range(max_rows)]
        self.start, self.stop = 0, max_rows

    def view(self, start: int, stop: int) -> SlotTrackers:
        """These trackers, answering for slots start..stop-1 (the rows of one batched call)."""
        self.start, self.stop = start, stop
        return self

    def choose(self, pass_ms: Any, draft_ms: Any, active: Any = None) -> int:
        live = [True] * (self.stop - self.start) if active is None else [bool(a) for a in active]
        rows = [self.slots[self.start + i].row_estimate(0) for i, a in enumerate(live) if a]
        if not rows:
            return 0
        return choose_block_size(rows, pass_ms, draft_ms, self.n_max, batch=self.stop - self.start)

    def update(self, num_draft: Any, num_accepted: Any, active: Any = None) -> None:
        drafts, accepted = num_draft.tolist(), num_accepted.tolist()
        live = [True] * len(drafts) if active is None else [bool(a) for a in active]
        for i, (d, a, on) in enumerate(zip(drafts, accepted, live, strict=True)):
            if on:
                self.slots[self.start + i].update([d], [a])

    def reset(self, slot: int) -> None:
        self.slots[slot] = AcceptanceTracker(1, n_max=self.n_max)

    def move(self, src: int, dst: int) -> None:
        self.slots[dst] = self.slots[src]


def _allocate(runner: CachedCausalLM, rows: int, capacity: int) -> StaticKVCache:
    return StaticKVCache.allocate(len(runner.layers), rows, runner.num_kv_heads, capacity, runner.head_dim,
                                  runner.dtype, runner.device)


def _view(pool: StaticKVCache, lengths: torch.Tensor, start: int, stop: int) -> StaticKVCache:
    """Slots start..stop-1 of `pool` as a cache of their own (views: writes land in the pool)."""
    return StaticKVCache([k[start:stop] for k in pool.keys], [v[start:stop] for v in pool.values],
                         lengths=lengths[start:stop])


class DecodeSession:
    """Rows that join and leave between the steps of one decoder: a `SpeculativeDecoder` (layer or feature draft,
    prompt lookup) or, for plain decoding, a model. The session owns the decoder's caches while it runs: do not
    call the decoder's `generate` in between. `max_tokens` bounds prompt + new tokens of every row."""

    def __init__(self, decoder: Any, max_rows: int, max_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None) -> None:
        if isinstance(decoder, PromptLookupDecoder):
            raise InvalidArgumentError("DecodeSession runs SpeculativeDecoder (lookup_tokens for prompt lookup) or a "
                                       "plain model, not PromptLookupDecoder")
        for name, value in (("max_rows", max_rows), ("max_tokens", max_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
        self.decoder: SpeculativeDecoder | None = None
        if isinstance(decoder, SpeculativeDecoder):
            if decoder.lookup_mix > 0 or decoder.draft_confidence > 0:
                raise InvalidArgumentError("DecodeSession needs lookup_mix = 0 and draft_confidence = 0: both make a "
                                           "row's draws depend on the other rows of the batch")
            self.decoder, self.target = decoder, decoder.target
            block = decoder._block_width()
            if decoder.settings.adaptive:
                decoder.load_costs(max_rows)
        else:
            self.target, block = _as_runner(decoder), 0
        if self.target.max_positions and max_tokens > self.target.max_positions:
            raise InvalidArgumentError(f"max_tokens ({max_tokens}) exceeds the model's context of "
                                       f"{self.target.max_positions} tokens")
        self.max_rows, self.max_tokens = max_rows, max_tokens
        capacity = max_tokens + block + 1  # a verify at the last position writes up to `block` + 1 slots past it
        eos = eos_set(eos_token_id)
        self.eos = set(eos)
        self._rows = _Rows.slots(max_rows, capacity, _pad_id(self.target, eos), eos, self.target.device)
        self._target_pool = _allocate(self.target, max_rows, capacity)
        self._target_lengths = torch.zeros(max_rows, dtype=torch.long, device=self.target.device)
        self._draft_pool: StaticKVCache | None = None
        self._trackers: SlotTrackers | None = None
        if self.decoder is not None:
            self._draft_pool = _allocate(self.decoder.draft, max_rows, capacity)
            if self.decoder.settings.adaptive:
                self._trackers = SlotTrackers(max_rows, self.decoder.settings.max_speculative_tokens)
        self._draft_lengths = torch.zeros_like(self._target_lengths)
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None  # feature draft: each slot's next proposal
        self._ids: list[int] = []  # slot -> row id
        self._params: list[SamplingParams] = []
        self._seeds: list[int] = []
        self._prefilled: list[bool] = []
        self._next_id = 0
        self.stats = SpecStats()
        self.last_block_size = 0.0  # mean tokens proposed per row in the last speculative block

    # ------------------------------------------------------------------------------------------- rows

    @property
    def num_rows(self) -> int:
        return len(self._ids)

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self._ids)

    @property
    def row_ids(self) -> list[int]:
        return list(self._ids)

    def add_row(self, prompt: Any, max_new_tokens: int, params: SamplingParams | None = None,
                seed: int | None = None) -> int:
        """Queue a prompt (token ids) for up to `max_new_tokens` new tokens; returns its row id. It is prefilled and
        gets its first token at the next `step`. `seed` (default: random) makes a sampling row reproducible."""
        if not self.free_rows:
            raise InvalidArgumentError(f"the session is full ({self.max_rows} rows): step until a row finishes")
        (ids,) = normalise_prompts([prompt])
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if ids.numel() + max_new_tokens > self.max_tokens:
            raise InvalidArgumentError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                                       f"the session's {self.max_tokens} tokens per row")
        if int(ids.min()) < 0 or int(ids.max()) >= self.target.vocab_size:
            raise InvalidArgumentError(f"the prompt has token ids outside the vocabulary [0, {self.target.vocab_size})")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidArgumentError(f"params must be a SamplingParams, got {type(params).__name__}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InvalidArgumentError(f"seed must be an int, got {seed!r}")
        slot = len(self._ids)
        self._rows.fill(slot, ids, max_new_tokens)
        self._target_lengths[slot] = self._draft_lengths[slot] = 0
        row_id, self._next_id = self._next_id, self._next_id + 1
        self._ids.append(row_id)
        self._params.append(params)
        self._seeds.append(secrets.randbits(63) if seed is None else seed & _MASK64)
        self._prefilled.append(False)
        if self._trackers is not None:
            self._trackers.reset(slot)
        return row_id

    def remove_row(self, row_id: int) -> None:
        """Drop a row (finished or cancelled); the last row moves into its slot."""
        try:
            slot = self._ids.index(row_id)
        except ValueError:
            raise InvalidArgumentError(f"no row {row_id} in this session") from None
        last = len(self._ids) - 1
        if slot != last:
            self._move(last, slot)
        for slots in (self._ids, self._params, self._seeds, self._prefilled):
            slots.pop()

    def _move(self, src: int, dst: int) -> None:
        self._rows.move(src, dst)
        for pool, lengths in ((self._target_pool, self._target_lengths), (self._draft_pool, self._draft_lengths)):
            if pool is not None:
                for buf in (*pool.keys, *pool.values):
                    buf[dst] = buf[src]
                lengths[dst] = lengths[src]
        if self._first is not None:
            for t in self._first:
                t[dst] = t[src]
        if self._trackers is not None:
            self._trackers.move(src, dst)
        for slots in (self._ids, self._params, self._seeds, self._prefilled):
            slots[dst] = slots[src]

    # ------------------------------------------------------------------------------------------- steps

    @torch.inference_mode()
    def step(self) -> dict[int, RowUpdate]:
        """Prefill the rows that joined, advance every row by one block, drop the rows that finished; returns each
        row's update (row id -> appended tokens, finished, why)."""
        k = len(self._ids)
        emitted: list[list[int]] = [[] for _ in range(k)]
        for slot in range(k):
            if not self._prefilled[slot]:
                self._run(slot, slot + 1, emitted, prefill=True)
                self._prefilled[slot] = True
        if k and bool(self._rows.active[:k].any()):
            self._run(0, k, emitted, prefill=False)
        updates: dict[int, RowUpdate] = {}
        for slot in range(k):
            if bool(self._rows.active[slot]):
                updates[self._ids[slot]] = RowUpdate(emitted[slot], False)
                continue
            last = int(self._rows.tokens[slot, int(self._rows.lengths[slot]) - 1])
            updates[self._ids[slot]] = RowUpdate(emitted[slot], True, "stop" if last in self.eos else "length")
        for row_id, update in updates.items():
            if update.finished:
                self.remove_row(row_id)
        return updates

    def _sampling(self, start: int, stop: int) -> Sampling:
        """Greedy for an all-greedy batch (one batched argmax); else per-row params and per-step generators."""
        params = self._params[start:stop]
        if not any(p.do_sample for p in params):
            return SamplingParams()
        device = self.target.device
        lengths = self._rows.lengths[start:stop].tolist()
        seeds = self._seeds[start:stop]

        def gens(stream: int) -> list[torch.Generator]:
            return [torch.Generator(device=device).manual_seed(row_stream_seed(s, n, stream))
                    for s, n in zip(seeds, lengths, strict=True)]

        return RowSampling(params, gens(0), gens(1), self._rows.budget[start:stop].tolist())

    def _run(self, start: int, stop: int, emitted: list[list[int]], prefill: bool) -> None:
        """Prefill (`prefill`) or advance slots start..stop-1 through the decoder, on views of the pools."""

        def collect(tokens: list[list[int]]) -> None:
            for i, t in enumerate(tokens):
                emitted[start + i].extend(t)

        rows = self._rows.view(start, stop, collect)
        params = self._sampling(start, stop)
        self.target.cache = _view(self._target_pool, self._target_lengths, start, stop)
        dec = self.decoder
        if dec is not None:
            assert self._draft_pool is not None
            dec.draft.cache = _view(self._draft_pool, self._draft_lengths, start, stop)
        before, active = self.stats.proposed, int(rows.active.sum())
        try:
            if dec is None:
                if prefill:
                    _prefill_and_sample_first(self.target, rows, params, None, self.stats)
                else:
                    _plain_step(self.target, rows, params, None, self.stats)
                return
            feature = dec.draft_proposer if isinstance(dec.draft_proposer, FeatureDraftProposer) else None
            if feature is not None:
                feature.defer_catch_up = False  # the next step may run other rows: catch up now
                if not prefill:
                    assert self._first is not None
                    feature.first = (self._first[0][start:stop], self._first[1][start:stop])
            if prefill:
                dec._prefill_rows(rows, params, None, self.stats)
            else:
                if self._trackers is not None:
                    dec.tracker = self._trackers.view(start, stop)
                dec._step(rows, params, None, self.stats)
                self.last_block_size = (self.stats.proposed - before) / max(active, 1)
            if feature is not None:
                assert feature.first is not None
                self._store_first(feature.first, start, stop)
        finally:
            self._target_lengths[start:stop] = self.target.cache.lengths
            if dec is not None:
                self._draft_lengths[start:stop] = dec.draft.cache.lengths

    def _store_first(self, first: tuple[torch.Tensor, torch.Tensor], start: int, stop: int) -> None:
        if self._first is None:
            logits, state = first
            self._first = (logits.new_zeros(self.max_rows, *logits.shape[1:]),
                           state.new_zeros(self.max_rows, *state.shape[1:]))
        self._first[0][start:stop] = first[0]
        self._first[1][start:stop] = first[1]
