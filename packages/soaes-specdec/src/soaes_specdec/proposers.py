"""Proposers: what suggests the tokens a speculative block verifies (the role of transformers' `CandidateGenerator`).

`SpeculativeDecoder` asks its `Proposer` for up to n tokens per row, verifies them in one target pass and appends what
is accepted; the proposer then brings its own state up to date (`after_verify`, `after_plain_step`). Implementations:
`LayerDraftProposer` (a causal LM with its own cache), `FeatureDraftProposer` (an EAGLE-style head that reads the
target's hidden states), `PromptLookupProposer` (n-gram continuations of the text itself) and `LookupDraftMixture`
(lookup where a row has a match, the draft elsewhere, optionally extended or mixed). Every proposal carries the q it
was drawn from (one-hot for deterministic ones), so verification stays exact whatever proposed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from . import sampling
from .feature_runner import FeatureDraftRunner
from .lookup import find_ngram_continuation, propose_ngram_continuations
from .restricted_head import RestrictedLMHead
from .rows import Sampling, SpecStats, _draw, _one_hot, _pad_columns, _prompt_block, _row_cap, _Rows
from .runner import CachedCausalLM

# The draft's sampler (module level so statistical tests can swap in known-bad samplers to show they fail).
draft_sample: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = sampling.sample_next


@dataclass
class Proposal:
    """One block's proposals: tokens [B, w] (right-padded), their q [B, w, V] when sampling (else None), the real
    count per row [B], and which rows' tokens came from prompt lookup ([B] bool, or None when none could)."""

    tokens: torch.Tensor
    probs: torch.Tensor | None
    num_draft: torch.Tensor
    from_lookup: torch.Tensor | None = None


class Proposer(Protocol):
    """What `SpeculativeDecoder` needs from a source of proposals."""

    needs_hidden: bool  # the target's passes must return their post-norm hidden states for it
    vocab_size: int

    def start(self, batch: int, capacity: int) -> None:
        """Size the proposer's caches for `batch` rows of up to `capacity` tokens, emptied."""

    def prefill(self, rows: _Rows, stats: SpecStats) -> None:
        """Read the prompts (before the target's prefill appends each row's first token)."""

    def after_prefill(self, rows: _Rows, hidden: torch.Tensor | None, stats: SpecStats) -> None:
        """After the target's prefill appended each row's first token; `hidden` [B, P, H] when `needs_hidden`."""

    def propose(self, rows: _Rows, n: int, params: Sampling, generator: torch.Generator | None,
                stats: SpecStats) -> Proposal | None:
        """Up to `n` tokens per active row; None when nothing is worth verifying (the decoder takes a plain step)."""

    def after_verify(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor | None, proposal: Proposal,
                     stats: SpecStats) -> None:
        """Catch up with the tokens the verify appended (rows were `old_lengths` long before it)."""

    def after_plain_step(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor | None,
                         stats: SpecStats) -> None:
        """Catch up (now or later) with the one token per row a plain step appended."""


class DraftSampler:
    """Draws a draft's proposals token by token (shared by the layer and the feature draft)."""

    def __init__(self, lm: CachedCausalLM, draft_confidence: float = 0.0) -> None:
        head = lm.head
        self.head_ids = head.token_ids if isinstance(head, RestrictedLMHead) else None
        self.draft_confidence = draft_confidence

    def sample_drafts(self, logits: torch.Tensor, step: Callable[[int, torch.Tensor], torch.Tensor], n: int,
                      rows: _Rows, params: Sampling, generator: torch.Generator | None,
                      stats: SpecStats) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw up to n draft tokens: the first from `logits`, each next from `step(i, previous token)` (one draft
        call); stops early under `draft_confidence`. Returns tokens [B, m] and their warped q [B, m, V] (sampling)."""
        tokens, probs = [], []
        n = _row_cap(n, rows)
        for i in range(n):
            if i > 0:
                logits = step(i, tokens[-1])
                stats.draft_calls += 1
            tok, q = self.sample_proposal(logits, params, generator)
            tokens.append(tok)
            if q is not None:
                probs.append(q)
            if self.draft_confidence > 0 and i + 1 < n:
                top = (q if q is not None else torch.softmax(logits, dim=-1)).max(dim=-1).values
                if not bool((top[rows.active] >= self.draft_confidence).any()):
                    break
        return torch.stack(tokens, dim=1), (torch.stack(probs, dim=1) if probs else None)

    def sample_proposal(self, logits: torch.Tensor, params: Sampling, generator: torch.Generator | None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One draft token per row and the full-vocabulary q it was drawn from. A draft whose head is restricted to
        a token subset (-inf logits elsewhere) is warped and sampled over that subset only, ~10x fewer entries than
        the vocabulary, and q is scattered back; the tokens outside it have probability 0 either way."""
        head_ids = self.head_ids
        if not params.do_sample or head_ids is None:
            return _draw(logits, params, generator, draft_sample, draft=True)
        sub, q_sub = _draw(logits.index_select(-1, head_ids), params, generator, draft_sample, draft=True)
        assert q_sub is not None
        q = q_sub.new_zeros(*q_sub.shape[:-1], logits.shape[-1]).index_copy_(-1, head_ids, q_sub)
        return head_ids[sub], q


