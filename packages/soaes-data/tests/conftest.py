"""Shared fixtures for soaes-data tests."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from soaes_data.templates import chat_template


def _register_sample_script() -> None:
    """`import make_samples` in these tests: the sample generator (scripts/, not in the wheel) holds the texts the
    shipped samples were made from, which the tests use as expectations."""
    if "make_samples" in sys.modules:
        return
    path = Path(__file__).resolve().parents[3] / "scripts" / "make_samples.py"
    spec = importlib.util.spec_from_file_location("make_samples", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_samples"] = module
    spec.loader.exec_module(module)


_register_sample_script()


@pytest.fixture(scope="session")
def qwen25_tokenizer(embedded_tokenizer: Any) -> Any:
    """The embedded tokenizer carrying the shipped Qwen2.5-Instruct chat template (a copy; shared one untouched)."""
    tok = copy.deepcopy(embedded_tokenizer)
    tok.chat_template = chat_template("qwen2.5")
    return tok
