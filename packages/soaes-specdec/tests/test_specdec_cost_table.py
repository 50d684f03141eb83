"""The host cost table (`cost_table`): the fastest exact path per row count from given timings (prepacking only where
it wins), the issue's calibration table choosing stream_linear for 1-6 rows, interpolation of missing row counts,
measuring every path on a tiny model (each path's logits equal F.linear's up to rounding), the cache (a second load
does not measure), bad calibration files refused in one line, the `calibrate` CLI and greedy exactness with a table
applied. No wall time is asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from soaes_core.errors import ConfigError
from soaes_specdec import cost_table as ct
from soaes_specdec.cli import main as cli_main
from soaes_specdec.cost_table import CostTable, load_calibration_file, load_or_measure, measure_cost_table
from soaes_specdec.decoding import SpeculativeDecoder, autoregressive_generate
from soaes_specdec.hostinfo import host_info, parse_cpuinfo
from soaes_specdec.runner import CachedCausalLM, prepack_available
from soaes_specdec.testing import STREAM_WINS_COST_TABLE


@pytest.fixture(scope="module")
def target(qwen2_factory: Any) -> Any:
    return qwen2_factory(0, layers=2)


@pytest.fixture
def issue_file(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.yaml"
    path.write_text(STREAM_WINS_COST_TABLE, encoding="utf-8")
    return path


def test_fastest_path_per_row_count_and_prepacking_only_where_it_wins() -> None:
    table = CostTable(ms={"module": {1: 10.0, 2: 20.0, 4: 30.0}, "stream": {1: 12.0, 2: 15.0, 4: 40.0},
                          "prepacked": {1: 11.0, 2: 14.5, 4: 20.0}})
    # 1 row: F.linear; 2 rows: prepacking is 3 % faster than stream, below PREPACK_MIN_GAIN: stream; 3 rows
    # (interpolated: module 25, stream 27.5, prepacked 17.25) and 4 rows: prepacked
    assert table.choice == {1: "module", 2: "stream", 3: "prepacked", 4: "prepacked"}
    assert table.path_for(4, allowed=["module", "stream"]) == "module"  # a runner that cannot pack
    assert table.pass_ms(4) == 20.0 and table.pass_ms(4, allowed=["module", "stream"]) == 30.0
    assert table.pass_ms(3) == pytest.approx(17.25) and table.pass_ms(3, ["module", "stream"]) == pytest.approx(25.0)


def test_the_issues_table_chooses_stream_linear_for_one_to_six_rows(issue_file: Path, target: Any) -> None:
    table = load_calibration_file(issue_file)
    assert table.source == f"file:{issue_file}"
    assert table.choice == {r: "stream" for r in range(1, 7)}  # bf16 is faster at 4-6 rows but not exact
    assert table.pass_ms(3) == pytest.approx((21.1 + 28.5) / 2)
    assert table.pass_ms(5) == pytest.approx((28.5 + 43.6) / 2)
    assert table.ms_at("prepacked", 8) == pytest.approx(56.4)  # extrapolated slope never falls
    assert table.ms_at("stream", 8) == pytest.approx(43.6 + 2 * (43.6 - 28.5) / 2)
    runner = CachedCausalLM(target, linear="module")
    table = load_or_measure(runner, calibration_file=issue_file)  # a file is used instead of measuring
    assert runner.apply_cost_table(table) == {r: "stream" for r in range(1, 7)}
    assert [runner.path_for_rows(r) for r in range(1, 8)] == ["stream"] * 6 + ["module"]
    assert runner.packed_rows == [] and runner.prepacked_bytes() == 0 and runner.pass_rows(5) == 5
    assert "| **chosen** | stream | stream | stream | stream |" in table.format()
    runner.clear_prepack()
    assert runner.path_for_rows(2) == "module" and runner.cost_table is None


def test_measured_table_covers_every_path_and_each_gives_f_linears_logits(target: Any) -> None:
    runner = CachedCausalLM(target, linear="module")
    table = measure_cost_table(runner, [1, 2, 3], passes=1)
    paths = ["module", "stream"] + (["prepacked"] if prepack_available(torch.device("cpu"), torch.float32) else [])
    assert sorted(table.ms) == sorted(paths) and all(sorted(table.ms[p]) == [1, 2, 3] for p in paths)
    assert all(v > 0 for p in paths for v in table.ms[p].values())
    assert table.key["model"]["layers"] == 2 and table.key["host"]["cpu_model"] == host_info()["cpu_model"]
    assert runner.packed_rows == [] and runner.cost_table is None  # measuring leaves nothing packed or applied
    json.loads(json.dumps(table.to_dict()))
    assert CostTable.from_dict(table.to_dict()).choice == table.choice
    # every path gives the same logits up to float rounding: force each one in turn for a 3-row block
    tokens, outs = torch.tensor([[5, 9, 11, 3, 7, 2, 8]]), {}
    for path in paths:
        runner.apply_cost_table(CostTable(ms={path: {1: 1.0, 3: 1.0}}))
        assert runner.path_for_rows(3) == path and runner.packed_rows == ([1, 2, 3] if path == "prepacked" else [])
        runner.start(1, 16)
        runner.forward(tokens[:, :4], torch.tensor([0]))
        outs[path] = runner.forward(tokens[:, 4:], torch.tensor([4]))
    for path in paths:
        torch.testing.assert_close(outs[path], outs["module"], rtol=1e-4, atol=1e-4)


def test_a_second_load_uses_the_cache(target: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CachedCausalLM(target, linear="module")
    first = load_or_measure(runner, rows=[1, 2], passes=1, cache_dir=tmp_path)
    assert first.source == "measured" and len(list(tmp_path.glob("*.json"))) == 1

    def refuse(*args: Any, **kwargs: Any) -> CostTable:
        raise AssertionError("measured again")

    monkeypatch.setattr(ct, "measure_cost_table", refuse)
    again = load_or_measure(runner, rows=[1, 2], passes=1, cache_dir=tmp_path)
    assert again.source == "cache" and again.ms == first.ms
    assert load_or_measure(runner, rows=[2], cache_dir=tmp_path).source == "cache"  # a subset is covered
    monkeypatch.undo()
    wider = load_or_measure(runner, rows=[3], passes=1, cache_dir=tmp_path)  # not covered: measured with the rest
    assert wider.source == "measured" and wider.rows == [1, 2, 3]
    other = CachedCausalLM(build_other(target), linear="module")  # other shapes: another cache entry
    assert ct.cost_table_path(other, tmp_path) != ct.cost_table_path(runner, tmp_path)
    damaged = ct.cost_table_path(runner, tmp_path)
    damaged.write_text("{not json", encoding="utf-8")  # a damaged entry is measured again and rewritten
    assert load_or_measure(runner, rows=[1], passes=1, cache_dir=tmp_path).source == "measured"
    assert json.loads(damaged.read_text(encoding="utf-8"))["ms"]


def build_other(target: Any) -> Any:
    from transformers import Qwen2ForCausalLM

    config = target.config.__class__(**{**target.config.to_dict(), "intermediate_size": 96})
    torch.manual_seed(1)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("content, message", [
    ("- 1\n- 2\n", "expected a mapping with an 'ms' field, got list"),
    ("rows: [1, 2]\n", "field 'ms': expected a mapping of path -> {rows: ms}, got nothing"),
    ("ms:\n  fp64 magic: {1: 2.0}\n", "field 'ms.fp64 magic': unknown path"),
    ("ms:\n  stream: [1, 2]\n", "field 'ms.stream': expected a mapping of rows -> ms, got list"),
    ("ms:\n  stream: {one: 2.0}\n", "field 'ms.stream.one': row count must be an integer >= 1"),
    ("ms:\n  stream: {0: 2.0}\n", "field 'ms.stream.0': row count must be an integer >= 1"),
    ("ms:\n  stream: {1: -3}\n", "field 'ms.stream.1': expected a time in ms > 0, got -3"),
    ("ms:\n  stream: {1: fast}\n", "field 'ms.stream.1': expected a time in ms > 0, got 'fast'"),
    ("ms:\n  stream: {1: 2.0}\n  stream_linear: {1: 2.0}\n", "field 'ms.stream_linear': path 'stream' given twice"),
    ("ms:\n  bf16 F.linear: {1: 2.0}\n", "no exact path"),
    ("ms: {stream: {1: 2.0}\n", "invalid YAML"),
])
def test_bad_calibration_files_are_refused_in_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_calibration_file(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_calibrate_cli_prints_the_table(tiny_qwen2_dir: Path, issue_file: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOAES_CACHE", str(tmp_path / "cache"))
    cli = CliRunner()
    res = cli.invoke(cli_main, ["calibrate", str(tiny_qwen2_dir), "--calibration-file", str(issue_file)])
    assert res.exit_code == 0, res.output
    assert "1: stream, 2: stream, 3: stream, 4: stream, 5: stream, 6: stream" in res.output
    assert f"host: {host_info()['cpu_model']}" in res.output
    out = tmp_path / "table.json"
    res = cli.invoke(cli_main, ["calibrate", str(tiny_qwen2_dir), "--rows", "1,2", "--passes", "1", "--json",
                                "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["table"]["source"] == "measured" and sorted(report["table"]["ms"]["module"]) == ["1", "2"]
    assert Path(report["cache_file"]).is_file() and Path(report["cache_file"]).is_relative_to(tmp_path / "cache")
    assert load_calibration_file(out).ms == CostTable.from_dict(report["table"]).ms  # --out feeds a later run
    res = cli.invoke(cli_main, ["calibrate", str(tiny_qwen2_dir), "--rows", "0"])
    assert res.exit_code == 2 and "rows: row counts must be >= 1" in res.output
    res = cli.invoke(cli_main, ["calibrate", "x", "--calibration-file", str(tmp_path / "none.yaml")])
    assert res.exit_code == 2 and "no such config file" in res.output


def test_greedy_with_the_issues_table_applied_equals_plain(issue_file: Path, target: Any, qwen2_factory: Any) -> None:
    runner = CachedCausalLM(target, linear="module")
    runner.apply_cost_table(load_calibration_file(issue_file))
    draft = qwen2_factory(0, layers=1)
    prompt = torch.tensor([[3, 17, 42, 99, 5, 17, 42]])
    plain = autoregressive_generate(CachedCausalLM(target, linear="module"), prompt, 24)
    spec = SpeculativeDecoder(runner, draft, 3).generate(prompt, 24)
    assert spec.sequences.tolist() == plain.sequences.tolist()


def test_cpuinfo_parsing() -> None:
    text = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\n"
    assert parse_cpuinfo(text) == ("AMD EPYC 9R14", {"fpu", "avx2", "avx512f", "avx512_bf16"})
    info = host_info()
    assert set(info["flags"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert info["torch"] == torch.__version__ and info["threads"] == torch.get_num_threads()
    assert info["blas"]["mkl"] == torch.backends.mkl.is_available()
