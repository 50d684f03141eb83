"""Warpers agree with transformers' logits processors, keep ties, and inverse-CDF sampling is exact."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from soaes_core.errors import InvalidArgumentError
from soaes_specdec.sampling import (
    SamplingParams,
    apply_top_k,
    apply_top_p,
    sample_inverse_cdf,
    sample_next,
    top_p_limit,
    warp_probs,
)
from soaes_specdec.testing import TOP_P_BOUNDARY_CASES


def hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    x = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return torch.softmax(x, dim=-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.7), (1.3, 20, 1.0), (0.9, 50, 0.95)])
def test_warp_probs_matches_transformers(temperature: float, top_k: int, top_p: float) -> None:
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0)) * 3  # continuous: no ties
    ours = warp_probs(logits, SamplingParams(True, temperature, top_p, top_k))
    assert torch.equal(ours > 0, hf_probs(logits, temperature, top_k, top_p) > 0)
    torch.testing.assert_close(ours, hf_probs(logits, temperature, top_k, top_p), rtol=1e-5, atol=1e-7)


def test_ties_at_the_cut_off_are_kept() -> None:
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(apply_top_k(logits, 2)).tolist() == [[True, True, True, False]]
    # p = [.757, .102, .102, .038]: mass strictly above each tied token is .757 < .8, so both stay.
    assert torch.isfinite(apply_top_p(logits, 0.8)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(apply_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("top_p,probs,kept", TOP_P_BOUNDARY_CASES, ids=[str(c[:2]) for c in TOP_P_BOUNDARY_CASES])
def test_top_p_boundary_cases(top_p: float, probs: list[float], kept: list[int]) -> None:
    """A prefix whose mass equals top_p exactly completes the nucleus, whatever the fp32 rounding (issue 15)."""
    logits = torch.log(torch.tensor([probs]))
    assert torch.isfinite(apply_top_p(logits, top_p)).int().tolist() == [kept]
    if len(set(probs)) == len(probs) or top_p == 0.8:  # no tie across the cut-off: transformers agrees
        assert torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone())).int().tolist() == [kept]


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (1.3, 40)])
def test_top_p_exact_sum_ties_on_random_distributions(temperature: float, top_k: int) -> None:
    """top_p set to the exact float64 mass of the j most probable tokens keeps j; a hair (3e-6) more keeps j+1."""
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(3)) * 2
    params = SamplingParams(True, temperature, 1.0, top_k)
    probs = warp_probs(logits, params)  # after temperature and top-k, before top-p
    ranked = torch.sort(probs, dim=-1, descending=True).values.double()
    for row in range(logits.shape[0]):
        for j in (1, 2, 5, 17):
            tie = float(ranked[row, :j].sum())
            for top_p, expected in ((tie, j), (tie - 3e-6, j), (tie + 3e-6, j + 1)):
                warped = warp_probs(logits[row], SamplingParams(True, temperature, top_p, top_k))
                assert int((warped > 0).sum()) == expected, (row, j, top_p)


def _full_sort_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus rule written with one full sort (the definition `apply_top_p` must reproduce bit for bit)."""
    probs = torch.softmax(logits, dim=-1)
    ordered = torch.sort(probs, dim=-1, descending=True).values
    mass_before = torch.nn.functional.pad(torch.cumsum(ordered.double(), dim=-1)[..., :-1], (1, 0))
    kept = (mass_before < top_p_limit(top_p)).sum(dim=-1, keepdim=True).clamp(min=1)
    return logits.masked_fill(probs < torch.gather(ordered, -1, kept - 1), float("-inf"))


@pytest.mark.parametrize("search_k", [2, 16, 256])
def test_top_p_top_k_search_equals_a_full_sort(search_k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The top-k search and its full-sort fallback give the full sort's mask exactly: peaked rows (nucleus inside
    the k searched), flat rows (wider: fallback), ties, and batches mixing both."""
    import soaes_specdec.sampling as sampling

    monkeypatch.setattr(sampling, "NUCLEUS_SEARCH_K", search_k)
    g = torch.Generator().manual_seed(1)
    for scale in (0.0, 0.5, 2.0, 8.0):
        logits = torch.randn(6, 5000, generator=g) * scale
        logits[1] = torch.round(logits[1])  # many ties
        logits[2] = 0.01 * logits[2]  # nearly flat: a nucleus of thousands of tokens
        for top_p in (0.05, 0.5, 0.7, 0.95, 0.999):
            assert torch.equal(apply_top_p(logits, top_p), _full_sort_top_p(logits, top_p)), (scale, top_p)


def test_top_p_limit_is_fp32_and_below_top_p() -> None:
    for top_p in (0.1, 0.7, 0.8, 0.95, 0.999):
        limit = top_p_limit(top_p)
        assert limit == float(torch.tensor(limit, dtype=torch.float32)) and top_p - 2e-6 < limit < top_p


def test_inverse_cdf_picks_the_right_bucket() -> None:
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0]]).expand(4, -1)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.999999], dtype=torch.float64)
    assert sample_inverse_cdf(weights, u).tolist() == [1, 1, 3, 3]


def test_sample_next_frequencies() -> None:
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(40_000, -1)
    tokens, probs = sample_next(logits, SamplingParams(True), torch.Generator().manual_seed(0))
    assert probs is not None
    freq = torch.bincount(tokens, minlength=4).double() / 40_000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.01, rtol=0)
    greedy, none = sample_next(logits[:2], SamplingParams(False))
    assert greedy.tolist() == [3, 3] and none is None


@pytest.mark.parametrize("kwargs,field", [
    ({"do_sample": True, "temperature": 0.0}, "temperature"),
    ({"do_sample": True, "temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_k": -1}, "top_k")])
def test_sampling_params_validate(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams(**kwargs)
