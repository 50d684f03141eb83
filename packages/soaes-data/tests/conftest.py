"""Shared fixtures for soaes-data tests."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from soaes_data.templates import chat_template


@pytest.fixture(scope="session")
def qwen25_tokenizer(embedded_tokenizer: Any) -> Any:
    """The embedded tokenizer carrying the shipped Qwen2.5-Instruct chat template (a copy; shared one untouched)."""
    tok = copy.deepcopy(embedded_tokenizer)
    tok.chat_template = chat_template("qwen2.5")
    return tok
