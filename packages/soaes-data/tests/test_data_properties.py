"""Property-based tests (hypothesis) of the invariants training relies on: packing places every example exactly
once within capacity, packed rows keep their sequences apart, and chat masks supervise exactly the assistant
turns."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from soaes_core.errors import DataError
from soaes_data.chat import encode_chat
from soaes_data.packing import IGNORE_INDEX, build_packed_example, pack, pack_cpt, pack_examples

FAST = settings(max_examples=60, deadline=None)
# chat cases render the template several times each: fewer examples (the session tokenizer is shared, read-only)
CHAT = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

max_lengths = st.integers(min_value=1, max_value=64)


@st.composite
def lengths_and_capacity(draw: Any) -> tuple[list[int], int]:
    cap = draw(max_lengths)
    return draw(st.lists(st.integers(min_value=1, max_value=cap), max_size=60)), cap


# ---- pack: bins of example indices -------------------------------------------------------------------------

@FAST
@given(lengths_and_capacity())
def test_pack_places_every_example_once_within_capacity(case: tuple[list[int], int]) -> None:
    lengths, cap = case
    bins = pack(lengths, cap)
    placed = [i for b in bins for i in b]
    assert sorted(placed) == list(range(len(lengths)))  # every example exactly once: no loss, no overlap
    assert all(b for b in bins)  # no empty bin
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)  # capacity respected
    # first fit leaves at most one bin half empty, so it never uses more than twice the optimum
    assert len(bins) <= max(1, 2 * -(-sum(lengths) // cap))
    assert pack(lengths, cap) == bins  # deterministic


@FAST
@given(lengths_and_capacity(), st.integers(min_value=1, max_value=20))
def test_pack_refuses_an_example_longer_than_capacity(case: tuple[list[int], int], extra: int) -> None:
    lengths, cap = case
    with pytest.raises(DataError, match=f"> max_length {cap}"):
        pack([*lengths, cap + extra], cap)


# ---- packed examples: concatenation, labels, position ids ---------------------------------------------------

@st.composite
def tokenized_examples(draw: Any) -> tuple[list[dict[str, list[int]]], int]:
    cap = draw(st.integers(min_value=2, max_value=48))
    n = draw(st.integers(min_value=0, max_value=20))
    exs = []
    for _ in range(n):
        ids = draw(st.lists(st.integers(min_value=0, max_value=50_000), min_size=1, max_size=cap))
        labels = draw(st.lists(st.one_of(st.just(IGNORE_INDEX), st.integers(0, 50_000)),
                               min_size=len(ids), max_size=len(ids)))
        exs.append({"input_ids": ids, "labels": labels})
    return exs, cap


@FAST
@given(tokenized_examples())
def test_packed_rows_hold_each_sequence_once_and_apart(case: tuple[list[dict[str, list[int]]], int]) -> None:
    examples, cap = case
    rows = pack_examples(examples, cap)
    seen: list[tuple[int, ...]] = []
    for row in rows:
        n = len(row["input_ids"])
        assert n <= cap and len(row["labels"]) == len(row["position_ids"]) == n == sum(row["seq_lengths"])
        start = 0
        for length in row["seq_lengths"]:
            ids = row["input_ids"][start:start + length]
            assert row["position_ids"][start:start + length] == list(range(length))  # restart per sequence
            assert row["labels"][start] == IGNORE_INDEX  # never learn the next sequence's first token
            seen.append(tuple(ids))
            start += length
    # every example's tokens appear exactly once (as a multiset of sequences)
    assert sorted(seen) == sorted(tuple(ex["input_ids"]) for ex in examples)
    # labels are the example's own labels except the forced first one
    by_ids: dict[tuple[int, ...], list[list[int]]] = {}
    for ex in examples:
        by_ids.setdefault(tuple(ex["input_ids"]), []).append([IGNORE_INDEX, *ex["labels"][1:]])
    for row in rows:
        start = 0
        for length in row["seq_lengths"]:
            key = tuple(row["input_ids"][start:start + length])
            assert row["labels"][start:start + length] in by_ids[key]
            start += length


@FAST
@given(tokenized_examples())
def test_build_packed_example_keeps_order_of_indices(case: tuple[list[dict[str, list[int]]], int]) -> None:
    examples, _ = case
    assume(examples)
    order = list(reversed(range(len(examples))))
    row = build_packed_example(examples, order)
    assert row["input_ids"] == [t for i in order for t in examples[i]["input_ids"]]
    assert row["seq_lengths"] == [len(examples[i]["input_ids"]) for i in order]


@FAST
@given(st.lists(st.lists(st.integers(min_value=0, max_value=999), max_size=40), max_size=12),
       st.integers(min_value=1, max_value=32), st.booleans(), st.booleans())
def test_pack_cpt_every_token_once_windows_full(docs: list[list[int]], cap: int, separate: bool,
                                                drop_remainder: bool) -> None:
    eos = 1000
    windows = list(pack_cpt(docs, cap, eos, separate_documents=separate, drop_remainder=drop_remainder))
    stream = [t for d in docs for t in (*d, eos)]
    flat = [t for w in windows for t in w["input_ids"]]
    if drop_remainder:
        assert flat == stream[:len(stream) - len(stream) % cap]
        assert all(len(w["input_ids"]) == cap for w in windows)
    else:
        assert flat == stream  # every token once, in order
        assert all(len(w["input_ids"]) == cap for w in windows[:-1]) and all(w["input_ids"] for w in windows)
    for w in windows:
        assert sum(w["seq_lengths"]) == len(w["input_ids"]) == len(w["labels"]) == len(w["position_ids"])
        start = 0
        for length in w["seq_lengths"]:
            assert w["position_ids"][start:start + length] == list(range(length))
            assert w["labels"][start] == IGNORE_INDEX
            assert w["labels"][start + 1:start + length] == w["input_ids"][start + 1:start + length]
            start += length
        if separate:  # a segment never runs past an EOS: documents do not attend to each other
            start = 0
            for length in w["seq_lengths"]:
                assert eos not in w["input_ids"][start:start + length - 1]
                start += length


# ---- chat masks -----------------------------------------------------------------------------------------------

# Assistant text is letters/CJK and user/system text is digits, so a supervised digit would be a leak.
assistant_text = st.text(alphabet=st.sampled_from([*"abcdefghij国有资产监管", " ", "\n"]), min_size=1,
                         max_size=30).filter(lambda s: s.strip() == s and s)
other_text = st.text(alphabet=st.sampled_from([*"0123456789", " "]), min_size=1, max_size=20)


@st.composite
def conversations(draw: Any) -> list[dict[str, str]]:
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(other_text)})
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        msgs.append({"role": "user", "content": draw(other_text)})
        msgs.append({"role": "assistant", "content": draw(assistant_text)})
    return msgs


def _runs(tok: Any, ids: list[int], labels: list[int]) -> list[str]:
    runs: list[list[int]] = []
    prev = False
    for t, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            if not prev:
                runs.append([])
            runs[-1].append(t)
        prev = lab != IGNORE_INDEX
    return [tok.decode(r) for r in runs]


@CHAT
@given(conversations())
def test_chat_mask_supervises_exactly_the_assistant_turns(embedded_tokenizer: Any, msgs: list[dict[str, str]]) -> None:
    out = encode_chat(embedded_tokenizer, msgs)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels, strict=True))  # a label is its token or -100
    assert embedded_tokenizer.decode(ids) == embedded_tokenizer.apply_chat_template(msgs, tokenize=False)
    expected = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert _runs(embedded_tokenizer, ids, labels) == expected


@CHAT
@given(conversations(), st.integers(min_value=1, max_value=200))
def test_chat_truncation_is_a_prefix(embedded_tokenizer: Any, msgs: list[dict[str, str]], max_length: int) -> None:
    full = encode_chat(embedded_tokenizer, msgs)
    try:
        cut = encode_chat(embedded_tokenizer, msgs, max_length=max_length)
    except DataError as err:
        assert "zero supervised tokens after truncation" in str(err)
        assert all(lab == IGNORE_INDEX for lab in full["labels"][:max_length])
        return
    assert cut["input_ids"] == full["input_ids"][:max_length] and cut["labels"] == full["labels"][:max_length]
