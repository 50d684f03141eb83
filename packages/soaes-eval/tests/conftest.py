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
    limited = run_eval(cfg)  # no limit: every sample item of the multiple-choice tasks
    return out, limited
