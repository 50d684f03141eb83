"""CLI: generate streams text and prints stats; bench writes its reports; errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from soaes_specdec.cli import main


def test_generate_streams_text(tiny_qwen2_dir: Path) -> None:
    result = CliRunner().invoke(main, ["generate", "Hello there", "--target", str(tiny_qwen2_dir),
                                       "--draft-layers", "1", "--max-new-tokens", "6", "-n", "2"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output[result.output.index("{"):])
    assert stats["new_tokens"] >= 1 and "acceptance_rate" in stats


def test_generate_bad_argument_is_one_line(tiny_qwen2_dir: Path) -> None:
    result = CliRunner().invoke(main, ["generate", "Hi", "--target", str(tiny_qwen2_dir), "--draft-layers", "1",
                                       "--sample", "--top-p", "1.5"])
    assert result.exit_code == 2
    assert "error:" in result.output and "top_p" in result.output


def test_bench_command(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", "--target", str(tiny_qwen2_dir), "--draft-layers", "1",
                                       "--max-new-tokens", "4", "--max-prompts", "1", "--repeats", "1",
                                       "--warmup", "0", "--methods", "plain,speculative,hf_assisted",
                                       "--modes", "greedy", "-n", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "bench.json").exists() and (out / "bench.png").exists()
    assert "| speculative | 2 |" in result.output
