"""soaes-distill as installed: its version is the distribution's, its CLI entry point works, and
`distillation_loss` / `TopKLogits` keep the contract of design.md."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

import soaes_distill
from soaes_core.testing.installed import check_installed_distribution
from soaes_distill.losses import TopKLogits, distillation_loss


def test_installed_distribution_and_console_script() -> None:
    check_installed_distribution("soaes-distill", soaes_distill, {"dump", "train", "make-draft"})


def test_distillation_loss_contract() -> None:
    params = inspect.signature(distillation_loss).parameters
    assert list(params)[:6] == ["student_logits", "teacher", "labels", "alpha", "temperature", "divergence"]
    assert [params[k].default for k in ("alpha", "temperature", "divergence")] == [0.5, 2.0, "forward_kl"]
    assert list(inspect.signature(TopKLogits).parameters)[:3] == ["values", "indices", "logsumexp"]
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, 5, 11, generator=g)
    labels = torch.randint(0, 11, (1, 5), generator=g)
    ce = F.cross_entropy(student[0, :-1], labels[0, 1:])
    # a teacher equal to the student leaves only (1 − α)·CE (Eq. 2)
    loss = distillation_loss(student, student.clone(), labels, alpha=0.3)
    assert torch.allclose(loss, 0.7 * ce, atol=1e-5)
