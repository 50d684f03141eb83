"""Chat formatting with loss masks: render a conversation with the tokenizer's own chat template and train
only on assistant turns (content plus the end-of-turn token).

Assistant spans are found by rendering prefixes of the conversation (the template with and without the
generation prompt), not by `{% generation %}` markers, which stock templates such as Qwen2.5's and
SmolLM2's lack. Works with any template whose rendering of a prefix is a prefix of the full rendering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from soaes_core.errors import DataError

from .packing import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class AssistantSpan:
    """Character span [start, end) of one supervised assistant turn in the rendered text."""

    start: int
    end: int


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check `messages` is a list of `{"role", "content"}` dicts with known roles; returns plain dicts."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise DataError("expected a non-empty list of messages", field="messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(f"message {k} is not an object", field=f"messages[{k}]")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"message {k} has role {role!r}; expected one of {', '.join(ROLES)}",
                            field=f"messages[{k}].role")
        if not isinstance(content, str):
            raise DataError(f"message {k} content is {type(content).__name__}, expected str",
                            field=f"messages[{k}].content")
        out.append({"role": role, "content": content})
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises many types (e.g. templates that reject role orders)
        raise DataError(f"chat template failed: {type(err).__name__}: {err}", field="messages") from None


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The string that closes an assistant turn: `<|im_end|>` for ChatML-style templates, else eos."""
    vocab = tokenizer.get_vocab()
    for candidate in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if candidate in vocab and candidate in (tokenizer.chat_template or ""):
            return candidate
    return tokenizer.eos_token


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]], eot: str | None = None) -> tuple[str, list[
        AssistantSpan]]:
    """Render `messages`; return the text and the character span of every assistant turn to train on.

    Each span starts at the assistant content (after the header that the generation prompt renders) and
    ends after the end-of-turn token (trailing newlines after it are not trained).
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    eot = eot if eot is not None else end_of_turn_token(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], False) if i else ""
        with_prompt = _render(tokenizer, messages[:i], True) if i else ""
        through = _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(through) or not through.startswith(before):
            raise DataError(f"chat template does not render message {i} as a prefix of the conversation; "
                            "cannot locate the assistant turn", field=f"messages[{i}]")
        start = len(with_prompt) if with_prompt and through.startswith(with_prompt) else len(before)
        end = len(through)
        found = through.find(m["content"], start) if m["content"] else -1
        if found >= 0:
            start = found  # templates without a generation prompt: skip the header up to the content
        content_end = start + len(m["content"]) if found >= 0 else start
        k = through.find(eot, content_end) if eot else -1
        end = k + len(eot) if k >= 0 else len(through.rstrip())
        if end > start:
            spans.append(AssistantSpan(start, end))
    return full, spans


def _token_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_chat(tokenizer: Any, messages: Any, max_length: int | None = None) -> dict[str, list[int]]:
    """Tokenize a conversation with the tokenizer's chat template; labels are -100 except assistant turns.

    Returns `{"input_ids", "labels"}`; truncated to `max_length` tokens when given. Raises `DataError` when
    no token is supervised (no assistant turn, or every assistant turn truncated away).
    """
    msgs = validate_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("tokenizer has no chat template; set tokenizer.chat_template (see soaes_data.templates)")
    text, spans = assistant_spans(tokenizer, msgs)
    if not spans:
        raise DataError("conversation has no assistant turn to train on (zero supervised tokens)",
                        field="messages")
    if getattr(tokenizer, "is_fast", False):
        input_ids, offsets = _token_offsets(tokenizer, text)
        labels = [IGNORE_INDEX] * len(input_ids)
        k = 0
        for t, (s, _e) in enumerate(offsets):
            while k < len(spans) and s >= spans[k].end:
                k += 1
            if k < len(spans) and spans[k].start <= s < spans[k].end:
                labels[t] = input_ids[t]
    else:  # slow tokenizers have no offsets: tokenize the masked and supervised pieces separately
        input_ids, labels, pos = [], [], 0
        for span in spans:
            for piece, trained in ((text[pos:span.start], False), (text[span.start:span.end], True)):
                ids = tokenizer.encode(piece, add_special_tokens=False) if piece else []
                input_ids += ids
                labels += ids if trained else [IGNORE_INDEX] * len(ids)
            pos = span.end
        tail = tokenizer.encode(text[pos:], add_special_tokens=False) if text[pos:] else []
        input_ids += tail
        labels += [IGNORE_INDEX] * len(tail)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        raise DataError(f"zero supervised tokens after truncation to max_length={max_length}", field="messages")
    return {"input_ids": input_ids, "labels": labels}


def render_masked(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int],
                  open_mark: str = "[[", close_mark: str = "]]") -> str:
    """Decode an example with supervised stretches wrapped in `open_mark`...`close_mark` (for inspection)."""
    out: list[str] = []
    run: list[int] = []
    trained: bool | None = None
    for tok, lab in zip(input_ids, labels, strict=True):
        is_trained = lab != IGNORE_INDEX
        if trained is not None and is_trained != trained:
            out.append(_wrap(tokenizer.decode(run), trained, open_mark, close_mark))
            run = []
        run.append(tok)
        trained = is_trained
    if run:
        out.append(_wrap(tokenizer.decode(run), bool(trained), open_mark, close_mark))
    return "".join(out)


def _wrap(text: str, trained: bool, open_mark: str, close_mark: str) -> str:
    return f"{open_mark}{text}{close_mark}" if trained else text
