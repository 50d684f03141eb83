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


def test_generate_caps_num_speculative_tokens_to_max_new_tokens(tiny_qwen2_dir: Path) -> None:
    """Issue 29: -n 1000 with --max-new-tokens 8 runs as -n 7 (same text, same draft calls; it made ~7000), with
    one note on stderr."""
    def run(n: str) -> tuple[str, list[str], dict[str, object]]:
        r = CliRunner().invoke(main, ["generate", "Hello there", "--target", str(tiny_qwen2_dir), "--draft-layers", "1",
                                      "--max-new-tokens", "8", "-n", n])
        assert r.exit_code == 0, r.output
        err = r.stderr[:r.stderr.index("{")]
        stats = json.loads(r.stderr[len(err):])
        notes = [line for line in err.splitlines() if line.startswith("note:")]
        return r.stdout, notes, {k: v for k, v in stats.items() if k not in ("wall_time_s", "tokens_per_s")}

    wide, capped = run("1000"), run("7")
    assert wide[1] == ["note: -n 1000 capped to 7: --max-new-tokens 8 leaves 7 after the prompt pass's token, and a "
                       "block proposes no more than are left"]
    assert capped[1] == []
    assert wide[0] == capped[0] and wide[2] == capped[2]
    assert wide[2]["draft_calls"] <= 1 + 7 * 7


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


def test_bench_bad_block_sizes_are_one_error_line() -> None:
    """Issue 15 defect 8: `-n 3,abc` ended in a ValueError traceback."""
    result = CliRunner().invoke(main, ["bench", "-n", "3,abc"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --num-speculative-tokens[1]: expected int, got str 'abc'"]


def test_bench_max_prompts_zero_is_an_error_not_all() -> None:
    """Issue 15 defect 8: `--max-prompts 0` silently meant every prompt; unset means all, 0 is refused."""
    result = CliRunner().invoke(main, ["bench", "--max-prompts", "0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: command line: max_prompts must be >= 1 (or null for all prompts), got 0"]
    assert "Use only the first N prompts; unset = all. (default: none)" in " ".join(
        CliRunner().invoke(main, ["bench", "--help"]).output.split())


def test_a_field_added_to_bench_config_reaches_bench_options(monkeypatch, tmp_path: Path) -> None:
    """Acceptance (issue 17): a new BenchConfig field appears in `bench --help`, as an option and in --set."""
    import dataclasses
    import importlib

    from soaes_specdec import bench as bench_module
    from soaes_specdec import cli as cli_module

    @dataclasses.dataclass
    class WithNewField(bench_module.BenchConfig):
        cooldown_s: float = dataclasses.field(default=0.5, metadata={"help": "Pause between timed repeats."})

    seen = []

    def fake_run(config: WithNewField, out_dir: str) -> dict:
        seen.append(config)
        Path(out_dir, "bench.md").write_text("table\n", encoding="utf-8")
        return {"wall_time_s": 0.0}

    monkeypatch.setattr(bench_module, "BenchConfig", WithNewField)
    monkeypatch.setattr(bench_module, "run_benchmark", fake_run)
    try:
        fresh = importlib.reload(cli_module).main
        text = " ".join(CliRunner().invoke(fresh, ["bench", "--help"]).output.split())
        assert "--cooldown-s FLOAT Pause between timed repeats. (default: 0.5)" in text
        for args in (["--cooldown-s", "2"], ["--set", "cooldown_s=2"]):
            result = CliRunner().invoke(fresh, ["bench", *args, "-n", "1,2", "-o", str(tmp_path)])
            assert result.exit_code == 0, result.output
        assert [(c.cooldown_s, c.num_speculative_tokens) for c in seen] == [(2.0, [1, 2]), (2.0, [1, 2])]
    finally:
        monkeypatch.undo()
        importlib.reload(cli_module)
