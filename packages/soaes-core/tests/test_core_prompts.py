"""Prompt files (`prompt` or chat `messages`, errors naming file/line/field) and the one chat-prompt encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from soaes_core import encode_chat_prompt, read_prompt_records, read_prompts
from soaes_core.errors import DataError, InvalidArgumentError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_prompt_records(tmp_path: Path) -> None:
    f = _write(tmp_path / "p.jsonl", '{"id": "a", "prompt": "plain"}\n'
               '\n'  # blank lines are skipped; ids default to the row index, lines stay the file's
               '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, '
               '{"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}, '
               '{"role": "assistant", "content": "a2"}]}\n')
    plain, chat = read_prompt_records(f)
    assert (plain.id, plain.line, plain.text, plain.messages) == ("a", 1, "plain", None)
    assert plain.as_messages() == [{"role": "user", "content": "plain"}]
    assert (chat.id, chat.line) == (1, 3)
    assert [m["content"] for m in chat.as_messages()] == ["s", "q1", "a1", "q2"]  # the answer is not the prompt
    assert chat.user_text == "q1"
    assert read_prompts(f) == [{"id": "a", "prompt": "plain"}, {"id": 1, "prompt": "q1"}]
    assert len(read_prompt_records(f, limit=1)) == 1


@pytest.mark.parametrize(("row", "match"), [
    ('{"text": "no prompt"}', r"bad.jsonl:2: expected `prompt`"),
    ('{"messages": []}', r"bad.jsonl:2: field 'messages': `messages` must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"bad.jsonl:2: field 'messages\[0\]'"),
    ('{"messages": [{"role": "system", "content": "s"}]}', r"bad.jsonl:2: field 'messages': no user message"),
])
def test_bad_prompt_rows_name_file_line_and_field(tmp_path: Path, row: str, match: str) -> None:
    f = _write(tmp_path / "bad.jsonl", '{"prompt": "ok"}\n' + row + "\n")
    with pytest.raises(DataError, match=match):
        read_prompt_records(f)


def test_encode_chat_prompt(embedded_tokenizer: Any) -> None:
    tok = embedded_tokenizer
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "什么是国有资产？"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    expect = tok(text, add_special_tokens=False)["input_ids"]
    assert encode_chat_prompt(tok, "什么是国有资产？", system="You are terse.") == expect
    assert encode_chat_prompt(tok, msgs) == expect
    ids = encode_chat_prompt(tok, msgs[1:])
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")  # the generation prompt is added


def test_encode_chat_prompt_needs_a_template() -> None:
    class NoTemplate:
        chat_template = None

    with pytest.raises(InvalidArgumentError, match="no chat template"):
        encode_chat_prompt(NoTemplate(), "hi")
