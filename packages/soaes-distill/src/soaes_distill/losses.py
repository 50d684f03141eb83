"""Knowledge-distillation losses: the SOAEs paper's Eq. 2, ``α·D(p_T ‖ p_D) + (1−α)·CE``, for several D.

`p_T = softmax(z_T/τ)` and `p_D = softmax(z_D/τ)`. By default D is the forward KL of Eq. 1 and the loss is
*exactly* Eq. 2: no τ² factor (pass ``scale_by_temperature_squared=True`` for Hinton's gradient scaling).
The divergence is averaged over positions whose label is not -100; the CE term is the ordinary mean
next-token cross-entropy at τ = 1.

The teacher is either dense logits (same vocabulary as the student) or a `TopKLogits`. With top-k the
teacher is known exactly on its k tokens (their logits and the full-vocabulary logsumexp), and its
remaining probability ``1 − Σ_topk p_T`` is treated as **one tail bucket**; the student's tail is its own
mass outside the teacher's k tokens (a logsumexp over the student logits with those k masked), so both
distributions live on the same k+1 buckets and every divergence is computed there. This is exact when
k = V and, by the data-processing inequality, a lower bound of the dense divergence otherwise (the gap is
what `benchmarks/distill/topk_error.py` measures). The teacher's tail is floored at `TAIL_FLOOR` so
reverse KL stays finite when 16-bit rounding makes the stored top-k sum to ≥ 1.

Work is done in chunks of positions, cast to fp32 inside each chunk and recomputed in backward
(activation checkpointing), so a batch × length × vocab fp32 tensor is never held at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from soaes_core.errors import InvalidArgumentError

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "total_variation", "acceptance")
TAIL_FLOOR = 1e-12
# fp32 elements per chunk (positions × vocab): 2^25 floats = 128 MiB per intermediate
CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class TopKLogits:
    """A teacher's top-k logits per position.

    `values` (..., k): the k largest logits z_T (any float dtype); `indices` (..., k): their token ids;
    `logsumexp` (...): ``logsumexp(z_T / temperature)`` over the *full* vocabulary, in fp32, so the top-k
    probabilities are exact and the tail mass is known. `temperature` says which τ the logsumexp is for;
    `vocab_size` (optional) is the teacher's vocabulary, checked against the student's.
    """

    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor
    temperature: float = 1.0
    vocab_size: int | None = None

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    def index(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TopKLogits:
        """Apply the same position indexing `fn` (e.g. a slice or a boolean mask) to every field."""
        return TopKLogits(fn(self.values), fn(self.indices), fn(self.logsumexp), self.temperature, self.vocab_size)


def topk_logits(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKLogits:
    """The `TopKLogits` of dense `logits` (..., V): top-k values/indices and the fp32 logsumexp at τ."""
    vocab = int(logits.shape[-1])
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise InvalidArgumentError(f"top-k must be an int in [1, vocab size {vocab}], got k={k!r}")
    _check_temperature(temperature)
    values, indices = torch.topk(logits, k, dim=-1)
    lse = torch.logsumexp(logits.float() / temperature, dim=-1)
    return TopKLogits(values, indices, lse, float(temperature), vocab)


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise InvalidArgumentError(f"temperature τ must be a finite number > 0, got {temperature!r}")


def _check_args(student_logits: torch.Tensor, teacher: torch.Tensor | TopKLogits, labels: torch.Tensor,
                alpha: float, temperature: float, divergence: str, beta: float) -> None:
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise InvalidArgumentError(f"alpha must be in [0, 1], got {alpha!r}")
    _check_temperature(temperature)
    if divergence not in DIVERGENCES:
        raise InvalidArgumentError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise InvalidArgumentError(f"jsd beta must be in (0, 1), got {beta!r}")
    if student_logits.dim() < 2:
        raise InvalidArgumentError(f"student_logits must be (..., V), got shape {tuple(student_logits.shape)}")
    vocab = student_logits.shape[-1]
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise InvalidArgumentError(f"labels shape {tuple(labels.shape)} does not match student logits "
                                   f"positions {tuple(student_logits.shape[:-1])}")
    if isinstance(teacher, TopKLogits):
        if teacher.vocab_size is not None and teacher.vocab_size != vocab:
            raise InvalidArgumentError(f"vocabulary mismatch: teacher top-k logits are over {teacher.vocab_size} "
                                       f"tokens, student logits over {vocab}")
        if teacher.k > vocab:
            raise InvalidArgumentError(f"top-k k={teacher.k} exceeds the student vocabulary size {vocab}")
        if tuple(teacher.values.shape[:-1]) != tuple(student_logits.shape[:-1]) or \
                tuple(teacher.indices.shape) != tuple(teacher.values.shape) or \
                tuple(teacher.logsumexp.shape) != tuple(teacher.values.shape[:-1]):
            raise InvalidArgumentError(
                f"teacher top-k shapes values {tuple(teacher.values.shape)}, indices {tuple(teacher.indices.shape)}, "
                f"logsumexp {tuple(teacher.logsumexp.shape)} do not match student logits {tuple(student_logits.shape)}")
        if not math.isclose(teacher.temperature, temperature, rel_tol=1e-6):
            raise InvalidArgumentError(f"teacher logsumexp was computed at temperature {teacher.temperature}, "
                                       f"but the loss uses τ={temperature}")
        if teacher.indices.numel() and (int(teacher.indices.min()) < 0 or int(teacher.indices.max()) >= vocab):
            raise InvalidArgumentError(f"vocabulary mismatch: teacher token ids reach {int(teacher.indices.max())}, "
                                       f"student vocabulary has {vocab} tokens")
    else:
        if teacher.shape[-1] != vocab:
            raise InvalidArgumentError(f"vocabulary mismatch: teacher logits have {teacher.shape[-1]} tokens, "
                                       f"student logits {vocab}")
        if tuple(teacher.shape) != tuple(student_logits.shape):
            raise InvalidArgumentError(f"teacher logits shape {tuple(teacher.shape)} does not match student "
                                       f"logits shape {tuple(student_logits.shape)}")


# ---- the divergences, on matching log-distributions (n, buckets) -> (n,) -------------------------------------

def _plogp_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ a·(log a − log b), with 0·log 0 = 0."""
    a = log_a.exp()
    term = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return term.sum(-1)


