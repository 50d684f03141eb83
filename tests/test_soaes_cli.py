"""Root `soaes` CLI: info reports every package, generate (soaes-specdec's, mounted) runs the embedded model, errors
are one line."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from soaes.cli import main

PACKAGES = ["soaes", "soaes-core", "soaes-data", "soaes-train", "soaes-distill", "soaes-specdec", "soaes-eval"]


def test_info_reports_all_packages_and_extras() -> None:
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert all(info["packages"][p] == md.version(p) for p in PACKAGES)
    assert set(info["optional_extras"]) >= {"deepspeed", "flash-attn", "vllm", "triton"}
    assert info["torch"]["device"] in ("cpu",) or info["torch"]["cuda_available"]
    text = CliRunner().invoke(main, ["info"]).output
    assert "embedded:smollm2-135m" in text and "soaes-specdec" in text


@pytest.mark.parametrize("module", ["soaes_core", "soaes_data", "soaes_train", "soaes_distill", "soaes_specdec",
                                    "soaes_eval"])
def test_each_package_imports_alone(module: str) -> None:
    out = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__version__)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == md.version(module.replace("_", "-"))


def test_bad_model_is_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "soaes.cli", "generate", "hi", "--target", str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: model path {tmp_path / 'x'} does not exist "
                                                  "(a spec is a local HF directory, gguf:PATH, hf:ORG/NAME or "
                                                  "embedded:{smollm2-135m})"]
    result = subprocess.run([sys.executable, "-m", "soaes.cli", "generate", "hi", "--target", "embedded:nope"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "known: smollm2-135m" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["0", "-3"])
def test_generate_max_new_tokens_below_one_is_one_clear_line(value: str) -> None:
    """`soaes generate --max-new-tokens 0 hi` is refused in one line, not a library traceback."""
    result = subprocess.run([sys.executable, "-m", "soaes.cli", "generate", "--max-new-tokens", value, "hi"],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "max_new_tokens" in lines[0], lines


@pytest.mark.slow
def test_generate_with_embedded_model(embedded_model_dir: Path) -> None:
    result = CliRunner().invoke(main, ["generate", "What is the capital of France?", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