def _full_proposal(drafts: torch.Tensor, probs: torch.Tensor | None, rows: _Rows) -> Proposal:
    return Proposal(drafts, probs, torch.full_like(rows.lengths, drafts.shape[1]))


class _DraftModelProposer:
    """What the layer and feature drafts share: a proposal is `draft_tokens` for every row (None for n = 0)."""

    def propose(self, rows: _Rows, n: int, params: Sampling, generator: torch.Generator | None,
                stats: SpecStats) -> Proposal | None:
        """Draft n tokens per row (catching the draft cache up on tokens it has not seen first)."""
        if n < 1:
            return None
        drafts, probs = self.draft_tokens(rows, n, params, generator, stats)
        return _full_proposal(drafts, probs, rows)


class LayerDraftProposer(_DraftModelProposer):
    """A causal-LM draft with its own KV cache: it catches up on the tokens it has not seen, then drafts n more; its
    cache is rolled back to the accepted prefix after each verify."""

    needs_hidden = False

    def __init__(self, draft: CachedCausalLM, draft_confidence: float = 0.0) -> None:
        self.draft = draft
        self.sampler = DraftSampler(draft, draft_confidence)
        self.vocab_size = draft.vocab_size

    @property
    def lm(self) -> CachedCausalLM:
        return self.draft

    def start(self, batch: int, capacity: int) -> None:
        self.draft.start(batch, capacity)

    def prefill(self, rows: _Rows, stats: SpecStats) -> None:
        starts = torch.zeros(rows.batch, dtype=torch.long, device=rows.tokens.device)
        self.draft.forward(_prompt_block(rows), starts, logits_at=rows.prompt_lengths - 1, need_logits=False)
        self.draft.cache.set_lengths(rows.prompt_lengths)
        stats.draft_calls += 1

    def after_prefill(self, rows: _Rows, hidden: torch.Tensor | None, stats: SpecStats) -> None:
        return None

    def draft_tokens(self, rows: _Rows, n: int, params: Sampling, generator: torch.Generator | None,
                     stats: SpecStats) -> tuple[torch.Tensor, torch.Tensor | None]:
        draft = self.draft
        behind = rows.lengths - draft.cache.lengths  # >= 1: pending token, plus any tokens it has not seen yet
        width = int(behind.max())
        cols = draft.cache.lengths[:, None] + torch.arange(width, device=behind.device)[None, :]
        block = rows.tokens.gather(1, cols.clamp(max=rows.tokens.shape[1] - 1))
        logits = draft.forward(block, draft.cache.lengths, logits_at=behind - 1)
        stats.draft_calls += 1
        draft.cache.set_lengths(rows.lengths)
        at = torch.zeros_like(rows.lengths)

        def step(i: int, token: torch.Tensor) -> torch.Tensor:
            return draft.forward(token.unsqueeze(1), rows.lengths + i - 1, logits_at=at)

        drafts, probs = self.sampler.sample_drafts(logits, step, n, rows, params, generator, stats)
        draft.cache.set_lengths(rows.lengths + drafts.shape[1] - 1)  # the last proposal is not in the cache
        return drafts, probs

    def after_verify(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor | None, proposal: Proposal,
                     stats: SpecStats) -> None:
        if proposal.from_lookup is not None:  # the draft's speculative entries of lookup rows were not verified
            self.draft.cache.rollback(torch.where(proposal.from_lookup, old_lengths, self.draft.cache.lengths))
        # The draft holds old_len + k - 1 tokens (it never saw its last proposal); keep only the valid prefix.
        self.draft.cache.rollback(rows.lengths - 1)

    def after_plain_step(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor | None,
                         stats: SpecStats) -> None:
        return None  # the next proposal catches up on the new tokens in its first call


