"""Benchmark library: cost-model formulas, prompt loading, and a full tiny run writing json/md/png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from soaes_core import load_model, load_tokenizer
from soaes_core.config import from_dict
from soaes_core.errors import ConfigError, DataError
from soaes_specdec import bench as bench_mod
from soaes_specdec.bench import (
    BenchConfig,
    break_even_acceptance,
    expected_accepted_length,
    load_prompts,
    measure_bandwidth,
    run_benchmark,
    theoretical_speedup,
)
from soaes_specdec.draft import make_layer_draft


def test_cost_model_formulas() -> None:
    assert expected_accepted_length(0.0, 3) == 1.0
    assert expected_accepted_length(1.0, 3) == 4.0
    assert expected_accepted_length(0.5, 3) == pytest.approx(1.875)
    # Paper setting: alpha = 0.7578, n = 3.
    assert expected_accepted_length(0.7578, 3) == pytest.approx((1 - 0.7578 ** 4) / (1 - 0.7578))
    assert theoretical_speedup(0.5, 3, 0.1, 1.2) == pytest.approx(1.875 / 1.5)
    alpha = break_even_acceptance(3, 0.3, 1.3)
    assert alpha is not None and theoretical_speedup(alpha, 3, 0.3, 1.3) == pytest.approx(1.0, abs=1e-9)
    assert break_even_acceptance(3, 1.0, 1.5) is None  # a draft as slow as the target never pays off


def test_bandwidth_is_matrix_bytes_over_timed_mv(monkeypatch: pytest.MonkeyPatch) -> None:
    """GB/s = bytes of the fp32 matrix (`megabytes` of it) / median seconds of the timed matrix-vector product."""
    timed: dict[str, Any] = {}

    def fake_median_time(fn: Any, repeats: int, warmup: int = 0) -> float:
        out = fn()  # the timed call must be the product itself: one fp32 value per matrix row
        timed.update(shape=tuple(out.shape), dtype=out.dtype, repeats=repeats)
        return 0.004

    monkeypatch.setattr(bench_mod, "median_time", fake_median_time)
    n = int((16e6 / 4) ** 0.5)  # a 16 MB fp32 matrix is 2000 x 2000
    assert measure_bandwidth(megabytes=16, repeats=3) == pytest.approx(n * n * 4 / 0.004 / 1e9)  # 4 GB/s
    assert timed == {"shape": (n,), "dtype": torch.float32, "repeats": 3}


def test_load_prompts_and_errors(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_qwen2_dir)
    prompts = load_prompts(None, tok)
    assert len(prompts) >= 8 and all(p.dtype == torch.long and p.numel() > 0 for p in prompts)
    records = tmp_path / "records.jsonl"  # an SFT record's answer is not part of its prompt
    records.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                       '{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with_answer, without = load_prompts(records, tok)
    assert with_answer.tolist() == without.tolist()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_prompts(bad, tok)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="methods"):
        from_dict(BenchConfig, {"methods": ["warp_drive"]})
    with pytest.raises(ConfigError, match="top_p"):
        from_dict(BenchConfig, {"top_p": 0.0})


def test_tiny_benchmark_writes_reports(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    target = load_model(tiny_qwen2_dir, dtype=torch.float32)
    models: tuple[Any, Any, Any] = (target, make_layer_draft(target, 1), load_tokenizer(tiny_qwen2_dir))
    config = BenchConfig(target=str(tiny_qwen2_dir), max_new_tokens=6, max_prompts=2, warmup=1, repeats=1,
                         num_speculative_tokens=[2])
    report = run_benchmark(config, tmp_path, models=models)
    for name in ("bench.json", "bench.md", "bench.png", "manifest.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "bench.json").read_text())
    methods = {(r["mode"], r["method"]) for r in saved["results"]}
    assert methods == {(m, x) for m in ("greedy", "top_p") for x in config.methods}
    spec = next(r for r in report["results"] if r["method"] == "speculative" and r["mode"] == "greedy"
                and r["n"] == 2)
    assert spec["extra"]["theoretical_speedup"] > 0 and 0 <= spec["acceptance_rate"] <= 1
    assert len(spec["acceptance_by_position"]) == 2 and spec["block_sizes"] == {"2": spec["target_calls"] - 2}
    plain = next(r for r in report["results"] if r["method"] == "plain" and r["mode"] == "greedy")
    assert plain["speedup_vs_plain"] == pytest.approx(1.0) and plain["extra"]["achieved_bandwidth_gb_s"] > 0
    # the default decoder chooses n per step: its histogram of block sizes, the host and its cost table are recorded
    auto = next(r for r in report["results"] if r["method"] == "speculative" and r["mode"] == "greedy"
                and r["adaptive"])
    assert auto["n"] is None and sum(auto["block_sizes"].values()) == auto["target_calls"] - 2  # 2 prompts' prefills
    assert saved["host"]["cpu_model"] and "blas" in saved["host"]
    assert saved["cost_table"]["choice"] and set(saved["projection_paths"]) >= {"1", "2", "3"}
    md = (tmp_path / "bench.md").read_text()
    assert "| speculative | 2 |" in md and "| speculative | auto |" in md and "Host: " in md


def test_bench_paths_extends_mixes_and_samples_several_seeds(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """The cost table picks the target's path per row count (packing only where it wins; `prepack` forces packing),
    lookup_extend / lookup_mix reach the decoder, and sampling_seeds decodes every prompt once per seed in the
    sampling mode (greedy once)."""
    from soaes_specdec.runner import prepack_available

    target = load_model(tiny_qwen2_dir, dtype=torch.float32)
    models: tuple[Any, Any, Any] = (target, make_layer_draft(target, 1), load_tokenizer(tiny_qwen2_dir))
    config = BenchConfig(target=str(tiny_qwen2_dir), max_new_tokens=6, max_prompts=2, warmup=0, repeats=1,
                         num_speculative_tokens=[1], adaptive=False, methods=["plain", "speculative_lookup"],
                         lookup_tokens=3, lookup_extend=True, lookup_mix=0.5, sampling_seeds=3)
    report = run_benchmark(config, tmp_path, models=models)
    packed = sorted(int(r) for r, p in report["projection_paths"].items() if p == "prepacked")
    assert report["prepacked_rows"] == packed and (report["prepacked_bytes"] > 0) == bool(packed)
    assert report["cost_table"]["choice"]["1"] == report["projection_paths"]["1"]
    tokens = {(r["mode"], r["method"]): r["new_tokens"] for r in report["results"]}
    assert tokens[("top_p", "plain")] == 3 * tokens[("greedy", "plain")] == 3 * 2 * 6
    row = next(r for r in report["results"] if r["method"] == "speculative_lookup" and r["mode"] == "greedy")
    assert row["exact_match"] is True
    if prepack_available(torch.device("cpu"), torch.float32):
        forced = run_benchmark(BenchConfig(**{**config.__dict__, "prepack": True, "modes": ["greedy"]}),
                               tmp_path / "on", models=models)
        assert forced["prepacked_rows"] == [2, 4] and forced["cost_table"] is None
    with pytest.raises(ValueError, match=r"lookup_tokens \(3\) must exceed num_speculative_tokens \(3\)"):
        BenchConfig(methods=["speculative_lookup"], lookup_tokens=3, num_speculative_tokens=[3], lookup_extend=True)
    with pytest.raises(ValueError, match="lookup_extend must be true or false"):
        BenchConfig(lookup_extend=["greedy"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampling_seeds"):
        BenchConfig(sampling_seeds=0)
    with pytest.raises(ValueError, match="nothing to time"):
        BenchConfig(adaptive=False)


def test_reference_dtype_adds_an_interleaved_plain_baseline(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    target = load_model(tiny_qwen2_dir, dtype=torch.bfloat16)
    models: tuple[Any, Any, Any] = (target, make_layer_draft(target, 1), load_tokenizer(tiny_qwen2_dir))
    config = BenchConfig(target=str(tiny_qwen2_dir), max_new_tokens=5, max_prompts=2, warmup=0, repeats=1,
                         num_speculative_tokens=[2], modes=["greedy"], methods=["plain", "speculative"],
                         dtype="bfloat16", reference_dtype="float32")
    report = run_benchmark(config, tmp_path, models=models)
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"plain", "speculative", "plain_reference"}
    ref = rows["plain_reference"]
    assert ref["n"] is None and ref["mean_accepted_length"] is None
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)
    for name in ("plain", "speculative"):
        assert rows[name]["speedup_vs_reference"] == pytest.approx(rows[name]["tokens_per_s"] / ref["tokens_per_s"])
    assert "Against plain decoding of the target in float32" in (tmp_path / "bench.md").read_text()
    same = BenchConfig(**{**config.__dict__, "reference_dtype": "bfloat16"})  # same dtype: no extra baseline
    assert {r["method"] for r in run_benchmark(same, tmp_path / "same", models=models)["results"]} == {
        "plain", "speculative"}


def test_compare_greedy_counts_prompts_and_first_differences() -> None:
    same = bench_mod.compare_greedy([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]])
    assert same == {"exact_match": True, "mismatch_rate": 0.0, "first_difference": None}
    # prompt 0 differs at token 2, prompt 2 stops early (differs where it ends), prompt 1 equal
    diff = bench_mod.compare_greedy([[1, 2, 3, 4], [5], [6, 7, 8]], [[1, 2, 9, 4], [5], [6]])
    assert diff["exact_match"] is False and diff["mismatch_rate"] == pytest.approx(2 / 3)
    assert diff["first_difference"] == {"min": 1, "median": 1.5, "max": 2, "prompts": [0, 2]}


def test_bench_records_greedy_exactness_per_method(tiny_qwen2_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every greedy row carries exact_match / mismatch_rate against plain decoding; sampling rows say N/A; a
    decoder whose output differs is reported as such (the bench really compares, per prompt)."""
    target = load_model(tiny_qwen2_dir, dtype=torch.float32)
    models: tuple[Any, Any, Any] = (target, make_layer_draft(target, 1), load_tokenizer(tiny_qwen2_dir))
    config = BenchConfig(target=str(tiny_qwen2_dir), max_new_tokens=6, max_prompts=3, warmup=0, repeats=1,
                         num_speculative_tokens=[2], methods=["plain", "prompt_lookup", "speculative", "hf_assisted"])
    report = run_benchmark(config, tmp_path / "exact", models=models)
    saved = json.loads((tmp_path / "exact" / "bench.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    for r in saved["results"]:
        if r["mode"] == "greedy" and r["method"] != "plain":
            assert (r["exact_match"], r["mismatch_rate"], r["first_difference"]) == (True, 0.0, None), r["method"]
        else:  # sampling rows and the baseline itself
            assert r["exact_match"] is None and r["mismatch_rate"] is None
    md = (tmp_path / "exact" / "bench.md").read_text()
    assert "output = plain" in md and "| yes |" in md and "N/A (sampling)" in md

    class OffByOne(bench_mod.SpeculativeDecoder):  # changes the last new token of the second prompt only
        calls, changed_at = 0, -1

        def generate(self, *args: Any, **kwargs: Any) -> Any:
            out = super().generate(*args, **kwargs)
            OffByOne.calls += 1
            if OffByOne.calls % 3 == 2:
                out.sequences = out.sequences.clone()
                out.sequences[0, out.sequence_lengths[0] - 1] += 1
                OffByOne.changed_at = out.sequence_lengths[0] - 1 - out.prompt_lengths[0]
            return out

    monkeypatch.setattr(bench_mod, "SpeculativeDecoder", OffByOne)
    greedy = BenchConfig(**{**config.__dict__, "modes": ["greedy"], "methods": ["speculative"]})
    row = run_benchmark(greedy, tmp_path / "off", models=models)["results"][0]
    assert row["exact_match"] is False and row["mismatch_rate"] == pytest.approx(1 / 3)
    at = OffByOne.changed_at
    assert row["first_difference"] == {"min": at, "median": at, "max": at, "prompts": [1]}
    assert f"no: 33% of prompts (1), first difference at new token {at}–{at}" in (tmp_path / "off" / "bench.md"
                                                                                   ).read_text()
