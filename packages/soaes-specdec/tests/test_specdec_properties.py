"""Property-based tests (hypothesis): the warpers keep a well-formed support and renormalise on it, and
verification emits an accepted prefix of the draft followed by one token from the right support.

The exact top-p boundary rule (ties at top_p) has its own example tests; these check what must hold whatever
that rule is: the support is a top set by probability, its mass reaches top_p (up to rounding), dropping its
least probable tokens would fall short, and the kept probabilities are the originals renormalised."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soaes_specdec.sampling import SamplingParams, apply_top_k, apply_top_p, sample_inverse_cdf, warp_probs
from soaes_specdec.verify import verify_greedy, verify_sampling

FAST = settings(max_examples=80, deadline=None)
TOL = 1e-5  # fp32 softmax rounding on vocabularies this small


@st.composite
def logits_rows(draw: Any, min_vocab: int = 1, max_vocab: int = 24) -> torch.Tensor:
    """One row of logits; a small value grid makes exact ties (the hard cases) frequent."""
    v = draw(st.integers(min_value=min_vocab, max_value=max_vocab))
    grid = st.sampled_from([-30.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0, 8.0])
    values = draw(st.lists(st.one_of(grid, st.floats(-20, 20, width=32)), min_size=v, max_size=v))
    return torch.tensor(values, dtype=torch.float32)


def _is_top_set(kept: torch.Tensor, scores: torch.Tensor) -> bool:
    """Every kept token scores at least as high as every dropped one."""
    if kept.all() or not kept.any():
        return bool(kept.any())
    return bool(scores[kept].min() >= scores[~kept].max())


@FAST
@given(logits_rows(), st.integers(min_value=0, max_value=30))
def test_top_k_support(logits: torch.Tensor, k: int) -> None:
    kept = torch.isfinite(apply_top_k(logits, k))
    assert _is_top_set(kept, logits)
    if k == 0 or k >= logits.numel():
        assert kept.all()
        return
    # at least k kept; a token beyond the k-th is kept only when tied with the k-th largest logit
    assert int(kept.sum()) >= k
    kth = torch.topk(logits, k).values[-1]
    assert bool((logits[kept] >= kth).all()) and bool((logits[~kept] < kth).all())


@FAST
@given(logits_rows(), st.floats(min_value=0.01, max_value=1.0))
def test_top_p_support_is_a_minimal_top_set_reaching_top_p(logits: torch.Tensor, top_p: float) -> None:
    probs = torch.softmax(logits, -1).double()
    kept = torch.isfinite(apply_top_p(logits, top_p))
    assert kept.any() and _is_top_set(kept, probs)
    if top_p >= 1.0:
        assert kept.all()
        return
    assert float(probs[kept].sum()) >= top_p - TOL  # the nucleus reaches top_p
    # minimal: the tokens strictly more probable than the least probable kept one fall short of top_p
    above = probs > probs[kept].min()
    assert float(probs[above].sum()) < top_p + TOL


@FAST
@given(logits_rows(), st.floats(min_value=0.05, max_value=4.0), st.integers(min_value=0, max_value=8),
       st.floats(min_value=0.05, max_value=1.0))
def test_warp_probs_renormalise_on_the_support(logits: torch.Tensor, temperature: float, top_k: int,
                                               top_p: float) -> None:
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    warped = warp_probs(logits.unsqueeze(0), params)[0].double()
    assert bool((warped >= 0).all()) and abs(float(warped.sum()) - 1.0) < TOL
    base = torch.softmax(logits.double() / temperature, -1)
    support = warped > 0
    assert support.any() and _is_top_set(support, logits)  # warpers only ever cut the tail
    # on its support the warped distribution is the tempered one renormalised (warpers never reshape)
    expected = base * support / (base * support).sum()
    assert torch.allclose(warped, expected, atol=TOL, rtol=1e-4)
    # a warper that is off changes nothing
    plain = warp_probs(logits.unsqueeze(0), SamplingParams(do_sample=True, temperature=temperature))[0].double()
    assert torch.allclose(plain, base, atol=TOL)


@FAST
@given(st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=16).filter(lambda w: sum(w) > 0),
       st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_inverse_cdf_lands_on_positive_weight(weights: list[float], u: float) -> None:
    w = torch.tensor(weights, dtype=torch.float32)
    j = int(sample_inverse_cdf(w.unsqueeze(0), torch.tensor([u], dtype=torch.float64))[0])
    assert 0 <= j < len(weights) and weights[j] > 0
    cdf = torch.cumsum(w.double(), 0)
    assert float(cdf[j - 1] if j else 0.0) <= u * float(cdf[-1]) < float(cdf[j]) or j == len(weights) - 1


# ---- verification -------------------------------------------------------------------------------------------

@st.composite
def greedy_blocks(draw: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = draw(st.integers(1, 4))
    n = draw(st.integers(0, 6))
    v = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, n + 1, v, generator=g)
    argmax = target.argmax(-1)
    # drafts agree with the target's argmax on a random prefix, then go random (maybe agreeing by chance)
    agree = torch.tensor([draw(st.integers(0, n)) for _ in range(batch)])
    draft = torch.randint(0, v, (batch, n), generator=g)
    for b in range(batch):
        draft[b, :agree[b]] = argmax[b, :agree[b]]
    num_draft = torch.tensor([draw(st.integers(0, n)) for _ in range(batch)])
    return target, draft, num_draft


@FAST
@given(greedy_blocks())
def test_greedy_verification_layout(block: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    target, draft, num_draft = block
    argmax = target.argmax(-1)
    acc, nxt = verify_greedy(target, draft, num_draft)
    for b in range(draft.shape[0]):
        a, m = int(acc[b]), int(num_draft[b])
        assert 0 <= a <= m
        assert torch.equal(draft[b, :a], argmax[b, :a])  # the accepted prefix is what the target would emit
        if a < m:
            assert draft[b, a] != argmax[b, a]  # stopped at the first disagreement
        assert int(nxt[b]) == int(argmax[b, a])  # correction or bonus token: the target's own choice there
        # the emitted tokens equal plain greedy decoding of the target on this block
        emitted = [*draft[b, :a].tolist(), int(nxt[b])]
        assert emitted == argmax[b, :a + 1].tolist()


@st.composite
def sampling_blocks(draw: Any) -> dict[str, Any]:
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(1, 5))
    v = draw(st.integers(2, 10))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sparse = draw(st.booleans())  # warped distributions have zeros (top-k/top-p cut tokens)

    def dist(*shape: int) -> torch.Tensor:
        logits = torch.randn(*shape, v, generator=g) * 2
        if sparse:
            logits = logits.masked_fill(torch.rand(*shape, v, generator=g) < 0.4, float("-inf"))
            logits[..., 0] = logits[..., 0].nan_to_num(neginf=0.0)  # at least one token survives
        return torch.softmax(logits, -1)

    q = dist(batch, n)
    p = q.new_zeros(batch, n + 1, v)
    same = draw(st.booleans())  # p == q: every proposal must be accepted
    p[:, :n] = q if same else dist(batch, n)
    p[:, n] = dist(batch)
    draft = sample_inverse_cdf(q, torch.rand(batch, n, dtype=torch.float64, generator=g))
    return {"p": p, "q": q, "draft": draft, "same": same,
            "u_accept": torch.rand(batch, n, dtype=torch.float64, generator=g),
            "u_sample": torch.rand(batch, dtype=torch.float64, generator=g),
            "num_draft": torch.tensor([draw(st.integers(0, n)) for _ in range(batch)])}


@FAST
@given(sampling_blocks())
def test_sampling_verification_layout_and_support(block: dict[str, Any]) -> None:
    p, q, draft, num_draft = block["p"], block["q"], block["draft"], block["num_draft"]
    acc, nxt = verify_sampling(p, q, draft, block["u_accept"], block["u_sample"], num_draft)
    for b in range(draft.shape[0]):
        a, m, tok = int(acc[b]), int(num_draft[b]), int(nxt[b])
        assert 0 <= a <= m
        for i in range(a):  # each accepted token passed its test u * q(x) < p(x), so p(x) > 0
            x = int(draft[b, i])
            assert float(block["u_accept"][b, i]) * float(q[b, i, x]) < float(p[b, i, x])
        if a < m:  # the first rejected token failed its test; the replacement comes from max(p - q, 0)
            x = int(draft[b, a])
            assert not float(block["u_accept"][b, a]) * float(q[b, a, x]) < float(p[b, a, x])
            residual = (p[b, a] - q[b, a]).clamp(min=0)
            assert residual[tok] > 0 or (residual.sum() <= 0 and p[b, a, tok] > 0)
        else:  # all real proposals accepted: the bonus token is drawn from p at the next position
            assert p[b, a, tok] > 0
        if block["same"]:
            assert a == m  # identical distributions accept every proposal
