"""Sampling exactness: speculative sampling reproduces the target's processed distribution (chi-square).

A tiny random target/draft pair with a 16-token vocabulary is sampled 20,000 times in one batched call
(rows advance independently); the joint distribution of the first 3 new tokens is compared with the exact
one, computed by enumerating all 16 x 16 continuations through the target. Known-bad samplers (residual
replaced by plain target sampling; greedy draft with softmax q) must fail the same test. The same holds with a
feature-conditioned draft (`FeatureDraft`: its q comes from the same `draft_sample`).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
from scipy.stats import chisquare

from soaes_specdec import decoding, proposers, verify
from soaes_specdec.decoding import SpeculativeDecoder
from soaes_specdec.draft import restrict_output_head
from soaes_specdec.feature_draft import FeatureDraft
from soaes_specdec.proposers import DraftSampler, LookupDraftMixture
from soaes_specdec.sampling import SamplingParams, warp_probs

VOCAB, SAMPLES, NEW = 16, 20_000, 3
PROMPT = torch.tensor([3, 7, 1, 12])


@pytest.fixture(scope="module")
def pair(qwen2_factory: Any) -> tuple[Any, Any]:
    # One head and width 16 keep 20,000-row batches cheap; init 0.3 gives spread-out but non-uniform distributions.
    target = qwen2_factory(11, layers=2, vocab=VOCAB, hidden=16, init=0.3, heads=1, kv_heads=1)
    draft = qwen2_factory(12, layers=1, vocab=VOCAB, hidden=16, init=0.3, heads=1, kv_heads=1)
    return target, draft


def exact_joint(target: Any, params: SamplingParams) -> torch.Tensor:
    """P(y1, y2, y3 | prompt) under the target's warped distributions, as a [V, V, V] tensor."""
    grid = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))
    ids = torch.cat([PROMPT.expand(grid.shape[0], -1), grid], dim=1)
    with torch.inference_mode():
        logits = target(ids).logits.float()
    n = PROMPT.numel()
    p1 = warp_probs(logits[0, n - 1], params)
    p2 = warp_probs(logits[:VOCAB * VOCAB:VOCAB, n], params)  # rows whose y1 = 0..V-1
    p3 = warp_probs(logits[:, n + 1], params).reshape(VOCAB, VOCAB, VOCAB)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi_square_p(samples: torch.Tensor, joint: torch.Tensor) -> float:
    """p-value of observed 3-token outcomes vs `joint`, pooling cells expected below 5 into one."""
    index = (samples[:, 0] * VOCAB + samples[:, 1]) * VOCAB + samples[:, 2]
    observed = torch.bincount(index, minlength=VOCAB ** 3).double()
    expected = joint.reshape(-1).double() * samples.shape[0]
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    assert float(observed[expected == 0].sum()) == 0, "sampled a token the warped target forbids"
    assert obs.numel() > 10, "distribution too peaked for a meaningful test"
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


def sample_speculative(target: Any, draft: Any, n: int, params: SamplingParams, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = SpeculativeDecoder(target, draft, n).generate(
        PROMPT.expand(SAMPLES, -1), NEW, do_sample=True, temperature=params.temperature, top_p=params.top_p,
        generator=g)
    assert min(out.sequence_lengths) == PROMPT.numel() + NEW
    return out.sequences[:, PROMPT.numel():]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.7])
@pytest.mark.parametrize("n", [1, 3, 9])
def test_speculative_sampling_matches_target_distribution(pair: tuple[Any, Any], n: int, top_p: float,
                                                          temperature: float) -> None:
    target, draft = pair
    params = SamplingParams(True, temperature, top_p)
    samples = sample_speculative(target, draft, n, params, seed=n * 100 + int(top_p * 10) + int(temperature * 3))
    assert chi_square_p(samples, exact_joint(target, params)) > 1e-3


def test_draft_differs_enough_for_the_test_to_bite(pair: tuple[Any, Any]) -> None:
    """Acceptance well below 1 means rejections (and thus the residual) matter in every config above."""
    target, draft = pair
    g = torch.Generator().manual_seed(0)
    out = SpeculativeDecoder(target, draft, 3).generate(PROMPT.expand(2000, -1), NEW, do_sample=True, generator=g)
    assert 0.1 < out.stats.acceptance_rate < 0.8


