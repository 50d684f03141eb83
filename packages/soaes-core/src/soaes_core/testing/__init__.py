"""Test helpers shared by all soaes packages: a seeded tiny random Qwen2 saved with a real tokenizer."""

from .tiny import TINY_QWEN2_DEFAULTS, make_tiny_qwen2

__all__ = ["TINY_QWEN2_DEFAULTS", "make_tiny_qwen2"]
