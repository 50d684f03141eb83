"""soaes-eval as installed: its version is the distribution's, its CLI entry point works, and the metrics keep the
contract of design.md (0–100 scale)."""

from __future__ import annotations

import importlib.metadata as md
import inspect

from click.testing import CliRunner

import soaes_eval
from soaes_eval import bleu4, rouge


def test_version_is_the_installed_distributions() -> None:
    assert soaes_eval.__version__ == md.version("soaes-eval")


def test_console_script_runs_help_for_every_command() -> None:
    (entry,) = md.entry_points(group="console_scripts", name="soaes-eval")
    main = entry.load()
    runner = CliRunner()
    version = runner.invoke(main, ["--version"])
    assert version.exit_code == 0 and soaes_eval.__version__ in version.output.split()
    assert {"run", "metrics", "table"} <= set(main.commands)
    for name in main.commands:
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, (name, result.output)


def test_metric_contract() -> None:
    for fn in (rouge, bleu4):
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["predictions", "references", "lang"] and params["lang"].default == "zh"
    same = rouge(["国有资产监督管理委员会负责监管"], ["国有资产监督管理委员会负责监管"])
    assert set(same) >= {"rouge1", "rouge2", "rougeL"} and all(abs(v - 100.0) < 1e-6 for v in same.values())
    assert abs(bleu4(["国有资产监督管理委员会负责监管"], ["国有资产监督管理委员会负责监管"]) - 100.0) < 1e-6
    assert rouge(["完全无关的句子"], ["国有资产监督管理"])["rouge1"] < 100.0