class FeatureDraftProposer(_DraftModelProposer):
    """A `FeatureDraft`: the first proposal comes from (logits, g) of the last pass over true target features, each
    next one from a step on (g, previous token). After a verify the draft catches up on the appended tokens with the
    target's true features (its speculative entries rolled back). After plain steps it catches up lazily, in one call
    before its next proposal (`defer_catch_up`), so plain steps cost no draft call; a step session turns that off,
    since its batch changes between steps. The draft cache holds (true feature, token) pairs up to the pending token."""

    needs_hidden = True

    def __init__(self, feature: FeatureDraftRunner, draft_confidence: float = 0.0) -> None:
        self.feature = feature
        self.sampler = DraftSampler(feature.lm, draft_confidence)
        self.vocab_size = feature.vocab_size
        self.first: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits, g) of the next block's first proposal
        self.defer_catch_up = True
        self._pending: list[torch.Tensor] = []  # hidden states [B, 1, H] of plain steps not yet caught up
        self._pending_from: torch.Tensor | None = None

    @property
    def lm(self) -> CachedCausalLM:
        return self.feature.lm

    def start(self, batch: int, capacity: int) -> None:
        self.feature.start(batch, capacity)
        self.first, self._pending, self._pending_from = None, [], None

    def prefill(self, rows: _Rows, stats: SpecStats) -> None:
        return None  # it reads the target's features of the prompts: after_prefill

    def after_prefill(self, rows: _Rows, hidden: torch.Tensor | None, stats: SpecStats) -> None:
        """Run over the prompts' true features: draft positions 0..L-1 read (f[p], x[p+1]); x[L] is the token the
        target's prefill just appended."""
        assert hidden is not None
        starts = torch.zeros(rows.batch, dtype=torch.long, device=rows.tokens.device)
        self.first = self.feature.step(hidden, rows.tokens[:, 1:rows.max_prompt + 1], starts,
                                       logits_at=rows.prompt_lengths - 1)
        self.feature.cache.set_lengths(rows.lengths - 1)
        stats.draft_calls += 1

    def draft_tokens(self, rows: _Rows, n: int, params: Sampling, generator: torch.Generator | None,
                     stats: SpecStats) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first proposal from `first`, each next one from a step on (g, previous token) at the draft positions
        after the pending token's."""
        if self._pending:
            self._catch_up(rows, None, stats)
        assert self.first is not None
        feature = self.feature
        logits, state = self.first
        base = rows.lengths - 1  # the draft cache's length: (true feature, token) pairs up to the pending token
        at = torch.zeros_like(base)

        def step(i: int, token: torch.Tensor) -> torch.Tensor:
            nonlocal state
            out, state = feature.step(state.unsqueeze(1), token.unsqueeze(1), base + i - 1, logits_at=at)
            return out

        drafts, probs = self.sampler.sample_drafts(logits, step, n, rows, params, generator, stats)
        feature.cache.set_lengths(base)  # the speculative entries go: the catch-up rewrites them with true features
        return drafts, probs

    def after_verify(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor | None, proposal: Proposal,
                     stats: SpecStats) -> None:
        assert hidden is not None
        self._catch_up(rows, (old_lengths, hidden), stats)

    def after_plain_step(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor | None,
                         stats: SpecStats) -> None:
        assert hidden is not None
        if not self.defer_catch_up:
            self._catch_up(rows, (old_lengths, hidden), stats)
            return
        if not self._pending:
            self._pending_from = old_lengths
        self._pending.append(hidden)

    def _catch_up(self, rows: _Rows, new: tuple[torch.Tensor, torch.Tensor] | None, stats: SpecStats) -> None:
        """Run the rows' newly appended tokens (those of deferred plain steps, then `new` = (lengths before the last
        pass, its hidden states)) with the target's true features at the positions before them, from draft position
        start - 1 on; (logits, g) at each row's last new token become the next block's first proposal."""
        parts = list(self._pending)
        start = self._pending_from if parts else None
        if new is not None:
            parts.append(new[1])
            start = new[0] if start is None else start
        self._pending, self._pending_from = [], None
        if not bool(rows.active.any()):  # nothing will be proposed again; stopped rows' results are unused
            return
        assert start is not None
        hidden = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        kept = rows.lengths - start  # tokens appended since `start` (rows still active appended in every pass)
        width = max(int(kept.max()), 1)
        cols = start[:, None] + torch.arange(width, device=kept.device)[None, :]
        tokens = rows.tokens.gather(1, cols.clamp(max=rows.tokens.shape[1] - 1))
        self.first = self.feature.step(hidden[:, :width], tokens, start - 1, logits_at=(kept - 1).clamp(min=0))
        stats.draft_calls += 1
        self.feature.cache.set_lengths(rows.lengths - 1)


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


