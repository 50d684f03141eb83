"""Helpers for SFT records (`messages` conversations, or plain `text`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def record_text(record: Mapping[str, Any], include_roles: tuple[str, ...] = ("system", "user", "assistant")) -> str:
    """The text of a record: its message contents (newline-joined) or its `text` field."""
    msgs = record.get("messages")
    if isinstance(msgs, list):
        return "\n".join(m["content"] for m in msgs if isinstance(m, Mapping) and m.get("role") in include_roles
                         and isinstance(m.get("content"), str))
    text = record.get("text")
    return text if isinstance(text, str) else ""