def divergence_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str,
                              beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher log-probs `log_p` and student log-probs `log_q` (same buckets)."""
    if divergence == "forward_kl":
        return _plogp_ratio(log_p, log_q)
    if divergence == "reverse_kl":
        return _plogp_ratio(log_q, log_p)
    if divergence == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        return beta * _plogp_ratio(log_p, log_m) + (1.0 - beta) * _plogp_ratio(log_q, log_m)
    if divergence == "total_variation":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if divergence == "acceptance":
        # 1 − Σ min(p_T, p_D): one minus the speculative-decoding acceptance probability (equals TV in value)
        return 1.0 - torch.minimum(log_p.exp(), log_q.exp()).sum(-1)
    raise InvalidArgumentError(f"unknown divergence {divergence!r}")


def bucket_log_probs_topk(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                          logsumexp: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs on the k top-k buckets (+ one tail bucket when k < V), fp32."""
    zs = student_logits.float() / temperature
    lse_s = torch.logsumexp(zs, dim=-1, keepdim=True)
    idx = indices.long()
    log_q_top = zs.gather(-1, idx) - lse_s
    log_p_top = values.float() / temperature - logsumexp.float().unsqueeze(-1)
    if idx.shape[-1] == zs.shape[-1]:
        return log_p_top, log_q_top
    # teacher tail = 1 − Σ top-k (floored); student tail = its own mass outside the teacher's top-k
    top_mass = torch.logsumexp(log_p_top, dim=-1, keepdim=True).clamp(max=0.0)
    log_p_tail = torch.log((-torch.expm1(top_mass)).clamp(min=TAIL_FLOOR))
    masked = zs.scatter(-1, idx, float("-inf"))
    log_q_tail = torch.logsumexp(masked, dim=-1, keepdim=True) - lse_s
    return torch.cat([log_p_top, log_p_tail], -1), torch.cat([log_q_top, log_q_tail], -1)


