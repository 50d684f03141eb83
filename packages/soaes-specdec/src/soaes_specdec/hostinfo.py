"""What the host is, for results and cache keys: CPU model, the instruction-set flags that decide which kernels are
fast (AVX2, AVX-512, AVX512-BF16, AMX), the BLAS torch uses, torch's version and thread count.

The one owner of these facts: benchmarks, the bench report and the pipeline report call `host_info()`.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
"""The CPU flags recorded: the ones that decide which GEMM/GEMV kernels MKL, oneDNN and llama.cpp pick."""

CPUINFO = Path("/proc/cpuinfo")


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text ("" and an empty set when absent)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # "Features" on arm64
            flags = set(value.split())
        if model and flags:
            break
    return model, flags


def _cpu() -> tuple[str, set[str]]:
    try:
        model, flags = parse_cpuinfo(CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        model, flags = "", set()
    return model or platform.processor() or platform.machine() or "unknown", flags


def blas_info() -> dict[str, Any]:
    """Which BLAS torch was built with (MKL, OpenBLAS, ...), whether MKL and oneDNN are usable, and the CPU
    capability torch dispatches to (e.g. AVX512)."""
    config = torch.__config__.show()
    match = re.search(r"BLAS_INFO=([^,\s]+)", config)
    capability = None
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        pass
    return {"blas": match.group(1) if match else None, "mkl": torch.backends.mkl.is_available(),
            "mkldnn": torch.backends.mkldnn.is_available(), "cpu_capability": capability}


def host_info() -> dict[str, Any]:
    """The host as a JSON-ready dict: cpu_model, flags (each of `CPU_FLAGS`: bool), blas, torch, threads,
    cpu_count, platform, machine, and the GPU name when CUDA is available."""
    model, flags = _cpu()
    cuda = torch.cuda.is_available()
    return {"cpu_model": model,
            "flags": {f: f in flags for f in CPU_FLAGS},
            "blas": blas_info(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None}


def host_key() -> dict[str, Any]:
    """The part of `host_info` that decides kernel speed (what a cost measurement is keyed by)."""
    info = host_info()
    return {"cpu_model": info["cpu_model"], "flags": sorted(f for f, on in info["flags"].items() if on),
            "blas": info["blas"]["blas"], "torch": info["torch"], "threads": info["threads"]}


def format_host(info: dict[str, Any]) -> str:
    """One line naming the host, e.g. 'AMD EPYC 9R14 (avx2, avx512f, avx512_bf16), MKL, torch 2.5.1, 2 threads'."""
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if info["flags"].get(f)]
    blas = info["blas"].get("blas") or ("mkl" if info["blas"].get("mkl") else "unknown BLAS")
    return (f"{info['cpu_model']} ({', '.join(flags) or 'no AVX2'}), {blas}, torch {info['torch']}, "
            f"{info['threads']} threads")
