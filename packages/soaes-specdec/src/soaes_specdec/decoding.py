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
from typing import Any, Protocol

import torch

from soaes_core.errors import InvalidArgumentError

from .block_policy import AcceptanceTracker, draft_cost
from .cost_table import CostTable, load_or_measure
from .feature_draft import FeatureDraft, check_draft_target
from .feature_runner import FeatureDraftRunner
from .lookup import propose_ngram_continuations
from .proposers import (
    FeatureDraftProposer,
    LayerDraftProposer,
    LookupDraftMixture,
    PromptLookupProposer,
    Proposer,
)
from .rows import (
    RowSampling,
    Sampling,
    SpecDecodeOutput,
    SpecStats,
    Streamer,
    _draw,
    _one_hot,
    _pad_columns,
    _prompt_block,
    _row_cap,
    _Rows,
    _verify_block,
    cap_block_width,
    check_lengths,
    check_num_speculative_tokens,
    eos_set,
    normalise_prompts,
)
from .runner import CachedCausalLM
from .sampling import SamplingParams
from .settings import DecodingSettings

__all__ = [
    "DecodingSettings", "PromptLookupDecoder", "RowSampling", "Sampling", "SpecDecodeOutput", "SpecStats",
    "SpeculativeDecoder", "Streamer", "autoregressive_generate", "cap_block_width", "check_lengths", "eos_set",
    "normalise_prompts", "padded_block_width", "prepack_rows",
]

class BlockSizeTracker(Protocol):
    """What the decoder asks of an acceptance tracker (`block_policy.AcceptanceTracker`, or a step session's)."""

    def choose(self, pass_ms: Callable[[int], float], draft_ms: Callable[[int], float], active: Any = None) -> int:
        """The next step's block size for the active rows."""

    def update(self, num_draft: Any, num_accepted: Any, active: Any = None) -> None:
        """Record one verify's per-row outcomes."""


COST_TABLE_MAX_ROWS = 16
"""Row counts above this are not timed for a cost table: the table extrapolates (large batches are compute bound)."""


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
                stats: SpecStats, return_hidden: bool = False) -> torch.Tensor | None:
    """One plain decoding step: a target call on every row's pending token, one token appended per active row. With
    `return_hidden`, returns the target's post-norm hidden state at each row's pending token [B, 1, H] (else None)."""
    starts = rows.lengths - 1
    active_rows = int(rows.active.sum())
    hidden = None
    if return_hidden:
        logits, hidden = runner.forward(rows.last_tokens().unsqueeze(1), starts, logits_at=torch.zeros_like(starts),
                                        return_hidden=True)
        hidden = hidden.unsqueeze(1)
    else:
        logits = runner.forward(rows.last_tokens().unsqueeze(1), starts, logits_at=torch.zeros_like(starts))
    runner.cache.set_lengths(rows.lengths)
    stats.target_calls += 1
    stats.decode_row_calls += active_rows
    token, _ = _draw(logits, params, generator)
    stats.decode_tokens += int(rows.append(token.unsqueeze(1), torch.ones_like(token)).sum())
    return hidden


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
                       from_lookup: torch.Tensor | None = None, max_width: int = 0,
                       ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One target call over [pending token, drafts...]; accept, append, roll the target cache back. Returns (the
    target's post-norm hidden states of the block's rows [B, n+1, H] with `return_hidden`, else None; the number of
    proposals accepted per row [B]).
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
    return hidden, num_accepted


def _proposer_for(draft: CachedCausalLM | FeatureDraftRunner, settings: DecodingSettings) -> Proposer:
    """The proposer `settings` ask for over a draft runner: the draft alone, or prompt lookup beside it."""
    inner: LayerDraftProposer | FeatureDraftProposer
    if isinstance(draft, FeatureDraftRunner):
        inner = FeatureDraftProposer(draft, settings.draft_confidence)
    else:
        inner = LayerDraftProposer(draft, settings.draft_confidence)
    if not settings.lookup_tokens:
        return inner
    lookup = PromptLookupProposer(inner.vocab_size, settings.lookup_max_ngram, settings.lookup_min_ngram)
    return LookupDraftMixture(inner, lookup, settings.lookup_tokens, settings.lookup_extend, settings.lookup_mix)