def _plain_target_residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p


def _greedy_draft_softmax_q(logits: torch.Tensor, params: SamplingParams,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.argmax(logits, dim=-1), torch.softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("bug", ["residual_is_target", "greedy_draft_softmax_q"])
@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_known_bad_samplers_fail_the_same_test(pair: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, bug: str,
                                               top_p: float) -> None:
    if bug == "residual_is_target":
        monkeypatch.setattr(verify, "residual_weights", _plain_target_residual)
    else:
        monkeypatch.setattr(proposers, "draft_sample", _greedy_draft_softmax_q)
    target, draft = pair
    params = SamplingParams(True, 1.0, top_p)
    samples = sample_speculative(target, draft, 3, params, seed=5)
    assert chi_square_p(samples, exact_joint(target, params)) < 1e-3


def test_autoregressive_sampling_matches_target_distribution(pair: tuple[Any, Any]) -> None:
    target, _ = pair
    params = SamplingParams(True, 0.7, 0.95)
    g = torch.Generator().manual_seed(1)
    out = decoding.autoregressive_generate(target, PROMPT.expand(SAMPLES, -1), NEW, do_sample=True,
                                           temperature=0.7, top_p=0.95, generator=g)
    assert chi_square_p(out.sequences[:, PROMPT.numel():], exact_joint(target, params)) > 1e-3



@pytest.fixture(scope="module")
def feature_draft(pair: tuple[Any, Any]) -> FeatureDraft:
    """The target's last layer reading fc = [I | 0.3 I] (token embedding plus the target's feature): ~45 % accepted."""
    draft = FeatureDraft.from_target(pair[0], layer=1)
    with torch.no_grad():
        draft.fc.weight.zero_()
        draft.fc.weight[:, :16] = torch.eye(16)
        draft.fc.weight[:, 16:] = 0.3 * torch.eye(16)
    return draft


@pytest.mark.parametrize(("n", "top_p", "temperature"), [(1, 1.0, 1.0), (3, 0.7, 1.0), (3, 0.95, 0.7), (9, 1.0, 0.7)])
def test_feature_draft_sampling_matches_target_distribution(pair: tuple[Any, Any], feature_draft: FeatureDraft,
                                                            n: int, top_p: float, temperature: float) -> None:
    target, _ = pair
    params = SamplingParams(True, temperature, top_p)
    samples = sample_speculative(target, feature_draft, n, params, seed=7 * n + int(top_p * 10))
    assert chi_square_p(samples, exact_joint(target, params)) > 1e-3


def test_feature_draft_differs_enough_for_the_test_to_bite(pair: tuple[Any, Any], feature_draft: FeatureDraft) -> None:
    g = torch.Generator().manual_seed(0)
    out = SpeculativeDecoder(pair[0], feature_draft, 3).generate(PROMPT.expand(2000, -1), NEW, do_sample=True,
                                                                 generator=g)
    assert 0.1 < out.stats.acceptance_rate < 0.8


def test_known_bad_sampler_fails_with_a_feature_draft(pair: tuple[Any, Any], feature_draft: FeatureDraft,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proposers, "draft_sample", _greedy_draft_softmax_q)
    params = SamplingParams(True, 1.0, 1.0)
    samples = sample_speculative(pair[0], feature_draft, 3, params, seed=5)
    assert chi_square_p(samples, exact_joint(pair[0], params)) < 1e-3


def sample_with_lookup(target: Any, draft: Any, params: SamplingParams, seed: int, n: int = 2, lookup: int = 2,
                       **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Drafts of 2, prompt lookup on 1-gram matches: with 16 tokens, rows mix lookup and draft blocks."""
    g = torch.Generator().manual_seed(seed)
    out = SpeculativeDecoder(target, draft, n, lookup_tokens=lookup, lookup_min_ngram=1, **kwargs).generate(
        PROMPT.expand(SAMPLES, -1), NEW, do_sample=True, temperature=params.temperature, top_p=params.top_p,
        generator=g)
    return out.sequences[:, PROMPT.numel():], out.stats


@pytest.mark.parametrize("kind", ["layer", "feature"])
@pytest.mark.parametrize(("top_p", "temperature"), [(1.0, 1.0), (0.7, 1.0)])
def test_sampling_with_prompt_lookup_matches_target_distribution(pair: tuple[Any, Any], feature_draft: FeatureDraft,
                                                                 kind: str, top_p: float, temperature: float) -> None:
    target, draft = pair
    params = SamplingParams(True, temperature, top_p)
    samples, stats = sample_with_lookup(target, draft if kind == "layer" else feature_draft, params, seed=13)
    assert 0.1 * stats.proposed < stats.lookup_proposed < 0.9 * stats.proposed  # both sources in play
    assert chi_square_p(samples, exact_joint(target, params)) > 1e-3


def test_lookup_with_a_wrong_q_fails_the_same_test(pair: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup proposal's q must be one-hot; claiming a uniform q biases the output and the test sees it."""
    monkeypatch.setattr(proposers, "_one_hot", lambda tokens, vocab: torch.full((*tokens.shape, vocab), 1.0 / vocab))
    params = SamplingParams(True, 1.0, 1.0)
    samples, _ = sample_with_lookup(*pair, params, seed=13)
    assert chi_square_p(samples, exact_joint(pair[0], params)) < 1e-3


@pytest.mark.parametrize("kind", ["layer", "feature"])
@pytest.mark.parametrize(("top_p", "mix"), [(1.0, 0.5), (0.7, 0.5), (0.7, 0.8)])
def test_sampling_with_lookup_mixed_into_the_draft_matches_target_distribution(
        pair: tuple[Any, Any], feature_draft: FeatureDraft, kind: str, top_p: float, mix: float) -> None:
    """`lookup_mix`: the first proposal drawn from m * onehot(lookup) + (1 - m) * q_draft, then the lookup's or the
    draft's continuation; rows with and without a lookup match share the batch."""
    target, draft = pair
    params = SamplingParams(True, 1.0, top_p)
    samples, stats = sample_with_lookup(target, draft if kind == "layer" else feature_draft, params, seed=17,
                                        lookup_mix=mix)
    assert 0.1 * stats.proposed < stats.lookup_proposed < 0.9 * stats.proposed
    assert chi_square_p(samples, exact_joint(target, params)) > 1e-3


def test_lookup_mix_verified_against_the_drafts_q_alone_fails(pair: tuple[Any, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Verifying the mixture's first proposal against the draft's q instead of the mixture biases the output."""
    original = LookupDraftMixture.mix_lookup_and_draft

    def wrong_q(self: Any, found: Any, counts: Any, use: Any, propose: Any, generator: Any) -> Any:
        captured: dict[str, Any] = {}

        def spy() -> Any:
            captured["out"] = propose()
            return captured["out"]

        merged, q, num_draft, take = original(self, found, counts, use, spy, generator)
        q[:, 0] = captured["out"][1][:, 0]
        return merged, q, num_draft, take

    monkeypatch.setattr(LookupDraftMixture, "mix_lookup_and_draft", wrong_q)
    params = SamplingParams(True, 1.0, 1.0)
    samples, _ = sample_with_lookup(*pair, params, seed=17, lookup_mix=0.5)
    assert chi_square_p(samples, exact_joint(pair[0], params)) < 1e-3


@pytest.mark.parametrize("kind", ["layer", "feature"])
@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sampling_with_lookup_extending_the_draft_matches_target_distribution(
        pair: tuple[Any, Any], feature_draft: FeatureDraft, kind: str, top_p: float) -> None:
    """`lookup_extend`: lookup tokens (one-hot q) after the draft's token, wherever text + draft repeats an n-gram."""
    target, draft = pair
    params = SamplingParams(True, 1.0, top_p)
    samples, stats = sample_with_lookup(target, draft if kind == "layer" else feature_draft, params, seed=19, n=1,
                                        lookup=3, lookup_extend=True)
    assert stats.acceptance_by_position[1] > 0  # extensions were proposed and accepted
    assert chi_square_p(samples, exact_joint(target, params)) > 1e-3



HEAD_IDS = [0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 14, 15]  # 12 of the 16 tokens: the target still emits the other 4


def _restricted(draft: Any) -> Any:
    """A copy of `draft` whose output head covers HEAD_IDS only (-inf logits elsewhere), as distilled drafts do."""
    model = copy.deepcopy(draft)
    restrict_output_head(model.lm if isinstance(model, FeatureDraft) else model, HEAD_IDS)
    return model


@pytest.mark.parametrize("kind", ["layer", "feature"])
@pytest.mark.parametrize(("n", "top_p"), [(1, 1.0), (3, 0.7)])
def test_restricted_head_draft_sampling_matches_target_distribution(pair: tuple[Any, Any], feature_draft: FeatureDraft,
                                                                    kind: str, n: int, top_p: float) -> None:
    """A draft with a restricted head is warped and sampled over its head's tokens only
    (`DraftSampler.sample_proposal`); its q is scattered back to the full vocabulary (0 elsewhere), so tokens outside
    the head come only from the residual."""
    target, draft = pair
    model = _restricted(draft if kind == "layer" else feature_draft)
    params = SamplingParams(True, 1.0, top_p)
    g = torch.Generator().manual_seed(23 + n)
    decoder = SpeculativeDecoder(target, model, n)
    assert decoder.draft_proposer.sampler.head_ids is not None
    out = decoder.generate(PROMPT.expand(SAMPLES, -1), NEW, do_sample=True, top_p=top_p, generator=g)
    samples = out.sequences[:, PROMPT.numel():]
    assert bool(torch.isin(samples, torch.tensor([3, 6, 10, 13])).any())  # tokens outside the head were emitted
    assert chi_square_p(samples, exact_joint(target, params)) > 1e-3


def test_restricted_head_q_left_on_the_subset_fails(pair: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Scattering the subset's q to the wrong vocabulary positions (the first 12 tokens) biases the output."""
    original = DraftSampler.sample_proposal

    def misplaced(self: Any, logits: Any, params: Any, generator: Any) -> Any:
        tokens, q = original(self, logits, params, generator)
        return tokens, torch.cat([q[..., self.head_ids], q.new_zeros(*q.shape[:-1], 4)], dim=-1)

    monkeypatch.setattr(DraftSampler, "sample_proposal", misplaced)
    params = SamplingParams(True, 1.0, 1.0)
    g = torch.Generator().manual_seed(29)
    out = SpeculativeDecoder(pair[0], _restricted(pair[1]), 3).generate(PROMPT.expand(SAMPLES, -1), NEW,
                                                                        do_sample=True, generator=g)
    assert chi_square_p(out.sequences[:, PROMPT.numel():], exact_joint(pair[0], params)) < 1e-3


@pytest.mark.parametrize(("kind", "schedule"), [("layer", (0, 2)), ("layer", (2, 0)), ("feature", (0, 2))])
def test_sampling_with_the_block_size_changing_between_steps_matches_target_distribution(
        pair: tuple[Any, Any], feature_draft: FeatureDraft, monkeypatch: pytest.MonkeyPatch, kind: str,
        schedule: tuple[int, ...]) -> None:
    """The decoder choosing n per step (here a forced schedule, 0 = a plain step): each step is exact given the tokens
    before it, so the output distribution is the target's whatever the schedule."""
    steps = itertools.count()
    monkeypatch.setattr(SpeculativeDecoder, "_choose_block_size",
                        lambda self, rows: schedule[next(steps) % len(schedule)])
    target, draft = pair
    params = SamplingParams(True, 1.0, 0.7)
    samples = sample_speculative(target, draft if kind == "layer" else feature_draft, 2, params,
                                 seed=31 + sum(schedule) + len(kind))
    assert next(steps) >= 2  # the schedule was followed
    assert chi_square_p(samples, exact_joint(target, params)) > 1e-3
