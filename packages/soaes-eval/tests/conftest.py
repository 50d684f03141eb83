"""Shared fixtures for soaes-eval tests: one real lm-eval run on the tiny model, reused by several tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_mc_run(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """soaes_cmmlu + soaes_ceval (all sample items) and soaes_domain_qa (3 items) with lm-eval's `hf` model."""
    from soaes_eval.runner import EvalRunConfig, run_eval
    from soaes_eval.tasks import SAMPLES_DIR

    out = tmp_path_factory.mktemp("tiny_mc_run")
    cfg = EvalRunConfig(tasks=["soaes_cmmlu", "soaes_ceval", "soaes_domain_qa"], model=str(tiny_qwen2_dir),
                        output_dir=str(out), data_dir=str(SAMPLES_DIR), batch_size=32, max_gen_toks=12,
                        name="tiny-base", stage="base")
    return out, run_eval(cfg)  # no limit: every sample item of the multiple-choice tasks


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different (seed 1, one layer) tiny Qwen2 sharing the target's tokenizer: a real draft that disagrees."""
    from soaes_core.testing import make_tiny_qwen2

    out = tmp_path_factory.mktemp("tiny_draft")
    make_tiny_qwen2(out, seed=1, num_hidden_layers=1)
    return out


@pytest.fixture(scope="session")
def domain_runs(tiny_qwen2_dir: Path, tiny_draft_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """soaes_domain_qa (4 items, 24 new tokens) with the same tiny target through four generation paths:
    lm-eval `hf`, soaes-specdec with the tiny draft, with a layer draft, and autoregressive (no draft)."""
    pytest.importorskip("soaes_specdec")
    from soaes_eval.runner import EvalRunConfig, run_eval
    from soaes_eval.tasks import SAMPLES_DIR

    root = tmp_path_factory.mktemp("domain_runs")
    variants: dict[str, dict[str, Any]] = {
        "hf": {"stage": "stage-2 SFT"},
        "specdec": {"draft": str(tiny_draft_dir), "num_speculative_tokens": 3},
        "layer": {"draft": "layers:1"},
        "ar": {"backend": "specdec"},
    }
    runs = {}
    for name, kw in variants.items():
        cfg = EvalRunConfig(tasks=["soaes_domain_qa"], model=str(tiny_qwen2_dir), output_dir=str(root / name),
                            data_dir=str(SAMPLES_DIR), limit=4, max_gen_toks=24, batch_size=1, name=name, **kw)
        runs[name] = (root / name, run_eval(cfg))
    return runs


@pytest.fixture(scope="session")
def cli_general_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[str]]:
    """`soaes-eval run` (the CLI) on another tiny model (seed 2): soaes_cmmlu + soaes_ceval on every sample item."""
    from click.testing import CliRunner

    from soaes_core.testing import make_tiny_qwen2
    from soaes_eval.cli import main
    from soaes_eval.tasks import SAMPLES_DIR

    model = tmp_path_factory.mktemp("tiny_seed2")
    make_tiny_qwen2(model, seed=2)
    out = tmp_path_factory.mktemp("cli_general_run")
    args = ["run", "--model", str(model), "--tasks", "soaes_cmmlu,soaes_ceval", "--data-dir", str(SAMPLES_DIR),
            "--name", "tiny-cpt", "--stage", "cpt", "--batch-size", "32", "--cache", str(out / "cache" / "lm"),
            "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.output, args
