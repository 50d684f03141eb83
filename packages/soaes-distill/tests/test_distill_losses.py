"""`distillation_loss` against float64 reference implementations written independently with numpy/scipy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, rel_entr, softmax

from soaes_core.errors import InvalidArgumentError
from soaes_distill.losses import (
    DIVERGENCES,
    TopKLogits,
    distillation_loss,
    distillation_loss_terms,
    divergence_per_position,
    sample_tail_ids,
    topk_logits,
)

V = 37


def _ref_div(p: np.ndarray, q: np.ndarray, divergence: str, beta: float = 0.5) -> float:
    if divergence == "forward_kl":
        return float(rel_entr(p, q).sum())
    if divergence == "reverse_kl":
        return float(rel_entr(q, p).sum())
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return float(beta * rel_entr(p, m).sum() + (1 - beta) * rel_entr(q, m).sum())
    if divergence == "total_variation":
        return float(0.5 * np.abs(p - q).sum())
    return float(1.0 - np.minimum(p, q).sum())


def _reference(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, tau: float,
               divergence: str, k: int | None = None, tau2: bool = False) -> float:
    """Eq. 2 in float64, position by position (labels shifted, HF convention); top-k via 1 − Σ buckets."""
    s = student.double().numpy()
    t = teacher.double().numpy()
    lab = labels.numpy()
    kds, ces = [], []
    for b in range(s.shape[0]):
        for i in range(s.shape[1] - 1):
            y = lab[b, i + 1]
            if y == -100:
                continue
            p = softmax(t[b, i] / tau)
            q = softmax(s[b, i] / tau)
            if k is not None and k < V:
                idx = np.argsort(-t[b, i], kind="stable")[:k]
                p = np.append(p[idx], max(1.0 - p[idx].sum(), 1e-12))
                q = np.append(q[idx], 1.0 - q[idx].sum())
            kds.append(_ref_div(p, q, divergence))
            ces.append(-log_softmax(s[b, i])[y])
    kd = float(np.mean(kds)) * (tau * tau if tau2 else 1.0)
    return alpha * kd + (1 - alpha) * float(np.mean(ces))


def _inputs(seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(2, 9, V, generator=g) * 3).to(dtype)
    teacher = (torch.randn(2, 9, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (2, 9), generator=g)
    labels[torch.rand(2, 9, generator=g) < 0.3] = -100
    labels[0, 1] = 5  # at least one counted position
    return student, teacher, labels


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0])
def test_dense_matches_float64_reference(divergence: str, tau: float) -> None:
    for seed, alpha in ((0, 0.5), (1, 1.0), (2, 0.2)):
        student, teacher, labels = _inputs(seed)
        got = distillation_loss(student, teacher, labels, alpha=alpha, temperature=tau, divergence=divergence,
                                chunk_size=4)
        want = _reference(student, teacher, labels, alpha, tau, divergence)
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0, 5.0])
def test_topk_matches_float64_reference(divergence: str, tau: float) -> None:
    student, teacher, labels = _inputs(3)
    for k in (1, 5, 20):
        got = distillation_loss(student, topk_logits(teacher, k, tau), labels, alpha=0.7, temperature=tau,
                                divergence=divergence, chunk_size=5)
        want = _reference(student, teacher, labels, 0.7, tau, divergence, k=k)
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_with_k_equal_vocab_equals_dense(divergence: str) -> None:
    student, teacher, labels = _inputs(4)
    dense = distillation_loss(student, teacher, labels, temperature=2.0, divergence=divergence)
    full = distillation_loss(student, topk_logits(teacher, V, 2.0), labels, temperature=2.0, divergence=divergence)
    assert full.item() == pytest.approx(dense.item(), rel=1e-6, abs=1e-7)


def test_gradients_match_float64_autograd_reference() -> None:
    student, teacher, labels = _inputs(5)
    for tau2 in (False, True):
        s1 = student.clone().requires_grad_(True)
        distillation_loss(student_logits=s1, teacher=topk_logits(teacher, 8, 2.0), labels=labels,
                          chunk_size=3, scale_by_temperature_squared=tau2).backward()
        s2 = student.double().clone().requires_grad_(True)
        mask = labels[:, 1:] != -100
        log_q = torch.log_softmax(s2[:, :-1] / 2.0, -1)[mask]
        idx = torch.topk(teacher[:, :-1][mask], 8, -1).indices
        p = torch.softmax(teacher.double()[:, :-1][mask] / 2.0, -1)
        p_b = torch.cat([p.gather(-1, idx), (1 - p.gather(-1, idx).sum(-1, keepdim=True))], -1)
        q_top = log_q.exp().gather(-1, idx)
        q_b = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
        kd = (p_b * (p_b.log() - q_b.log())).sum(-1).mean() * (4.0 if tau2 else 1.0)
        ce = torch.nn.functional.cross_entropy(s2[:, :-1][mask], labels[:, 1:][mask])
        (0.5 * kd + 0.5 * ce).backward()
        torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-7)


def test_tau_squared_scaling_and_terms() -> None:
    student, teacher, labels = _inputs(6)
    plain = distillation_loss_terms(student, teacher, labels, alpha=0.5, temperature=2.0)
    scaled = distillation_loss_terms(student, teacher, labels, alpha=0.5, temperature=2.0,
                                     scale_by_temperature_squared=True)
    assert scaled.kd.item() == pytest.approx(4 * plain.kd.item(), rel=1e-6)
    assert plain.loss.item() == pytest.approx(0.5 * plain.kd.item() + 0.5 * plain.ce.item(), rel=1e-6)
    assert plain.num_positions == int((labels[:, 1:] != -100).sum())


def test_bf16_is_stable_and_close() -> None:
    student, teacher, labels = _inputs(7)
    student = student * 20  # large logits: naive exp would overflow
    ref = _reference(student, teacher, labels, 0.5, 2.0, "forward_kl")
    got = distillation_loss(student.bfloat16(), teacher.bfloat16(), labels)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref, rel=2e-2)


def test_all_ignored_gives_zero_with_grad() -> None:
    student, teacher, _ = _inputs(8)
    s = student.requires_grad_(True)
    loss = distillation_loss(s, teacher, torch.full((2, 9), -100))
    loss.backward()
    assert loss.item() == 0.0 and s.grad is not None


def test_unshifted_labels() -> None:
    student, teacher, labels = _inputs(9)
    a = distillation_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:], shift_labels=False)
    b = distillation_loss(student, teacher, labels)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_bad_inputs_raise_invalid_argument() -> None:
    student, teacher, labels = _inputs(10)
    with pytest.raises(InvalidArgumentError, match="vocabulary mismatch"):
        distillation_loss(student, teacher[..., :-1], labels)
    with pytest.raises(InvalidArgumentError, match="vocabulary mismatch"):
        distillation_loss(student, TopKLogits(teacher[..., :4], torch.zeros(2, 9, 4, dtype=torch.long),
                                              torch.zeros(2, 9), 2.0, vocab_size=V + 1), labels)
    with pytest.raises(InvalidArgumentError, match="alpha"):
        distillation_loss(student, teacher, labels, alpha=1.5)
    with pytest.raises(InvalidArgumentError, match="alpha"):
        distillation_loss(student, teacher, labels, alpha=-0.1)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        distillation_loss(student, teacher, labels, temperature=0.0)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        distillation_loss(student, teacher, labels, temperature=-1.0)
    with pytest.raises(InvalidArgumentError, match="top-k"):
        topk_logits(teacher, V + 1)
    big = TopKLogits(torch.zeros(2, 9, V + 1), torch.zeros(2, 9, V + 1, dtype=torch.long), torch.zeros(2, 9), 2.0)
    with pytest.raises(InvalidArgumentError, match="exceeds"):
        distillation_loss(student, big, labels)
    with pytest.raises(InvalidArgumentError, match="divergence"):
        distillation_loss(student, teacher, labels, divergence="kl")
    with pytest.raises(InvalidArgumentError, match=r"temperature 1\.0"):
        distillation_loss(student, topk_logits(teacher, 4, 1.0), labels, temperature=2.0)


# ---- top-k + sampled tail: unbiased in value and gradient ----------------------------------------------------

SV = 50  # small vocabulary of the sampled-tail tests


def _sampled_inputs(seed: int, positions: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(positions, SV, generator=g, dtype=torch.float64) * 2,
            torch.randn(positions, SV, generator=g, dtype=torch.float64) * 3)


def _dense_reference(student: torch.Tensor, teacher: torch.Tensor, tau: float, divergence: str) -> np.ndarray:
    """Per-position float64 divergence of the full distributions (scipy)."""
    s, t = student.detach().double().numpy(), teacher.double().numpy()
    return np.array([_ref_div(softmax(t[i] / tau), softmax(s[i] / tau), divergence) for i in range(len(s))])


def _tail_density(teacher: torch.Tensor, idx: torch.Tensor, tau_s: float) -> np.ndarray:
    """Float64 probability of each token under the teacher at τ_s restricted to the tail (0 on the top-k)."""
    p = softmax(teacher.double().numpy() / tau_s, axis=-1)
    np.put_along_axis(p, idx.numpy(), 0.0, axis=-1)
    return p / p.sum(-1, keepdims=True)


def _every_tail_token(student: torch.Tensor, teacher: torch.Tensor, k: int, s: int, tau: float,
                      tau_s: float) -> tuple[torch.Tensor, TopKLogits, torch.Tensor]:
    """Expanded (P, V, ·) inputs whose (p, x) entry has all s tail samples equal to token x (x in the top-k too:
    those entries get weight 0), so Σ_x r(x)·estimate(p, x) is the exact expectation of the estimator."""
    P = teacher.shape[0]
    values, idx = torch.topk(teacher, k, -1)
    x = torch.arange(SV).repeat(P, 1)  # (P, V)
    tail_ids = x[..., None].expand(P, SV, s)
    topk = TopKLogits(values[:, None].expand(P, SV, k), idx[:, None].expand(P, SV, k),
                      torch.logsumexp(teacher / tau, -1)[:, None].expand(P, SV), tau, SV,
                      tail_indices=tail_ids, tail_values=teacher.gather(-1, x)[..., None].expand(P, SV, s),
                      tail_logsumexp=torch.logsumexp(teacher / tau_s, -1)[:, None].expand(P, SV),
                      tail_temperature=tau_s)
    return student[:, None].expand(P, SV, SV), topk, idx


TAU_PAIRS = [(1.0, 1.0), (2.0, 2.0), (5.0, 5.0), (1.0, 2.0), (2.0, 1.0), (5.0, 2.0)]  # (loss τ, sampling τ_s)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("tau", "tau_s"), TAU_PAIRS)
def test_sampled_tail_expectation_is_the_dense_divergence(divergence: str, tau: float, tau_s: float) -> None:
    """Exact expectation over the sampling distribution (enumerated) equals the float64 dense divergence."""
    student, teacher = _sampled_inputs(11)
    for k, s in ((1, 1), (5, 3), (20, 2)):
        big_s, topk, idx = _every_tail_token(student, teacher, k, s, tau, tau_s)
        est = divergence_per_position(big_s, topk, tau, divergence).double().numpy()  # (P, V)
        expectation = (est * _tail_density(teacher, idx, tau_s)).sum(-1)
        # fp32 math: the tail mass 1 − Σ top-k (0.3 % at k = 20) carries ~1e-7 absolute rounding, hence rtol
        np.testing.assert_allclose(expectation, _dense_reference(student, teacher, tau, divergence),
                                   rtol=1e-5 if k < 20 else 2e-4, atol=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("tau", "tau_s"), [(1.0, 2.0), (2.0, 2.0), (5.0, 1.0)])
def test_sampled_tail_gradient_is_unbiased(divergence: str, tau: float, tau_s: float) -> None:
    """d/dz_D of the exact expectation equals the float64 autograd gradient of the dense divergence."""
    student, teacher = _sampled_inputs(12)
    s1 = student.float().clone().requires_grad_(True)
    big_s, topk, idx = _every_tail_token(s1, teacher.float(), 5, 4, tau, tau_s)
    est = divergence_per_position(big_s, topk, tau, divergence)
    weights = torch.from_numpy(_tail_density(teacher, idx, tau_s)).float()
    (est * weights).sum().backward()
    s2 = student.clone().requires_grad_(True)
    log_p = torch.log_softmax(teacher / tau, -1)
    log_q = torch.log_softmax(s2 / tau, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        dense = (p * (log_p - log_q)).sum()
    elif divergence == "reverse_kl":
        dense = (q * (log_q - log_p)).sum()
    elif divergence == "jsd":
        m = 0.5 * (p + q)
        dense = 0.5 * (p * (log_p - m.log())).sum() + 0.5 * (q * (log_q - m.log())).sum()
    elif divergence == "total_variation":
        dense = 0.5 * (p - q).abs().sum()
    else:
        dense = 1 - torch.minimum(p, q).sum()
    dense.backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("tau", "tau_s"), [(1.0, 2.0), (2.0, 2.0), (5.0, 5.0)])
def test_sampled_tail_average_over_draws_converges(divergence: str, tau: float, tau_s: float) -> None:
    """Averaged over many independent draws of `topk_logits(..., tail_samples=s)` the estimate is the dense
    divergence within 5 standard errors (fixed generator: deterministic)."""
    student, teacher = _sampled_inputs(13, positions=4)
    draws = 4000
    g = torch.Generator().manual_seed(0)
    rep_t, rep_s = teacher.float().repeat(draws, 1, 1), student.float().repeat(draws, 1, 1)  # (R, P, V)
    topk = topk_logits(rep_t, 5, tau, tail_samples=4, tail_temperature=tau_s, generator=g)
    est = divergence_per_position(rep_s, topk, tau, divergence).double().numpy()  # (R, P)
    mean, se = est.mean(0), est.std(0) / np.sqrt(draws)
    dense = _dense_reference(student, teacher, tau, divergence)
    assert np.all(np.abs(mean - dense) <= 5 * se + 1e-5), (mean, dense, se)
    # the chunked, checkpointed loss gives the same numbers and gradient as the per-position function
    labels = torch.zeros(draws, 4, dtype=torch.long)
    a = rep_s.clone().requires_grad_(True)
    loss = distillation_loss(a, topk, labels, alpha=1.0, temperature=tau, divergence=divergence,
                             shift_labels=False, chunk_size=333)
    loss.backward()
    b = rep_s.clone().requires_grad_(True)
    per = divergence_per_position(b, topk, tau, divergence)
    per.mean().backward()
    assert loss.item() == pytest.approx(per.mean().item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-9)


def test_sample_tail_ids_follow_the_tail_distribution() -> None:
    _, teacher = _sampled_inputs(14, positions=2)
    idx = torch.topk(teacher, 6, -1).indices
    n = 100_000
    ids = sample_tail_ids(teacher, idx, n, 2.0, torch.Generator().manual_seed(3))
    assert ids.shape == (2, n) and ids.dtype == torch.int64
    for row in range(2):
        assert not set(ids[row].tolist()) & set(idx[row].tolist())
        freq = np.bincount(ids[row].numpy(), minlength=SV) / n
        r = _tail_density(teacher, idx, 2.0)[row]
        assert np.all(np.abs(freq - r) <= 5 * np.sqrt(r * (1 - r) / n) + 1e-9)
    again = sample_tail_ids(teacher, idx, n, 2.0, torch.Generator().manual_seed(3))
    assert torch.equal(ids, again)


def test_sampled_tail_bad_inputs() -> None:
    student, teacher = _sampled_inputs(15)
    full = topk_logits(teacher, 5, 2.0, tail_samples=3)
    assert full.num_tail_samples == 3 and full.tail_temperature == 2.0
    labels = torch.zeros(6, dtype=torch.long)
    partial = dataclasses.replace(full, tail_logsumexp=None)
    with pytest.raises(InvalidArgumentError, match="all of tail_indices"):
        distillation_loss(student, partial, labels, shift_labels=False)
    with pytest.raises(InvalidArgumentError, match="tail sample shapes"):
        distillation_loss(student, dataclasses.replace(full, tail_values=full.tail_values[:, :2]), labels,
                          shift_labels=False)
    with pytest.raises(InvalidArgumentError, match="tail sample ids reach"):
        distillation_loss(student, dataclasses.replace(full, tail_indices=full.tail_indices + SV), labels,
                          shift_labels=False)
    with pytest.raises(InvalidArgumentError, match="tail_samples"):
        topk_logits(teacher, 5, 2.0, tail_samples=-1)
    with pytest.raises(InvalidArgumentError, match="no tail to sample"):
        topk_logits(teacher, SV, 2.0, tail_samples=2)
    # index/to keep the tail fields (the trainer moves a batch with `.to`)
    moved = full.to("cpu").index(lambda t: t[:3])
    assert moved.num_tail_samples == 3 and moved.tail_logsumexp.shape == (3,) and moved.tail_temperature == 2.0
