"""Bridge to vLLM's speculative decoding: build its configuration from our settings and run the same benchmark.

vLLM pins its own torch and transformers, so it usually lives in a separate environment: nothing here imports
vLLM until `run_vllm_benchmark` is called. The configuration follows vLLM's `speculative_config` dict
(`LLM(model=..., speculative_config={"method": "draft_model", "model": ..., "num_speculative_tokens": n})`,
and `method="ngram"` with `prompt_lookup_max/min` for prompt lookup).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass
from typing import Any

from soaes_core.errors import InvalidArgumentError, SoaesError

from .sampling import SamplingParams


@dataclass(frozen=True)
class VllmSpecSettings:
    """Our speculative-decoding settings, in the terms vLLM needs."""

    target: str
    draft: str | None = None  # None = prompt lookup (vLLM "ngram")
    num_speculative_tokens: int = 3
    max_ngram: int = 3
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 1:
            raise InvalidArgumentError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.max_ngram < 1:
            raise InvalidArgumentError(f"max_ngram must be >= 1, got {self.max_ngram}")
        SamplingParams(self.do_sample, self.temperature, self.top_p, self.top_k)  # same range checks as ours


def build_speculative_config(settings: VllmSpecSettings) -> dict[str, Any]:
    """vLLM's `speculative_config` dict: a draft model, or n-gram prompt lookup when no draft is given."""
    if settings.draft is None:
        return {"method": "ngram", "num_speculative_tokens": settings.num_speculative_tokens,
                "prompt_lookup_max": settings.max_ngram, "prompt_lookup_min": 1}
    return {"method": "draft_model", "model": settings.draft, "num_speculative_tokens": settings.num_speculative_tokens}


def build_sampling_kwargs(settings: VllmSpecSettings) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams` (greedy is temperature 0; top_k -1 is off)."""
    kwargs: dict[str, Any] = {"max_tokens": settings.max_new_tokens}
    if not settings.do_sample:
        return {**kwargs, "temperature": 0.0}
    return {**kwargs, "temperature": settings.temperature, "top_p": settings.top_p,
            "top_k": settings.top_k if settings.top_k > 0 else -1}


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM path cannot run here (None when vLLM and a CUDA GPU are present)."""
    if importlib.util.find_spec("vllm") is None:
        return ("vLLM is not installed in this environment: install it in its own environment "
                "(pip install vllm; it pins its own torch) and run `soaes-specdec vllm-bench` there")
    import torch

    if not torch.cuda.is_available():
        return "vLLM speculative decoding needs a CUDA GPU; none is available"
    return None


def run_vllm_benchmark(settings: VllmSpecSettings, prompts: list[str], repeats: int = 3,
                       gpu_memory_utilization: float = 0.8) -> dict[str, Any]:
    """Tokens/s of vLLM plain vs speculative decoding on `prompts` (median of `repeats`), with the configs used."""
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise SoaesError(reason)
    import vllm

    sampling = vllm.SamplingParams(**build_sampling_kwargs(settings))
    results: dict[str, Any] = {"speculative_config": build_speculative_config(settings),
                               "sampling": build_sampling_kwargs(settings)}
    for name, spec in (("plain", None), ("speculative", results["speculative_config"])):
        llm = vllm.LLM(model=settings.target, speculative_config=spec, gpu_memory_utilization=gpu_memory_utilization,
                       enforce_eager=False)
        llm.generate(prompts[:1], sampling)  # warm-up
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, sampling)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rates.append(tokens / (time.perf_counter() - t0))
        results[name] = {"tokens_per_s": statistics.median(rates), "repeats_tokens_per_s": rates}
        del llm
    results["speedup"] = results["speculative"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
    return results