class SpeculativeDecoder:
    """Draft-model speculative decoding (Leviathan et al. 2023), exact for greedy and sampling.

    Each step the decoder picks a block size n, asks its `proposers.Proposer` for up to n tokens per row, verifies
    them plus a bonus position in one target call, appends what is accepted and lets the proposer catch up; caches
    roll back by moving length pointers. With no `num_speculative_tokens` it picks n in 0..max_speculative_tokens
    itself, one n per step for the whole batch: the n with the most expected tokens per millisecond under this host's
    cost table (`cost_table`, measured once and cached, or `calibration_file`) and each row's running acceptance
    (`block_policy.AcceptanceTracker`); n = 0 is a plain decoding step. A fixed n stays available.

    `settings` (`DecodingSettings`) holds every option; the keyword arguments (`draft_confidence`, `lookup_tokens`,
    `lookup_max_ngram`, `lookup_min_ngram`, `lookup_extend`, `lookup_mix`, `prepack`, `batch_invariant`, ...)
    build one instead. `batch_invariant=True` verifies token by token through plain decoding's one-row calls: greedy
    output then equals plain batch-1 decoding bit for bit in every dtype, but a verify costs n+1 steps.
    `lookup_tokens` > 0 puts prompt lookup beside the draft (`proposers.LookupDraftMixture`). `prepack=True`
    (fp32 on a CPU with MKL) packs the target's weights for the verify's row counts on the first `generate`; with a
    cost table the table decides per row count which projection path (packed or not) the target runs.

    `draft` is a layer draft (a causal LM sharing the target's vocabulary, or its `CachedCausalLM`) or a
    feature-conditioned `FeatureDraft` (or its `FeatureDraftRunner`): the target's prefill and verify passes then
    also return their post-norm hidden states, which the draft proposes from.
    """

    def __init__(self, target: Any, draft: Any, num_speculative_tokens: int | None = None, *,
                 settings: DecodingSettings | None = None, use_kernel: bool | None = None,
                 **options: Any) -> None:
        if settings is None:
            try:
                settings = DecodingSettings(num_speculative_tokens=num_speculative_tokens, **options)
            except TypeError as err:
                raise InvalidArgumentError(f"SpeculativeDecoder: {err}") from None
        elif options or num_speculative_tokens is not None:
            raise InvalidArgumentError("SpeculativeDecoder: give either settings= or the individual settings as "
                                       "keywords, not both")
        elif not isinstance(settings, DecodingSettings):
            raise InvalidArgumentError(f"settings must be a DecodingSettings, got {type(settings).__name__}")
        else:
            settings.validate()
        self.settings = settings
        self.target = _as_runner(target, settings.batch_invariant)
        self.prepack = _check_prepack(self.target, settings.prepack)
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
        if self.target.vocab_size != self.draft.vocab_size:
            raise InvalidArgumentError(
                f"target and draft vocabularies differ ({self.target.vocab_size} vs {self.draft.vocab_size} "
                "output rows): speculative decoding needs a shared tokenizer and vocabulary")
        if self.feature is not None:
            check_draft_target(self.feature.draft, self.target.model)  # built for this target, or told otherwise
        self.use_kernel = use_kernel
        self.proposer = _proposer_for(self.feature if self.feature is not None else self.draft, settings)
        # the draft's own proposer (inside the lookup mixture when there is one)
        self.draft_proposer = self.proposer.draft if isinstance(self.proposer, LookupDraftMixture) else self.proposer
        self.target_costs: CostTable | None = None  # loaded on the first generate that needs them
        self.draft_costs: CostTable | None = None
        self.tracker: BlockSizeTracker | None = None

    # the settings, read where the decoder's attributes were read before there was a settings object
    @property
    def num_speculative_tokens(self) -> int | None:
        return self.settings.num_speculative_tokens

    @property
    def lookup_tokens(self) -> int:
        return self.settings.lookup_tokens

    @property
    def lookup_mix(self) -> float:
        return self.settings.lookup_mix

    @property
    def draft_confidence(self) -> float:
        return self.settings.draft_confidence

    def _block_width(self) -> int:
        """The most tokens one block proposes (draft or lookup)."""
        return self.settings.block_width

    # ------------------------------------------------------------------------------------- block size

    def load_costs(self, batch: int = 1) -> None:
        """Load (or measure once, then cache) this host's cost tables of the target and the draft, and let the target
        run each row count on its fastest projection path (packing only where packing wins)."""
        if self.target_costs is None:
            rows = range(1, min(batch * (self._block_width() + 1), COST_TABLE_MAX_ROWS) + 1)
            self.target_costs = load_or_measure(self.target, rows=rows,
                                                calibration_file=self.settings.calibration_file)
            if not self.settings.batch_invariant:
                self.target.apply_cost_table(self.target_costs)
        if self.draft_costs is None:
            self.draft_costs = load_or_measure(self.draft, rows=range(1, min(batch, COST_TABLE_MAX_ROWS) + 1))
            self.draft.apply_cost_table(self.draft_costs)

    def target_pass_ms(self, rows: int) -> float:
        """ms of one target pass of `rows` rows on its fastest path available here (cost table loaded)."""
        assert self.target_costs is not None
        return self.target_costs.pass_ms(rows, self.target.available_paths(rows))

    def _start_policy(self, batch: int) -> None:
        """A fresh acceptance tracker for `batch` rows (adaptive block sizes only)."""
        if not self.settings.adaptive:
            return
        self.load_costs(batch)
        self.tracker = AcceptanceTracker(batch, n_max=self.settings.max_speculative_tokens)

    def _choose_block_size(self, rows: _Rows) -> int:
        """This step's n for the batch: the fixed one, or the policy's choice (0 = a plain step)."""
        fixed = self.settings.num_speculative_tokens
        if fixed is not None:
            return fixed
        assert self.tracker is not None and self.target_costs is not None and self.draft_costs is not None
        draft_ms = draft_cost(self.draft_costs.pass_ms(rows.batch, self.draft.available_paths(rows.batch)))
        return self.tracker.choose(self.target_pass_ms, draft_ms, active=rows.active.tolist())

    # ------------------------------------------------------------------------------------- decoding

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
            self.target.prepack(prepack_rows(rows.batch, (self.settings.max_block, self.settings.lookup_tokens)))
        self._start_policy(rows.batch)
        self.proposer.start(rows.batch, rows.tokens.shape[1])
        stats = SpecStats()
        self._prefill_rows(rows, params, generator, stats)
        while bool(rows.active.any()):
            self._step(rows, params, generator, stats)
        stats.wall_time_s = time.perf_counter() - t0
        return rows.output(stats)

    def _prefill_rows(self, rows: _Rows, params: Sampling, generator: torch.Generator | None,
                      stats: SpecStats) -> None:
        """Prefill the proposer and the target on the prompts and append each row's first token."""
        self.proposer.prefill(rows, stats)
        starts = torch.zeros(rows.batch, dtype=torch.long, device=rows.tokens.device)
        hidden = None
        if self.proposer.needs_hidden:
            logits, hidden = self.target.forward(_prompt_block(rows), starts, logits_at=rows.prompt_lengths - 1,
                                                 return_hidden="all")
        else:
            logits = self.target.forward(_prompt_block(rows), starts, logits_at=rows.prompt_lengths - 1)
        self.target.cache.set_lengths(rows.prompt_lengths)
        stats.target_calls += 1
        token, _ = _draw(logits, params, generator)
        rows.append(token.unsqueeze(1), torch.ones_like(token))
        self.proposer.after_prefill(rows, hidden, stats)

    def _step(self, rows: _Rows, params: Sampling, generator: torch.Generator | None, stats: SpecStats) -> None:
        """One step: choose n, propose, verify and append (or a plain step when nothing is proposed), catch up."""
        n = self._choose_block_size(rows)
        if n > 0:
            n = _row_cap(n, rows)  # a block proposes no more tokens than the rows have left
        proposal = self.proposer.propose(rows, n, params, generator, stats)
        old_lengths = rows.lengths.clone()
        if proposal is None:
            hidden = _plain_step(self.target, rows, params, generator, stats,
                                 return_hidden=self.proposer.needs_hidden)
            self.proposer.after_plain_step(rows, old_lengths, hidden, stats)
            stats.block_sizes[0] = stats.block_sizes.get(0, 0) + 1
            return
        active = rows.active.clone()
        hidden, num_accepted = _verify_and_append(
            self.target, rows, proposal.tokens, proposal.probs, proposal.num_draft, params, generator, stats,
            self.use_kernel, return_hidden=self.proposer.needs_hidden, from_lookup=proposal.from_lookup,
            max_width=_row_cap(self._block_width(), rows))
        self.proposer.after_verify(rows, old_lengths, hidden, proposal, stats)
        stats.block_sizes[n] = stats.block_sizes.get(n, 0) + 1
        if self.tracker is not None and n > 0:  # the draft's acceptance: lookup rows say nothing about it
            drafted = active if proposal.from_lookup is None else active & ~proposal.from_lookup
            self.tracker.update(proposal.num_draft, num_accepted, active=drafted.tolist())


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
