"""Offline acceptance estimator: how often would the target accept the draft's tokens, from teacher-forced
logits alone (no decoding).

For one position, speculative sampling accepts the draft's token with probability
``α = Σ_x min(p_T(x), p_D(x))`` (Leviathan et al., 2023), where p_T, p_D are the *warped* distributions the
decoder samples from (temperature, top-p; `soaes_specdec.sampling.warp_probs`). Greedy decoding accepts iff
the two argmaxes agree. With a block of n draft tokens and acceptance α_t at successive positions, the
expected number of tokens per target call is ``1 + Σ_{j=1..n} Π_{i<j} α_{t+i}``; with a constant α it is
``(1 − α^{n+1}) / (1 − α)``. Teacher forcing follows the target's own path, which is exactly the path
greedy speculative decoding takes, so the greedy estimate is the decoder's expectation on that text.

The predicted acceptance *rate* (accepted / proposed, what soaes-specdec reports) comes from `block_walk`, which
follows the decoder's blocks along the text: a block starts right after the previous one ends, so regions where
drafts fail get more blocks and more proposals than easy ones. Averaging α uniformly over positions ignores this
and over-predicts the measured rate; on the target's own greedy text the walk reproduces the greedy decoder's
counts exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soaes_core.errors import InvalidArgumentError
from soaes_specdec.sampling import SamplingParams, warp_probs

from .losses import IGNORE_INDEX, TopKLogits

_CHUNK_ROWS = 256


def _warp_topk(teacher: TopKLogits, params: SamplingParams) -> torch.Tensor:
    """Teacher probabilities on its top-k tokens after temperature and top-p (the tail is unknown).

    Exact probabilities come from the stored full logsumexp when it is at the sampling temperature; with
    top-p the nucleus is renormalised, which is exact whenever the nucleus lies inside the top-k.
    """
    z = teacher.values.float() / params.temperature
    if math.isclose(teacher.temperature, params.temperature, rel_tol=1e-6):
        probs = torch.exp(z - teacher.logsumexp.float().unsqueeze(-1))
    else:  # logsumexp captured at another τ: renormalise over the top-k (an approximation)
        probs = torch.softmax(z, -1)
    if params.top_p >= 1.0:
        return probs
    order = torch.sort(probs, -1, descending=True).values
    before = torch.cumsum(order, -1) - order
    kept = (before < params.top_p).sum(-1, keepdim=True).clamp(min=1)
    probs = probs * (probs >= order.gather(-1, kept - 1))
    return probs / probs.sum(-1, keepdim=True)


def acceptance_probabilities(target: torch.Tensor | TopKLogits, draft_logits: torch.Tensor, *,
                             greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """Per-position acceptance probability (..., ) of the draft's next token.

    `target` dense logits (..., V) or `TopKLogits` (then α is summed over the teacher's top-k only, a lower
    bound that is exact when the warped teacher puts no mass outside its top-k, as top-p usually ensures).
    """
    if greedy:
        t_arg = target.indices[..., 0] if isinstance(target, TopKLogits) else target.argmax(-1)
        return (t_arg == draft_logits.argmax(-1)).float()
    params = SamplingParams(do_sample=True, temperature=temperature, top_p=top_p)
    lead = draft_logits.shape[:-1]
    d_flat = draft_logits.reshape(-1, draft_logits.shape[-1])
    out = torch.empty(d_flat.shape[0], dtype=torch.float32, device=draft_logits.device)
    for s in range(0, d_flat.shape[0], _CHUNK_ROWS):
        q = warp_probs(d_flat[s:s + _CHUNK_ROWS], params)
        if isinstance(target, TopKLogits):
            k = target.k
            sub = TopKLogits(target.values.reshape(-1, k)[s:s + _CHUNK_ROWS],
                             target.indices.reshape(-1, k)[s:s + _CHUNK_ROWS],
                             target.logsumexp.reshape(-1)[s:s + _CHUNK_ROWS], target.temperature)
            p = _warp_topk(sub, params)
            out[s:s + _CHUNK_ROWS] = torch.minimum(p, q.gather(-1, sub.indices.long())).sum(-1)
        else:
            p = warp_probs(target.reshape(-1, target.shape[-1])[s:s + _CHUNK_ROWS], params)
            out[s:s + _CHUNK_ROWS] = torch.minimum(p, q).sum(-1)
    return out.view(lead)


def positional_accepted_length(alphas: torch.Tensor, n: int) -> torch.Tensor:
    """Per starting position t of a sequence (L,): 1 + Σ_{j=1..n} Π_{i<j} α_{t+i}, truncated at the end."""
    L = alphas.shape[0]
    out = torch.ones(L, dtype=torch.float64)
    run = torch.ones(L, dtype=torch.float64)
    a = alphas.double()
    for j in range(n):
        shifted = torch.zeros(L, dtype=torch.float64)
        if j < L:
            shifted[: L - j] = a[j:]
        run = run * shifted
        out = out + run
    return out


def block_walk(alphas: torch.Tensor, n: int, start: int = 1, limit: int | None = None) -> tuple[float, float, float]:
    """Expected (accepted, proposed, target calls) of a speculative decoder with block size n walking one text.

    `alphas[t]` (L,): probability that a draft token predicting text token t is accepted (0/1 for greedy),
    independently. The first block starts at token `start` (token 0 comes from the target's prefill, never
    from the draft); a block at token t proposes w = n tokens (w = min(n, limit − t) under a `limit`, a
    max_new_tokens budget: the decoder proposes no more than it may still add), accepts j of them with probability
    Π_{i<j} α·(1 − α_j), and the target adds one token, so the next block starts j + 1 tokens later; blocks start
    while fewer than `limit` (default L) tokens exist. Past the end of `alphas` a proposal counts as rejected.
    """
    if n < 1:
        raise InvalidArgumentError(f"block size n must be ≥ 1, got {n}")
    a = alphas.double().tolist()
    length = len(a)
    budget = limit
    limit = length if limit is None else limit
    reach = [0.0] * (max(limit, start) + n + 2)  # probability that a block starts at token t
    reach[start] = 1.0
    accepted = proposed = calls = 0.0
    for t in range(start, limit):
        run = reach[t]
        if run == 0.0:
            continue
        calls += run
        w = n if budget is None else min(n, budget - t)
        proposed += run * w
        for j in range(w):
            alpha = a[t + j] if t + j < length else 0.0
            rejected = run * (1.0 - alpha)
            accepted += rejected * j
            reach[t + j + 1] += rejected
            run *= alpha
        accepted += run * w
        reach[t + w + 1] += run
    return accepted, proposed, calls


@dataclass
class AcceptanceEstimate:
    """Aggregates over the counted positions (labels ≠ -100)."""

    positions: int
    alpha_greedy: float
    alpha_sampled: float
    top_p: float
    temperature: float
    # from `block_walk`: tokens per target call (bonus included) and accepted / proposed, per "greedy_n3", ...
    accepted_length: dict[str, float] = field(default_factory=dict)
    predicted_acceptance_rate: dict[str, float] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}acceptance_greedy": self.alpha_greedy, f"{prefix}acceptance_top_p": self.alpha_sampled}
        out.update({f"{prefix}accepted_length_{k}": v for k, v in self.accepted_length.items()})
        out.update({f"{prefix}acceptance_rate_{k}": v for k, v in self.predicted_acceptance_rate.items()})
        return out


class AcceptanceAccumulator:
    """Accumulate per-position α over batches (labels-shifted, HF convention) and summarise."""

    def __init__(self, top_p: float = 0.7, temperature: float = 1.0, block_sizes: tuple[int, ...] = (3, 9)) -> None:
        self.top_p, self.temperature, self.block_sizes = top_p, temperature, tuple(block_sizes)
        self.greedy: list[torch.Tensor] = []
        self.sampled: list[torch.Tensor] = []
        self.walks: dict[str, list[tuple[float, float, float]]] = {}

    def add(self, target: torch.Tensor | TopKLogits, draft_logits: torch.Tensor, labels: torch.Tensor) -> None:
        """`target`/`draft_logits` (B, L, ...) and `labels` (B, L): position t is scored iff labels[t+1] ≠ -100."""
        if isinstance(target, TopKLogits):
            target = target.index(lambda t: t[:, :-1])
        else:
            target = target[:, :-1]
        draft_logits = draft_logits[:, :-1]
        mask = labels[:, 1:] != IGNORE_INDEX
        g = acceptance_probabilities(target, draft_logits, greedy=True)
        s = acceptance_probabilities(target, draft_logits, temperature=self.temperature, top_p=self.top_p)
        for b in range(mask.shape[0]):
            m = mask[b].to(g.device)
            if not m.any():
                continue
            self.greedy.append(g[b][m].cpu())
            self.sampled.append(s[b][m].cpu())
            for name, alphas in (("greedy", g[b][m].cpu()), ("sampled", s[b][m].cpu())):
                for n in self.block_sizes:
                    self.walks.setdefault(f"{name}_n{n}", []).append(block_walk(alphas, n))

    def result(self) -> AcceptanceEstimate:
        if not self.greedy:
            raise InvalidArgumentError("no counted positions to estimate acceptance from")
        g = torch.cat(self.greedy).double()
        s = torch.cat(self.sampled).double()
        lengths, rates = {}, {}
        for key, walks in self.walks.items():  # ratios of expected totals, as the decoder's stats aggregate
            accepted, proposed, calls = (sum(w[i] for w in walks) for i in range(3))
            rates[key] = accepted / proposed if proposed else 0.0
            lengths[key] = (accepted + calls) / calls if calls else 1.0
        return AcceptanceEstimate(int(g.numel()), float(g.mean()), float(s.mean()), self.top_p, self.temperature,
                                  lengths, rates)


@torch.no_grad()
def estimate_acceptance(target_model: torch.nn.Module, draft_model: torch.nn.Module,
                        batches: list[dict[str, torch.Tensor]], top_p: float = 0.7, temperature: float = 1.0,
                        block_sizes: tuple[int, ...] = (3, 9)) -> AcceptanceEstimate:
    """Teacher-force both models on `batches` (input_ids, attention_mask, labels) and estimate acceptance."""
    acc = AcceptanceAccumulator(top_p, temperature, block_sizes)
    for batch in batches:
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        t = target_model(**kwargs, use_cache=False).logits
        d = draft_model(**kwargs, use_cache=False).logits
        acc.add(t, d, batch["labels"])
    return acc.result()


def estimate_drafts_acceptance(target: Any, examples_path: str | Path, drafts: Mapping[str, str | Path],
                               load_draft_kwargs: Mapping[str, Any] | None = None, top_p: float = 0.7,
                               block_sizes: tuple[int, ...] = (3,)) -> dict[str, dict[str, float]]:
    """Teacher-forced acceptance (greedy and top-p) of each draft in `drafts` (name -> folder) against the loaded
    `target` on the token examples at `examples_path`; logits are compared in float32 on the CPU."""
    from soaes_core.placement import input_device
    from soaes_specdec.draft import load_draft

    from .token_data import load_token_examples

    def logits(model: Any, ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids], device=input_device(model)), use_cache=False).logits.float().cpu()

    examples = load_token_examples(examples_path)
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        t_logits = [logits(target, ex.input_ids) for ex in examples]
        for name, folder in drafts.items():
            draft = load_draft(str(folder), **dict(load_draft_kwargs or {}))
            acc = AcceptanceAccumulator(top_p=top_p, block_sizes=block_sizes)
            for tl, ex in zip(t_logits, examples, strict=True):
                acc.add(tl, logits(draft, ex.input_ids), torch.tensor([ex.labels]))
            out[name] = {k: round(v, 6) for k, v in acc.result().as_metrics().items()}
    return out
