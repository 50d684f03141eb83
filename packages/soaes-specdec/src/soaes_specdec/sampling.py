"""Sampling math as small pure functions: logits warpers, inverse-CDF sampling, and sampling settings.

Every decoder (autoregressive, prompt lookup, speculative) draws tokens through `sample_next`, so the
distributions they sample from are identical by construction. Warpers follow transformers' order
(temperature, then top-k, then top-p) but keep ties at the cut-off (a tie-invariant definition that a
fused kernel can reproduce exactly): top-k keeps token i iff fewer than k tokens are strictly more probable.

Top-p (nucleus) rule, the one definition shared by `apply_top_p` and the Triton kernel: keep the smallest
prefix of the tokens sorted by descending probability whose mass *reaches* top_p, plus every token tied with
its last member. "Reaches" means mass >= `top_p_limit(top_p)` = top_p - `TOP_P_TOLERANCE` (rounded to fp32),
with masses summed in float64. Equivalently: token i is kept iff the mass of strictly more probable tokens is
< top_p_limit. The tolerance makes prefixes whose exact sum equals top_p count as reaching it whatever the
fp32 rounding of the softmax (top_p=0.8 on p=[0.3, 0.1, 0.1, 0.5] keeps [0.3, 0, 0, 0.5], as transformers'
TopPLogitsWarper does; on [0.6, 0.2, 0.1, 0.05, 0.05] it keeps 2 tokens), so the reference and the kernel,
whose fp32 probabilities differ in the last bits, decide such ties identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from soaes_core.errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: greedy (argmax of raw logits) or sampling with temperature / top-k / top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.do_sample and not (isinstance(self.temperature, (int, float)) and self.temperature > 0
                                   and math.isfinite(self.temperature)):
            raise InvalidArgumentError(f"temperature must be > 0 when sampling, got {self.temperature!r}")


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mask (to -inf) every logit below the k-th largest along the last dim; ties with it are kept."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


TOP_P_TOLERANCE = 1e-6
"""Slack below top_p at which a nucleus counts as complete: above the few-ulp differences between fp32
softmax implementations (reference vs kernel), far below any mass a user would tune top_p by."""


def top_p_limit(top_p: float) -> float:
    """The mass a nucleus must reach, top_p - TOP_P_TOLERANCE rounded to fp32 (the kernel receives an fp32)."""
    return float(torch.tensor(top_p - TOP_P_TOLERANCE, dtype=torch.float32))


NUCLEUS_SEARCH_K = 256
"""How many of the most probable tokens `apply_top_p` looks at before it falls back to a full sort: a language
model's 0.7-0.95 nucleus almost always lies inside them, and a top-k of 256 costs ~0.2 ms per 49k-token row on a
CPU where the full sort costs ~3.6 ms (more than a tenth of a 135M model's decoding step)."""


def nucleus_size(sorted_probs: torch.Tensor, limit: float) -> torch.Tensor:
    """How many leading (descending) probabilities the nucleus keeps: those whose mass before them is < `limit`
    (`top_p_limit(top_p)`), [..., 1]; 0 only when limit <= 0. Valid on any sorted prefix (e.g. a top-k) as long as
    the count stays below the prefix's length."""
    # exclusive prefix sums in float64: exact enough that only the probabilities' own rounding remains
    mass_before = torch.nn.functional.pad(torch.cumsum(sorted_probs.double(), dim=-1)[..., :-1], (1, 0))
    return (mass_before < limit).sum(dim=-1, keepdim=True)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask tokens whose strictly-more-probable mass reaches `top_p_limit(top_p)` (nucleus filtering, ties kept).

    Exact in every case: the k largest probabilities (`torch.topk`, sorted) are the first k of the full sort and
    their prefix sums are the same numbers, so whenever the nucleus closes inside them (the k-th token's mass
    before it reaches the limit) the cut-off is the one a full sort gives; otherwise it sorts everything.
    """
    if top_p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    limit = top_p_limit(top_p)
    k = min(NUCLEUS_SEARCH_K, probs.shape[-1])
    head = torch.topk(probs, k, dim=-1, sorted=True).values
    num_kept = nucleus_size(head, limit)
    if k < probs.shape[-1] and bool((num_kept >= k).any()):  # some nucleus is wider than the k searched
        head = torch.sort(probs, dim=-1, descending=True).values
        num_kept = nucleus_size(head, limit)
    threshold = torch.gather(head, -1, num_kept.clamp(min=1) - 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """fp32 probabilities after temperature, top-k and top-p (the distribution tokens are drawn from)."""
    x = logits.float()
    if params.temperature != 1.0:
        x = x / params.temperature
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return torch.softmax(x, dim=-1)


def sample_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index j with cumsum(w)[j-1] <= u*sum(w) < cumsum(w)[j], per row; weights >= 0, uniforms float64 in [0,1).

    Accumulates in float64 so the result does not depend on how the sum is blocked (kernel == reference).
    """
    cdf = torch.cumsum(weights.double(), dim=-1)
    target = uniforms.double().unsqueeze(-1) * cdf[..., -1:]
    idx = torch.searchsorted(cdf, target, right=True)
    return idx.squeeze(-1).clamp_(max=weights.shape[-1] - 1)


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pick one token per row from `logits` [..., V]; returns (tokens, probs it was drawn from or None if greedy)."""
    if not params.do_sample:
        return torch.argmax(logits, dim=-1), None
    probs = warp_probs(logits, params)
    gen_device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[:-1], dtype=torch.float64, device=gen_device, generator=generator)
    return sample_inverse_cdf(probs, u.to(probs.device)), probs
