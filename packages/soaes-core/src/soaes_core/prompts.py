"""Prompts for generation: reading prompt files (JSONL) and encoding a chat prompt through a tokenizer's template.

One place for both, so the benchmark, the distillation experiment, the CLIs and the demos read the same
records the same way and hand the model the same token ids.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, InvalidArgumentError
from .jsonl import iter_jsonl

Message = Mapping[str, Any]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt-file row: a plain `prompt` string, or chat `messages` (trailing assistant turns dropped)."""

    id: Any
    line: int
    text: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None

    @property
    def user_text(self) -> str:
        """The `prompt` string, or the content of the first user turn."""
        if self.text is not None:
            return self.text
        assert self.messages is not None
        return next(m["content"] for m in self.messages if m["role"] == "user")

    def as_messages(self) -> list[dict[str, Any]]:
        """The chat turns to encode: the record's messages, or the `prompt` string as one user turn."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.text}]


def _parse_messages(value: Any, path: Path, line: int) -> tuple[dict[str, Any], ...]:
    """Validated chat turns without the trailing assistant answer(s) (SFT / held-out rows serve as prompts)."""
    if not isinstance(value, list) or not value:
        raise DataError("`messages` must be a non-empty list", path=str(path), line=line, field="messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError("each message needs string `role` and `content`", path=str(path), line=line,
                            field=f"messages[{i}]")
    messages = list(value)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not any(m["role"] == "user" for m in messages):
        raise DataError("no user message before the answer", path=str(path), line=line, field="messages")
    return tuple(messages)


def read_prompt_records(path: str | os.PathLike[str], limit: int = 0) -> list[PromptRecord]:
    """Rows of a prompt JSONL file, each with a `prompt` string or chat `messages` (and an optional `id`; by
    default the row's index). Bad rows raise `DataError` naming file, line and field. `limit` > 0 stops early."""
    path = Path(path)
    out: list[PromptRecord] = []
    for index, rec in enumerate(iter_jsonl(path)):
        data = rec.data
        if isinstance(data.get("prompt"), str):
            out.append(PromptRecord(data.get("id", index), rec.line, text=data["prompt"]))
        elif "messages" in data:
            out.append(PromptRecord(data.get("id", index), rec.line,
                                    messages=_parse_messages(data["messages"], path, rec.line)))
        else:
            raise DataError("expected `prompt` (string) or `messages` (list)", path=str(path), line=rec.line)
        if limit and len(out) >= limit:
            break
    return out


def read_prompts(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """`{"id", "prompt"}` per row: the `prompt` string, or the first user turn of chat `messages`."""
    return [{"id": r.id, "prompt": r.user_text} for r in read_prompt_records(path)]


def encode_chat_prompt(tokenizer: Any, prompt: str | Sequence[Message], system: str | None = None) -> list[int]:
    """Token ids of a prompt for generation: `prompt` (a user message, or a list of chat turns) after an optional
    `system` turn, rendered by the tokenizer's chat template with the generation prompt (assistant header) added."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError("the tokenizer has no chat template; encode the prompt as plain text instead")
    messages: list[Message] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]