class PromptLookupProposer:
    """Prompt lookup alone: each row proposes what followed the most recent earlier occurrence of its last n-gram
    (one-hot q: deterministic proposals); rows without one propose nothing, and with no match anywhere the decoder
    takes a plain step."""

    needs_hidden = False

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.vocab_size, self.max_ngram, self.min_ngram = vocab_size, max_ngram, min_ngram

    def start(self, batch: int, capacity: int) -> None:
        return None

    def prefill(self, rows: _Rows, stats: SpecStats) -> None:
        return None

    def after_prefill(self, rows: _Rows, hidden: torch.Tensor | None, stats: SpecStats) -> None:
        return None

    def find(self, rows: _Rows, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(continuations [B, w] right-padded with 0, counts [B]) of at most `n` tokens (capped to the budget)."""
        return propose_ngram_continuations(rows.tokens, rows.lengths, rows.active, _row_cap(n, rows),
                                           self.max_ngram, self.min_ngram)

    def propose(self, rows: _Rows, n: int, params: Sampling, generator: torch.Generator | None,
                stats: SpecStats) -> Proposal | None:
        if n < 1:
            return None
        found, counts = self.find(rows, n)
        if found.shape[1] == 0:
            return None
        probs = _one_hot(found, self.vocab_size) if params.do_sample else None
        return Proposal(found, probs, counts, counts > 0)

    def after_verify(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor | None, proposal: Proposal,
                     stats: SpecStats) -> None:
        return None

    def after_plain_step(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor | None,
                         stats: SpecStats) -> None:
        return None


class LookupDraftMixture:
    """Prompt lookup beside a draft: a row whose last `min_ngram`..`max_ngram` tokens occurred earlier proposes the
    (up to `lookup_tokens`) tokens that followed, free of draft cost, instead of the draft's; rows without a match use
    the draft (no draft call when every row has one, or when the block size is 0). `extend` also appends lookup tokens
    after the draft's where text + drafts repeats an earlier n-gram; `mix` = m (sampling) draws a lookup row's first
    proposal from m * onehot(lookup's token) + (1 - m) * q_draft (`mix_lookup_and_draft`)."""

    def __init__(self, draft: LayerDraftProposer | FeatureDraftProposer, lookup: PromptLookupProposer,
                 lookup_tokens: int, extend: bool = False, mix: float = 0.0) -> None:
        self.draft, self.lookup = draft, lookup
        self.lookup_tokens, self.extend, self.mix = lookup_tokens, extend, mix
        self.needs_hidden = draft.needs_hidden
        self.vocab_size = draft.vocab_size

    def start(self, batch: int, capacity: int) -> None:
        self.draft.start(batch, capacity)

    def prefill(self, rows: _Rows, stats: SpecStats) -> None:
        self.draft.prefill(rows, stats)

    def after_prefill(self, rows: _Rows, hidden: torch.Tensor | None, stats: SpecStats) -> None:
        self.draft.after_prefill(rows, hidden, stats)

    def after_verify(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor | None, proposal: Proposal,
                     stats: SpecStats) -> None:
        self.draft.after_verify(rows, old_lengths, hidden, proposal, stats)

    def after_plain_step(self, rows: _Rows, old_lengths: torch.Tensor, hidden: torch.Tensor | None,
                         stats: SpecStats) -> None:
        self.draft.after_plain_step(rows, old_lengths, hidden, stats)

    def propose(self, rows: _Rows, n: int, params: Sampling, generator: torch.Generator | None,
                stats: SpecStats) -> Proposal | None:
        """Prompt-lookup continuations where a row has one, the draft's n tokens for the others."""
        found, counts = self.lookup.find(rows, self.lookup_tokens)
        use = counts > 0
        vocab = self.vocab_size
        if n < 1:  # no draft this step: lookup rows only, the others propose nothing
            if not bool(use[rows.active].any()):
                return None
            return Proposal(found, _one_hot(found, vocab) if params.do_sample else None, counts, use)

        def propose_draft() -> tuple[torch.Tensor, torch.Tensor | None]:
            return self.draft.draft_tokens(rows, n, params, generator, stats)

        if params.do_sample and self.mix > 0 and bool(use[rows.active].any()):
            return Proposal(*self.mix_lookup_and_draft(found, counts, use, propose_draft, generator))
        if bool(use[rows.active].all()):  # every live row has a continuation: no draft call this block
            return Proposal(found, _one_hot(found, vocab) if params.do_sample else None, counts, use)
        drafts, probs = propose_draft()
        num_draft = torch.full_like(rows.lengths, drafts.shape[1])
        if self.extend:
            drafts, probs, num_draft = self.extend_with_lookup(rows, drafts, probs, rows.active & ~use, vocab)
        if not bool(use.any()):
            return Proposal(drafts, probs, num_draft, use)
        return Proposal(*_merge_proposals(found, counts, drafts, probs, num_draft, use, vocab), use)

    def mix_lookup_and_draft(self, found: torch.Tensor, counts: torch.Tensor, use: torch.Tensor,
                             propose: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
                             generator: torch.Generator | None,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`mix` (sampling): a row with a lookup continuation draws its first proposal from the mixture
        q' = m * onehot(lookup's first token) + (1 - m) * q_draft (a coin picks the lookup's token or the draft's
        sample), verified against q'. If the proposal is the lookup's token the block goes on with the lookup's
        tokens (one-hot q), else with the draft's. Each position's q is the distribution its token was drawn from
        given the tokens before it, so rejection sampling stays exact; where lookup and draft disagree the mixture
        can be accepted where either alone would be rejected."""
        drafts, probs = propose()
        assert probs is not None
        m, vocab = drafts.shape[1], probs.shape[-1]
        lam = self.mix
        gen_device = generator.device if generator is not None else drafts.device
        coin = torch.rand(drafts.shape[0], dtype=torch.float64, device=gen_device, generator=generator)
        coin = coin.to(drafts.device) < lam
        take = use & (coin | (drafts[:, 0] == found[:, 0]))  # the first proposal is the lookup's token
        merged, q, num_draft = _merge_proposals(found, counts, drafts, probs, torch.full_like(counts, m), take, vocab)
        assert q is not None
        mixture = lam * _one_hot(found[:, :1], vocab)[:, 0] + (1.0 - lam) * probs[:, 0]
        q[:, 0] = torch.where(use[:, None], mixture, q[:, 0])
        return merged, q, num_draft, take

    def extend_with_lookup(self, rows: _Rows, drafts: torch.Tensor, probs: torch.Tensor | None,
                           rows_to_extend: torch.Tensor, vocab: int,
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """`extend`: after the draft's m tokens, a row whose text + drafts ends in an n-gram seen earlier proposes
        what followed it too (up to lookup_tokens - m tokens, one-hot q): (drafts, q, num_draft)."""
        m = drafts.shape[1]
        room = _row_cap(self.lookup_tokens, rows) - m
        num_draft = torch.full_like(rows.lengths, m)
        if room < 1:
            return drafts, probs, num_draft
        extensions: dict[int, list[int]] = {}
        for b in torch.nonzero(rows_to_extend).flatten().tolist():
            text = rows.tokens[b, :int(rows.lengths[b])].tolist() + drafts[b].tolist()
            ext = find_ngram_continuation(text, room, self.lookup.max_ngram, self.lookup.min_ngram)
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
