"""Offline acceptance estimator: α = Σ min(p_T, p_D) matches simulated speculative sampling, and the
accepted-length formulas agree with each other."""

from __future__ import annotations

import math

import pytest
import torch

from soaes_distill.acceptance import (
    AcceptanceAccumulator,
    acceptance_probabilities,
    block_walk,
    positional_accepted_length,
)
from soaes_distill.losses import topk_logits
from soaes_specdec.cost_model import expected_accepted_length


def test_alpha_matches_monte_carlo_speculative_sampling() -> None:
    g = torch.Generator().manual_seed(0)
    t, d = torch.randn(20, generator=g) * 2, torch.randn(20, generator=g) * 2
    alpha = acceptance_probabilities(t, d).item()
    p, q = torch.softmax(t, -1), torch.softmax(d, -1)
    n = 200_000
    x = torch.multinomial(q, n, replacement=True, generator=g)  # the draft proposes x ~ q
    accept = torch.rand(n, generator=g) < torch.clamp(p[x] / q[x], max=1.0)  # the target accepts w.p. min(1, p/q)
    sigma = math.sqrt(alpha * (1 - alpha) / n)
    assert abs(accept.float().mean().item() - alpha) < 5 * sigma


def test_top_p_and_greedy() -> None:
    g = torch.Generator().manual_seed(1)
    t, d = torch.randn(4, 6, 30, generator=g) * 3, torch.randn(4, 6, 30, generator=g) * 3
    greedy = acceptance_probabilities(t, d, greedy=True)
    assert torch.equal(greedy, (t.argmax(-1) == d.argmax(-1)).float())
    dense = acceptance_probabilities(t, d, top_p=0.7)
    same = acceptance_probabilities(t, t, top_p=0.7)
    torch.testing.assert_close(same, torch.ones_like(same))
    full = acceptance_probabilities(topk_logits(t, 30, 1.0), d, top_p=0.7)
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-6)
    low = acceptance_probabilities(topk_logits(t, 5, 1.0), d)  # top-k sum: a lower bound of the dense α
    assert (low <= acceptance_probabilities(t, d) + 1e-6).all()


def test_accepted_length_formulas() -> None:
    assert expected_accepted_length(1.0, 3) == 4.0
    assert expected_accepted_length(0.0, 3) == 1.0
    assert expected_accepted_length(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    pos = positional_accepted_length(torch.full((100,), 0.5), 3)
    assert pos[0].item() == pytest.approx(expected_accepted_length(0.5, 3))
    assert pos[-1].item() == pytest.approx(1.5)  # truncated at the sequence end


def test_accumulator_respects_labels() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[-100, 1, 2, -100, -100], [-100, -100, -100, -100, -100]])
    acc = AcceptanceAccumulator(top_p=0.7)
    acc.add(t, t.clone(), labels)
    res = acc.result()
    assert res.positions == 2 and res.alpha_greedy == 1.0 and res.alpha_sampled == pytest.approx(1.0)
    # one block from token 1 (token 0 is the target's prefill): accepts token 2, then the text ends
    assert res.accepted_length["greedy_n3"] == pytest.approx(2.0)
    assert res.predicted_acceptance_rate["greedy_n3"] == pytest.approx(1 / 3)
    assert "acceptance_rate_sampled_n9" in res.as_metrics()


def test_block_walk_long_text_matches_iid_formula_and_weights_hard_regions() -> None:
    accepted, proposed, calls = block_walk(torch.full((20000,), 0.5), 3)
    assert accepted / proposed == pytest.approx((expected_accepted_length(0.5, 3) - 1) / 3, rel=1e-3)
    assert (accepted + calls) / calls == pytest.approx(expected_accepted_length(0.5, 3), rel=1e-3)
    # half easy (α=1), half hard (α=0): the position mean is 0.5, but hard tokens get one block each
    alphas = torch.cat([torch.ones(400), torch.zeros(400)])
    accepted, proposed, _ = block_walk(alphas, 3)
    assert accepted / proposed < 0.5 * 0.5


def test_block_walk_reproduces_greedy_decoder_counts(tiny_qwen2) -> None:
    """On the target's own greedy text, the greedy walk equals SpeculativeDecoder's measured counts."""
    import copy

    from soaes_specdec.decoding import SpeculativeDecoder, autoregressive_generate

    draft = copy.deepcopy(tiny_qwen2)  # the target plus noise: agrees on some tokens, not all
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.1 * param.std())
    n, new = 3, 40
    mixed = 0
    for seed in range(3):
        prompt = torch.randint(0, tiny_qwen2.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(seed))
        text = autoregressive_generate(tiny_qwen2, prompt, max_new_tokens=new + n + 1).sequences
        with torch.no_grad():
            t_logits = tiny_qwen2(input_ids=text).logits[0]
            d_logits = draft(input_ids=text).logits[0]
        p = prompt.shape[1]
        # alphas[t]: the draft predicting generated token t agrees with the target's argmax there
        alphas = (t_logits[p - 1:-1].argmax(-1) == d_logits[p - 1:-1].argmax(-1)).float()
        accepted, proposed, calls = block_walk(alphas, n, limit=new)
        stats = SpeculativeDecoder(tiny_qwen2, draft, num_speculative_tokens=n).generate(
            prompt, max_new_tokens=new).stats
        assert (stats.accepted, stats.proposed, stats.target_calls - 1) == \
            (round(accepted), round(proposed), round(calls)), seed  # target_calls includes the prefill
        mixed += 0 < stats.accepted < stats.proposed
    assert mixed  # at least one text mixes accepted and rejected drafts
