"""Chat masks are exact under the SmolLM2 (ChatML) and Qwen2.5 templates, multi-turn."""

from __future__ import annotations

from typing import Any

import pytest

from soaes_core.errors import DataError
from soaes_data.chat import encode_chat, render_masked
from soaes_data.packing import IGNORE_INDEX

CONVERSATION = [
    {"role": "system", "content": "你是国有资产监管领域的专家。"},
    {"role": "user", "content": "什么是企业国有资产产权登记？"},
    {"role": "assistant", "content": "产权登记是国有资产监督管理机构对占有、使用国有资产的企业进行的登记。"},
    {"role": "user", "content": "哪些情形需要办理变动登记？\n请简要列举。"},
    {"role": "assistant", "content": "1. 企业名称改变；\n2. 国有资本额变动；\n 3. Merger or split (合并、分立)."},
    {"role": "user", "content": "谢谢"},
    {"role": "assistant", "content": "不客气！"},
]


def supervised_runs(tok: Any, ids: list[int], labels: list[int]) -> list[str]:
    """Decode each maximal run of supervised tokens."""
    runs: list[list[int]] = []
    prev = False
    for t, lab in zip(ids, labels, strict=True):
        on = lab != IGNORE_INDEX
        if on:
            if not prev:
                runs.append([])
            runs[-1].append(t)
            assert lab == t
        prev = on
    return [tok.decode(r) for r in runs]


class _SlowView:
    """Presents a tokenizer as one without offset mapping, to exercise the piecewise path."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    is_fast = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


@pytest.mark.parametrize("which", ["smollm2", "qwen2.5", "smollm2-slow-path"])
@pytest.mark.parametrize("with_system", [True, False])
def test_masks_exact_multi_turn(which: str, with_system: bool, embedded_tokenizer: Any,
                                qwen25_tokenizer: Any) -> None:
    tok = qwen25_tokenizer if which == "qwen2.5" else embedded_tokenizer
    enc_tok = _SlowView(tok) if which.endswith("slow-path") else tok
    msgs = CONVERSATION if with_system else CONVERSATION[1:]
    out = encode_chat(enc_tok, msgs)
    assert len(out["input_ids"]) == len(out["labels"])
    expected = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert supervised_runs(tok, out["input_ids"], out["labels"]) == expected
    # the tokens are exactly what the template + tokenizer give (the text training sees)
    ref = tok.apply_chat_template(msgs, tokenize=True)
    ref_ids = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
    if which != "smollm2-slow-path":
        assert out["input_ids"] == list(ref_ids)
    assert tok.decode(out["input_ids"]) == tok.apply_chat_template(msgs, tokenize=False)


def test_templates_differ_as_expected(embedded_tokenizer: Any, qwen25_tokenizer: Any) -> None:
    msgs = CONVERSATION[1:3]
    smol = embedded_tokenizer.decode(encode_chat(embedded_tokenizer, msgs)["input_ids"])
    qwen = qwen25_tokenizer.decode(encode_chat(qwen25_tokenizer, msgs)["input_ids"])
    assert "SmolLM" in smol and "You are Qwen, created by Alibaba Cloud" in qwen


def test_zero_supervised_is_error(embedded_tokenizer: Any) -> None:
    with pytest.raises(DataError, match="zero supervised"):
        encode_chat(embedded_tokenizer, CONVERSATION[:2])
    with pytest.raises(DataError, match="zero supervised tokens after truncation"):
        encode_chat(embedded_tokenizer, CONVERSATION[:3], max_length=10)


def test_truncation_keeps_prefix(embedded_tokenizer: Any) -> None:
    full = encode_chat(embedded_tokenizer, CONVERSATION)
    cut = encode_chat(embedded_tokenizer, CONVERSATION, max_length=len(full["input_ids"]) - 7)
    assert cut["input_ids"] == full["input_ids"][:-7] and cut["labels"] == full["labels"][:-7]


@pytest.mark.parametrize("bad, field", [
    ([], "messages"),
    ("hello", "messages"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user"}], "messages[0].content"),
])
def test_bad_messages_name_field(bad: Any, field: str, embedded_tokenizer: Any) -> None:
    with pytest.raises(DataError) as err:
        encode_chat(embedded_tokenizer, bad)
    assert err.value.field == field


def test_render_masked_marks_assistant(embedded_tokenizer: Any) -> None:
    out = encode_chat(embedded_tokenizer, CONVERSATION[1:3])
    text = render_masked(embedded_tokenizer, out["input_ids"], out["labels"])
    assert f"[[{CONVERSATION[2]['content']}<|im_end|>]]" in text
    assert "[[" not in text.split("assistant")[0]