def _chunk_terms(student: torch.Tensor, targets: torch.Tensor, temperature: float, divergence: str, beta: float,
                 need_ce: bool, need_kd: bool, teacher_dense: torch.Tensor | None, t_values: torch.Tensor | None,
                 t_indices: torch.Tensor | None, t_lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over one chunk of positions of the divergence and of the CE (fp32 scalars)."""
    zero = student.new_zeros((), dtype=torch.float32)
    kd = zero
    if need_kd:
        if teacher_dense is not None:
            log_p = torch.log_softmax(teacher_dense.float() / temperature, dim=-1)
            log_q = torch.log_softmax(student.float() / temperature, dim=-1)
        else:
            log_p, log_q = bucket_log_probs_topk(student, t_values, t_indices, t_lse, temperature)
        kd = divergence_from_log_probs(log_p, log_q, divergence, beta).sum()
    ce = zero
    if need_ce:
        ce = torch.nn.functional.cross_entropy(student.float(), targets, reduction="sum")
    return kd, ce


@dataclass(frozen=True)
class DistillationLossTerms:
    """The loss of Eq. 2 and its two parts (means over the counted positions)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    num_positions: int


def _shift(teacher: torch.Tensor | TopKLogits, student: torch.Tensor,
           labels: torch.Tensor) -> tuple[torch.Tensor | TopKLogits, torch.Tensor, torch.Tensor]:
    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[..., :-1, :] if t.dim() == student.dim() else t[..., :-1]
    teacher = teacher.index(cut) if isinstance(teacher, TopKLogits) else teacher[..., :-1, :]
    return teacher, student[..., :-1, :], labels[..., 1:]


def distillation_loss_terms(student_logits: torch.Tensor, teacher: torch.Tensor | TopKLogits, labels: torch.Tensor,
                            alpha: float = 0.5, temperature: float = 2.0, divergence: str = "forward_kl", *,
                            beta: float = 0.5, shift_labels: bool = True, scale_by_temperature_squared: bool = False,
                            chunk_size: int | None = None) -> DistillationLossTerms:
    """`distillation_loss` returning the KD and CE parts as well (for logging)."""
    _check_args(student_logits, teacher, labels, alpha, temperature, divergence, beta)
    if shift_labels:
        teacher, student_logits, labels = _shift(teacher, student_logits, labels)
    vocab = student_logits.shape[-1]
    flat_student = student_logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
    n = int(rows.numel())
    zero = student_logits.sum() * 0.0
    if n == 0:
        z = zero.float()
        return DistillationLossTerms(z, z.detach(), z.detach(), 0)
    if isinstance(teacher, TopKLogits):
        k = teacher.k
        t_vals, t_idx = teacher.values.reshape(-1, k), teacher.indices.reshape(-1, k)
        t_lse, t_dense = teacher.logsumexp.reshape(-1), None
    else:
        t_vals = t_idx = t_lse = None
        t_dense = teacher.reshape(-1, vocab)
    need_kd, need_ce = alpha > 0, alpha < 1
    step = chunk_size or max(1, CHUNK_ELEMENTS // vocab)
    kd_sum = zero.float()
    ce_sum = zero.float()
    with_grad = torch.is_grad_enabled() and flat_student.requires_grad
    for start in range(0, n, step):
        sel = rows[start:start + step]
        args = (flat_student[sel], flat_labels[sel], temperature, divergence, beta, need_ce, need_kd,
                None if t_dense is None else t_dense[sel].detach(),
                None if t_vals is None else t_vals[sel].detach(), None if t_idx is None else t_idx[sel],
                None if t_lse is None else t_lse[sel].detach())
        if with_grad:
            kd, ce = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            kd, ce = _chunk_terms(*args)
        kd_sum = kd_sum + kd
        ce_sum = ce_sum + ce
    kd_mean, ce_mean = kd_sum / n, ce_sum / n
    if scale_by_temperature_squared:
        kd_mean = kd_mean * (temperature ** 2)
    loss = alpha * kd_mean + (1.0 - alpha) * ce_mean
    return DistillationLossTerms(loss, kd_mean.detach(), ce_mean.detach(), n)


def distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor | TopKLogits, labels: torch.Tensor,
                      alpha: float = 0.5, temperature: float = 2.0, divergence: str = "forward_kl", *,
                      beta: float = 0.5, shift_labels: bool = True, scale_by_temperature_squared: bool = False,
                      chunk_size: int | None = None) -> torch.Tensor:
    """Eq. 2: ``α·D(softmax(z_T/τ) ‖ softmax(z_D/τ)) + (1−α)·CE(z_D, labels)``, a scalar fp32 tensor.

    `student_logits` (B, L, V) any float dtype; `teacher` dense logits of the same shape or `TopKLogits`
    with leading dims (B, L); `labels` (B, L) with -100 for ignored positions. With `shift_labels` (default,
    Hugging Face convention) position t's logits are scored against ``labels[t+1]``; pass False when labels
    are already aligned with the logits. `divergence`: "forward_kl" (Eq. 1, default), "reverse_kl", "jsd"
    (generalised JSD with weight `beta`), "total_variation", or "acceptance" (1 − Σ min(p_T, p_D)). The
    τ² factor is off by default (exact Eq. 2). Raises `InvalidArgumentError` on bad arguments.
    """
    return distillation_loss_terms(student_logits, teacher, labels, alpha, temperature, divergence, beta=beta,
                                   shift_labels=shift_labels, scale_by_temperature_squared=scale_by_temperature_squared,
                                   chunk_size=chunk_size).loss
