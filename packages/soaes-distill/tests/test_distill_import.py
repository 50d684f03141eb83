"""soaes-distill as installed: its version is the distribution's, its CLI entry point works, and
`distillation_loss` / `TopKLogits` keep the contract of design.md."""

from __future__ import annotations

import importlib.metadata as md
import inspect

import torch
import torch.nn.functional as F
from click.testing import CliRunner

import soaes_distill
from soaes_distill.losses import TopKLogits, distillation_loss


def test_version_is_the_installed_distributions() -> None:
    assert soaes_distill.__version__ == md.version("soaes-distill")


def test_console_script_runs_help_for_every_command() -> None:
    (entry,) = md.entry_points(group="console_scripts", name="soaes-distill")
    main = entry.load()
    runner = CliRunner()
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and soaes_distill.__version__ in version.output.split()
    assert {"dump", "train", "make-draft"} <= set(main.commands)
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (name, result.output)


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
