"""`distillation_loss` against float64 reference implementations written independently with numpy/scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, rel_entr, softmax

from soaes_core.errors import InvalidArgumentError
from soaes_distill.losses import DIVERGENCES, TopKLogits, distillation_loss, distillation_loss_terms, topk_logits

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
