"""vLLM bridge: config building on CPU, a clear error without vLLM/GPU, and a GPU run when possible."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from soaes_core.errors import InvalidArgumentError, SoaesError
from soaes_specdec.vllm_bridge import (
    VllmSpecSettings,
    build_sampling_kwargs,
    build_speculative_config,
    run_vllm_benchmark,
    vllm_unavailable_reason,
)


def test_module_does_not_import_vllm() -> None:
    assert "vllm" not in sys.modules or importlib.util.find_spec("vllm") is not None


def test_draft_model_and_ngram_configs() -> None:
    spec = build_speculative_config(VllmSpecSettings("Qwen/Qwen2.5-72B-Instruct", "Qwen/Qwen2.5-7B-Instruct", 3))
    assert spec == {"method": "draft_model", "model": "Qwen/Qwen2.5-7B-Instruct", "num_speculative_tokens": 3}
    ngram = build_speculative_config(VllmSpecSettings("t", None, 4, max_ngram=2))
    assert ngram == {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2, "prompt_lookup_min": 1}


def test_sampling_kwargs() -> None:
    assert build_sampling_kwargs(VllmSpecSettings("t", max_new_tokens=64)) == {"max_tokens": 64, "temperature": 0.0}
    sampled = build_sampling_kwargs(VllmSpecSettings("t", do_sample=True, top_p=0.7, temperature=0.9))
    assert sampled == {"max_tokens": 128, "temperature": 0.9, "top_p": 0.7, "top_k": -1}


@pytest.mark.parametrize("kwargs", [{"num_speculative_tokens": 0}, {"do_sample": True, "top_p": 0.0},
                                    {"do_sample": True, "temperature": 0.0}])
def test_settings_validate(kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        VllmSpecSettings("t", **kwargs)


def test_clear_error_without_vllm_or_gpu() -> None:
    reason = vllm_unavailable_reason()
    if reason is None:
        pytest.skip("vLLM and a GPU are present")
    with pytest.raises(SoaesError, match="vLLM") as err:
        run_vllm_benchmark(VllmSpecSettings("t", "d"), ["hi"])
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_vllm_speculative_run(embedded_model_dir) -> None:
    if vllm_unavailable_reason() is not None:
        pytest.skip(vllm_unavailable_reason())
    settings = VllmSpecSettings(str(embedded_model_dir), str(embedded_model_dir), 3, max_new_tokens=32)
    result = run_vllm_benchmark(settings, ["The capital of France is"], repeats=1, gpu_memory_utilization=0.3)
    assert result["speculative"]["tokens_per_s"] > 0 and result["plain"]["tokens_per_s"] > 0


def test_vllm_bench_command_explains_missing_vllm() -> None:
    from click.testing import CliRunner

    from soaes_specdec.cli import main

    if vllm_unavailable_reason() is None:
        pytest.skip("vLLM and a GPU are present")
    result = CliRunner().invoke(main, ["vllm-bench", "--target", "t", "--draft", "d"])
    assert result.exit_code != 0 and "vLLM" in result.output
