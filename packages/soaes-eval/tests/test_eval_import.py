"""soaes-eval as installed: its version is the distribution's, its CLI entry point works, and the metrics keep the
contract of design.md (0–100 scale)."""

from __future__ import annotations

import inspect

import soaes_eval
from soaes_core.testing.installed import check_installed_distribution
from soaes_eval import bleu4, rouge


def test_installed_distribution_and_console_script() -> None:
    check_installed_distribution("soaes-eval", soaes_eval, {"run", "metrics", "table"})


def test_metric_contract() -> None:
    for fn in (rouge, bleu4):
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["predictions", "references", "lang"] and params["lang"].default == "zh"
    same = rouge(["国有资产监督管理委员会负责监管"], ["国有资产监督管理委员会负责监管"])
    assert set(same) >= {"rouge1", "rouge2", "rougeL"} and all(abs(v - 100.0) < 1e-6 for v in same.values())
    assert abs(bleu4(["国有资产监督管理委员会负责监管"], ["国有资产监督管理委员会负责监管"]) - 100.0) < 1e-6
    assert rouge(["完全无关的句子"], ["国有资产监督管理"])["rouge1"] < 100.0
