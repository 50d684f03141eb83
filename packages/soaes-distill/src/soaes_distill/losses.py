"""Knowledge-distillation losses: the SOAEs paper's Eq. 2, ``α·D(p_T ‖ p_D) + (1−α)·CE``, for several D.

`p_T = softmax(z_T/τ)` and `p_D = softmax(z_D/τ)`. By default D is the forward KL of Eq. 1 and the loss is
*exactly* Eq. 2: no τ² factor (pass ``scale_by_temperature_squared=True`` for Hinton's gradient scaling).
The divergence is averaged over positions whose label is not -100; the CE term is the ordinary mean
next-token cross-entropy at τ = 1.

The teacher is either dense logits (same vocabulary as the student) or a `TopKLogits`. With top-k the
teacher is known exactly on its k tokens (their logits and the full-vocabulary logsumexp). The rest of the
vocabulary (the *tail*) is handled in one of two ways:

- **Tail bucket** (no tail samples): the teacher's remaining probability ``1 − Σ_topk p_T`` is one bucket and
  the student's tail is its own mass outside the teacher's k tokens (a logsumexp with those k masked), so
  both distributions live on the same k+1 buckets and every divergence is computed there. Exact when k = V
  and, by the data-processing inequality, a **lower bound** of the dense divergence otherwise (the gap is
  what `benchmarks/distill/topk_error.py` measures). The teacher's tail is floored at `TAIL_FLOOR` so
  reverse KL stays finite when 16-bit rounding makes the stored top-k sum to ≥ 1.
- **Sampled tail** (`TopKLogits` with tail samples; cf. "Sparse Logit Sampling", Anshumann et al. 2025):
  s ids per position drawn i.i.d. from the teacher at τ_s restricted to the tail,
  ``r(x) = p_τs(x) / m_τs`` with ``m_τs = 1 − Σ_topk p_τs``. Every divergence is a sum ``Σ_x φ(p_T(x), p_D(x))``
  (forward KL φ = p log(p/q), reverse q log(q/p), JSD, TV ½|p − q|, acceptance through min(p, q)), so
  ``D = Σ_topk φ + E_{x~r}[φ(p_T(x), p_D(x)) / r(x)]`` (equivalently ``m_τ · E_{x~p_τ^tail}[φ/p_τ]`` with the
  importance weight ``p_τ^tail/p_τs^tail``): the top-k sum is exact and the expectation is the mean over the
  s samples, with the exact weight ``1/r(x)`` from the stored logit of x and the logsumexp at τ_s, so the
  loss τ may differ from τ_s. The estimate is **unbiased** in value and in its gradient w.r.t. the student
  logits, but noisier per position than the bucket; averaged over the positions of a batch and over
  training steps the noise shrinks while the bucket's bias does not.

Work is done in chunks of positions, cast to fp32 inside each chunk and recomputed in backward
(activation checkpointing), so a batch × length × vocab fp32 tensor is never held at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from soaes_core.errors import InvalidArgumentError
from soaes_data.packing import IGNORE_INDEX as IGNORE_INDEX  # the label losses skip; defined once, re-exported

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "total_variation", "acceptance")
TAIL_FLOOR = 1e-12
# fp32 elements per chunk (positions × vocab): 2^25 floats = 128 MiB per intermediate
CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class TopKLogits:
    """A teacher's top-k logits per position, optionally with samples of its tail.

    `values` (..., k): the k largest logits z_T (any float dtype, any per-position shift); `indices` (..., k):
    their token ids; `logsumexp` (...): ``logsumexp(z_T / temperature)`` over the *full* vocabulary, in fp32,
    so the top-k probabilities are exact and the tail mass is known. `temperature` says which τ the logsumexp
    is for; `vocab_size` (optional) is the teacher's vocabulary, checked against the student's.

    Tail samples (all four fields set, or none): `tail_indices` (..., s) ids drawn i.i.d. from the teacher at
    `tail_temperature` τ_s restricted to the tokens outside the top-k; `tail_values` (..., s) their logits,
    with the same per-position shift as `values`; `tail_logsumexp` (...) ``logsumexp(z_T / τ_s)`` over the
    full vocabulary. With them the divergence's tail is an unbiased importance-sampled estimate.
    """

    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor
    temperature: float = 1.0
    vocab_size: int | None = None
    tail_indices: torch.Tensor | None = None
    tail_values: torch.Tensor | None = None
    tail_logsumexp: torch.Tensor | None = None
    tail_temperature: float | None = None

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    @property
    def num_tail_samples(self) -> int:
        """s, the tail samples per position (0 = tail bucket)."""
        return 0 if self.tail_indices is None else int(self.tail_indices.shape[-1])

    def index(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TopKLogits:
        """Apply the same position indexing `fn` (e.g. a slice or a boolean mask) to every tensor field."""
        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)
        return dataclasses.replace(self, values=fn(self.values), indices=fn(self.indices),
                                   logsumexp=fn(self.logsumexp), tail_indices=opt(self.tail_indices),
                                   tail_values=opt(self.tail_values), tail_logsumexp=opt(self.tail_logsumexp))

    def to(self, device: torch.device | str) -> TopKLogits:
        """The same logits with every tensor on `device` (dtypes unchanged)."""
        return self.index(lambda t: t.to(device))


def sample_tail_ids(logits: torch.Tensor, top_indices: torch.Tensor, num_samples: int, temperature: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., s) ids per row drawn i.i.d. from ``softmax(logits/τ)`` restricted to the ids not in `top_indices`.

    `logits` (..., V) on any shift; `top_indices` (..., k) with k < V. With replacement; deterministic for a
    given `generator` state (on the device of `logits`).
    """
    vocab = int(logits.shape[-1])
    if int(top_indices.shape[-1]) >= vocab:
        raise InvalidArgumentError(f"no tail to sample: top-k k={top_indices.shape[-1]} covers the whole "
                                   f"vocabulary ({vocab} tokens)")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise InvalidArgumentError(f"the number of tail samples must be an int ≥ 1, got {num_samples!r}")
    _check_temperature(temperature)
    lead = tuple(logits.shape[:-1])
    z = (logits.float() / temperature).scatter(-1, top_indices.long(), float("-inf")).reshape(-1, vocab)
    if z.shape[0] == 0:
        return torch.zeros(*lead, num_samples, dtype=torch.int64, device=logits.device)
    ids = torch.multinomial(torch.softmax(z, -1), num_samples, replacement=True, generator=generator)
    return ids.view(*lead, num_samples)


