"""scripts/gpu_check.sh --dry-run on the CPU: every step is listed with its budget, the budgets fit 10 minutes, and
every script and test file a command names exists."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["environment", "cuda_tests", "feature_draft_bf16", "flash_attn", "kernel_sweep", "demo_cuda_bf16"]
LINE = re.compile(r"^step (\w+) budget=(\d+)s(?: \[if (\w+) imports\])?: (.+)$")


@pytest.fixture(scope="module")
def dry_run() -> list[re.Match[str]]:
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1].startswith(f"dry run: {len(STEPS)} steps"), lines[-1]
    matches = [LINE.match(line) for line in lines[:-1]]
    assert all(matches), lines
    return [m for m in matches if m]


def test_every_step_is_listed_within_ten_minutes(dry_run: list[re.Match[str]]) -> None:
    assert [m.group(1) for m in dry_run] == STEPS
    assert sum(int(m.group(2)) for m in dry_run) <= 600
    conditional = {m.group(1): m.group(3) for m in dry_run if m.group(3)}
    assert conditional == {"flash_attn": "flash_attn", "kernel_sweep": "triton"}


def test_named_paths_exist(dry_run: list[re.Match[str]]) -> None:
    named = []
    for m in dry_run:
        for token in shlex.split(m.group(4).replace("&&", " ")):
            path = token.split("::")[0]
            if re.match(r"^(packages|benchmarks|scripts|src|tests)/", path):
                named.append(path)
                assert (ROOT / path).exists(), f"step {m.group(1)} names {path}, which does not exist"
    assert "benchmarks/specdec/kernel_bench.py" in named
    assert "packages/soaes-specdec/tests/test_specdec_cuda.py" in named


def test_what_each_step_selects(dry_run: list[re.Match[str]]) -> None:
    cmd = {m.group(1): m.group(4) for m in dry_run}
    assert "-m gpu" in cmd["cuda_tests"] and "-k 'mixed_precision and cuda'" in cmd["feature_draft_bf16"]
    assert "-k flash_attention_2" in cmd["flash_attn"]
    demo = cmd["demo_cuda_bf16"]
    assert "pipeline run demo --quick" in demo
    assert "placement.device=cuda" in demo and "placement.dtype=bfloat16" in demo
    assert "stages=[teacher_data, distill_draft, specdec_bench]" in demo
    assert "docs/bench/gpu_kernel_sweep.json" in cmd["kernel_sweep"] and "docs/bench/gpu_demo_bench.json" in demo


def test_bad_argument_exits_2() -> None:
    r = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown argument --fast (use --dry-run, --out DIR)"