def topk_logits(logits: torch.Tensor, k: int, temperature: float = 1.0, *, tail_samples: int = 0,
                tail_temperature: float | None = None, generator: torch.Generator | None = None) -> TopKLogits:
    """The `TopKLogits` of dense `logits` (..., V): top-k values/indices and the fp32 logsumexp at τ.

    `tail_samples` s > 0 adds s tail ids per position drawn at `tail_temperature` τ_s (default τ) outside the
    top-k (`sample_tail_ids` with `generator`), their logits and the full logsumexp at τ_s.
    """
    vocab = int(logits.shape[-1])
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise InvalidArgumentError(f"top-k must be an int in [1, vocab size {vocab}], got k={k!r}")
    _check_temperature(temperature)
    if not isinstance(tail_samples, int) or isinstance(tail_samples, bool) or tail_samples < 0:
        raise InvalidArgumentError(f"tail_samples must be an int ≥ 0, got {tail_samples!r}")
    values, indices = torch.topk(logits, k, dim=-1)
    lse = torch.logsumexp(logits.float() / temperature, dim=-1)
    if tail_samples == 0:
        return TopKLogits(values, indices, lse, float(temperature), vocab)
    tau_s = float(temperature if tail_temperature is None else tail_temperature)
    tail_ids = sample_tail_ids(logits, indices, tail_samples, tau_s, generator)
    tail_lse = torch.logsumexp(logits.float() / tau_s, dim=-1)
    return TopKLogits(values, indices, lse, float(temperature), vocab, tail_indices=tail_ids,
                      tail_values=logits.gather(-1, tail_ids), tail_logsumexp=tail_lse, tail_temperature=tau_s)


def _check_temperature(temperature: float) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise InvalidArgumentError(f"temperature τ must be a finite number > 0, got {temperature!r}")


def _check_tail(teacher: TopKLogits, vocab: int) -> None:
    fields = (teacher.tail_indices, teacher.tail_values, teacher.tail_logsumexp, teacher.tail_temperature)
    if all(f is None for f in fields):
        return
    if any(f is None for f in fields):
        raise InvalidArgumentError("teacher tail samples need all of tail_indices, tail_values, tail_logsumexp and "
                                   "tail_temperature (or none of them)")
    _check_temperature(teacher.tail_temperature)
    lead = tuple(teacher.values.shape[:-1])
    if tuple(teacher.tail_indices.shape[:-1]) != lead or \
            tuple(teacher.tail_values.shape) != tuple(teacher.tail_indices.shape) or \
            tuple(teacher.tail_logsumexp.shape) != lead:
        raise InvalidArgumentError(
            f"teacher tail sample shapes indices {tuple(teacher.tail_indices.shape)}, values "
            f"{tuple(teacher.tail_values.shape)}, logsumexp {tuple(teacher.tail_logsumexp.shape)} do not match "
            f"the top-k positions {lead}")
    if teacher.k >= vocab:
        raise InvalidArgumentError(f"tail samples given but top-k k={teacher.k} covers the vocabulary ({vocab})")
    ids = teacher.tail_indices
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InvalidArgumentError(f"vocabulary mismatch: teacher tail sample ids reach {int(ids.max())}, "
                                   f"student vocabulary has {vocab} tokens")


def _check_args(student_logits: torch.Tensor, teacher: torch.Tensor | TopKLogits | None, labels: torch.Tensor,
                alpha: float, temperature: float, divergence: str, beta: float) -> None:
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise InvalidArgumentError(f"alpha must be in [0, 1], got {alpha!r}")
    if teacher is None and alpha != 0:
        raise InvalidArgumentError(f"alpha={alpha} weights a KD term, which needs the teacher's logits; without a "
                                   "teacher only alpha=0 (plain cross-entropy on the labels) is possible")
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
    if teacher is None:
        return
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
        _check_tail(teacher, vocab)
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
    """Per-row divergence between teacher log-probs `log_p` and student log-probs `log_q` (same buckets).

    When the buckets do not cover the vocabulary this is the partial sum Σ φ over them (for "acceptance":
    1 − Σ min(p, q) over them), which `sampled_tail_estimate` completes.
    """
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


def _ratio_times(log_a: torch.Tensor, log_r: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(a / r)·factor elementwise, with 0 where a = 0 (so 0·log 0 = 0)."""
    ratio = (log_a - log_r).exp()
    return torch.where(log_a > float("-inf"), ratio * factor, torch.zeros_like(ratio))


def sampled_tail_estimate(log_p: torch.Tensor, log_q: torch.Tensor, log_r: torch.Tensor, divergence: str,
                          beta: float = 0.5) -> torch.Tensor:
    """Per-row unbiased estimate of the tail part Σ_{x∉topk} φ(p(x), q(x)) of a divergence: mean_j φ(x_j) / r(x_j).

    `log_p`, `log_q` (n, s): teacher and student log-probs at the loss τ of the sampled ids x_j; `log_r` (n, s):
    log-density the ids were drawn from (the teacher's tail at τ_s). For "acceptance" this estimates
    −Σ_tail min(p, q), the tail's share of 1 − Σ min(p, q).
    """
    if divergence == "forward_kl":
        terms = _ratio_times(log_p, log_r, log_p - log_q)
    elif divergence == "reverse_kl":
        terms = _ratio_times(log_q, log_r, log_q - log_p)
    elif divergence == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        terms = beta * _ratio_times(log_p, log_r, log_p - log_m) + \
            (1.0 - beta) * _ratio_times(log_q, log_r, log_q - log_m)
    elif divergence == "total_variation":
        terms = 0.5 * ((log_p - log_r).exp() - (log_q - log_r).exp()).abs()
    elif divergence == "acceptance":
        terms = -(torch.minimum(log_p, log_q) - log_r).exp()
    else:
        raise InvalidArgumentError(f"unknown divergence {divergence!r}")
    return terms.mean(-1)


def _log_tail_mass(log_p_top: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ top-k p), floored at log `TAIL_FLOOR` (16-bit values can make the top-k sum ≥ 1); (n, 1)."""
    top_mass = torch.logsumexp(log_p_top, dim=-1, keepdim=True).clamp(max=0.0)
    return torch.log((-torch.expm1(top_mass)).clamp(min=TAIL_FLOOR))


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
    log_p_tail = _log_tail_mass(log_p_top)
    masked = zs.scatter(-1, idx, float("-inf"))
    log_q_tail = torch.logsumexp(masked, dim=-1, keepdim=True) - lse_s
    return torch.cat([log_p_top, log_p_tail], -1), torch.cat([log_q_top, log_q_tail], -1)


def sampled_topk_divergence(student_logits: torch.Tensor, teacher: TopKLogits, temperature: float, divergence: str,
                            beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence (n,) for a `TopKLogits` with tail samples (rows (n, ·)): exact top-k part + sampled tail."""
    zs = student_logits.float() / temperature
    lse_s = torch.logsumexp(zs, dim=-1, keepdim=True)
    log_q_top = zs.gather(-1, teacher.indices.long()) - lse_s
    log_p_top = teacher.values.float() / temperature - teacher.logsumexp.float().unsqueeze(-1)
    exact = divergence_from_log_probs(log_p_top, log_q_top, divergence, beta)
    tail_z = teacher.tail_values.float()
    log_q = zs.gather(-1, teacher.tail_indices.long()) - lse_s
    log_p = tail_z / temperature - teacher.logsumexp.float().unsqueeze(-1)
    # density the ids were drawn from: p_τs restricted to the tail, p_τs(x) / (1 − Σ_topk p_τs)
    tau_s, lse_ts = teacher.tail_temperature, teacher.tail_logsumexp.float().unsqueeze(-1)
    log_m_s = _log_tail_mass(teacher.values.float() / tau_s - lse_ts)
    log_r = tail_z / tau_s - lse_ts - log_m_s
    return exact + sampled_tail_estimate(log_p, log_q, log_r, divergence, beta)


def _divergence_rows(student: torch.Tensor, teacher: torch.Tensor | TopKLogits, temperature: float, divergence: str,
                     beta: float) -> torch.Tensor:
    """Per-row divergence (n,) of student rows (n, V) against matching teacher rows, fp32."""
    if isinstance(teacher, TopKLogits):
        if teacher.num_tail_samples:
            return sampled_topk_divergence(student, teacher, temperature, divergence, beta)
        log_p, log_q = bucket_log_probs_topk(student, teacher.values, teacher.indices, teacher.logsumexp, temperature)
    else:
        log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
        log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    return divergence_from_log_probs(log_p, log_q, divergence, beta)


def _chunk_terms(student: torch.Tensor, targets: torch.Tensor, temperature: float, divergence: str, beta: float,
                 need_ce: bool, need_kd: bool, teacher: torch.Tensor | TopKLogits | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over one chunk of positions of the divergence and of the CE (fp32 scalars)."""
    zero = student.new_zeros((), dtype=torch.float32)
    kd = zero
    if need_kd and teacher is not None:
        kd = _divergence_rows(student, teacher, temperature, divergence, beta).sum()
    ce = zero
    if need_ce:
        ce = torch.nn.functional.cross_entropy(student.float(), targets, reduction="sum")
    return kd, ce


def divergence_per_position(student_logits: torch.Tensor, teacher: torch.Tensor | TopKLogits,
                            temperature: float = 2.0, divergence: str = "forward_kl", *,
                            beta: float = 0.5) -> torch.Tensor:
    """D(p_T ‖ p_D) at every position (...), no label shift or masking, fp32, differentiable.

    For analysis (benchmarks, tests): unlike `distillation_loss` it is not chunked, so it holds (..., V) fp32.
    """
    lead = tuple(student_logits.shape[:-1])
    _check_args(student_logits, teacher, torch.zeros(lead, dtype=torch.long), 1.0, temperature, divergence, beta)
    nd = student_logits.dim() - 1
    flat = student_logits.reshape(-1, student_logits.shape[-1])
    rows = teacher.index(lambda t: t.reshape(-1, *t.shape[nd:])) if isinstance(teacher, TopKLogits) \
        else teacher.reshape(-1, teacher.shape[-1])
    return _divergence_rows(flat, rows, temperature, divergence, beta).view(lead)


@dataclass(frozen=True)
class DistillationLossTerms:
    """The loss of Eq. 2 and its two parts (means over the counted positions)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    num_positions: int


def _shift(teacher: torch.Tensor | TopKLogits | None, student: torch.Tensor,
           labels: torch.Tensor) -> tuple[torch.Tensor | TopKLogits | None, torch.Tensor, torch.Tensor]:
    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[..., :-1, :] if t.dim() == student.dim() else t[..., :-1]
    if teacher is not None:
        teacher = teacher.index(cut) if isinstance(teacher, TopKLogits) else teacher[..., :-1, :]
    return teacher, student[..., :-1, :], labels[..., 1:]


def _select_rows(teacher: torch.Tensor | TopKLogits | None, sel: torch.Tensor) -> torch.Tensor | TopKLogits | None:
    """Rows `sel` of flat (n, ·) teacher tensors, detached (the teacher gets no gradient)."""
    if teacher is None:
        return None
    if isinstance(teacher, TopKLogits):
        return teacher.index(lambda t: t[sel].detach())
    return teacher[sel].detach()


def distillation_loss_terms(student_logits: torch.Tensor, teacher: torch.Tensor | TopKLogits | None,
                            labels: torch.Tensor,
                            alpha: float = 0.5, temperature: float = 2.0, divergence: str = "forward_kl", *,
                            beta: float = 0.5, shift_labels: bool = True, scale_by_temperature_squared: bool = False,
                            chunk_size: int | None = None) -> DistillationLossTerms:
    """`distillation_loss` returning the KD and CE parts as well (for logging). `teacher` may be None only with
    alpha = 0 (black-box SFT: cross-entropy on the labels alone)."""
    _check_args(student_logits, teacher, labels, alpha, temperature, divergence, beta)
    if shift_labels:
        teacher, student_logits, labels = _shift(teacher, student_logits, labels)
    vocab = student_logits.shape[-1]
    nd = student_logits.dim() - 1
    flat_student = student_logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
    n = int(rows.numel())
    zero = student_logits.sum() * 0.0
    if n == 0:
        z = zero.float()
        return DistillationLossTerms(z, z.detach(), z.detach(), 0)
    flat_teacher: torch.Tensor | TopKLogits | None = None
    if isinstance(teacher, TopKLogits):
        flat_teacher = teacher.index(lambda t: t.reshape(-1, *t.shape[nd:]))
    elif teacher is not None:
        flat_teacher = teacher.reshape(-1, vocab)
    need_kd, need_ce = alpha > 0, alpha < 1
    step = chunk_size or max(1, CHUNK_ELEMENTS // vocab)
    kd_sum = zero.float()
    ce_sum = zero.float()
    with_grad = torch.is_grad_enabled() and flat_student.requires_grad
    for start in range(0, n, step):
        sel = rows[start:start + step]
        args = (flat_student[sel], flat_labels[sel], temperature, divergence, beta, need_ce, need_kd,
                _select_rows(flat_teacher, sel))
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
    with leading dims (B, L) (with or without tail samples); `labels` (B, L) with -100 for ignored positions.
    With `shift_labels` (default, Hugging Face convention) position t's logits are scored against
    ``labels[t+1]``; pass False when labels are already aligned with the logits. `divergence`: "forward_kl"
    (Eq. 1, default), "reverse_kl", "jsd" (generalised JSD with weight `beta`), "total_variation", or
    "acceptance" (1 − Σ min(p_T, p_D)). The τ² factor is off by default (exact Eq. 2). Raises
    `InvalidArgumentError` on bad arguments.
    """
    return distillation_loss_terms(student_logits, teacher, labels, alpha, temperature, divergence, beta=beta,
                                   shift_labels=shift_labels, scale_by_temperature_squared=scale_by_temperature_squared,
                                   chunk_size=chunk_size).loss
