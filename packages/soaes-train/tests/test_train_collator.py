"""Packed and padded collators: shapes, padding segments, first-label masking, varlen boundaries."""

from __future__ import annotations

import torch

from soaes_data.packing import pack_examples
from soaes_train.collator import PackedCollator, PaddedCollator, segment_lengths

EXAMPLES = [{"input_ids": [11, 12, 13], "labels": [11, 12, 13]}, {"input_ids": [21, 22], "labels": [-100, 22]},
            {"input_ids": [31, 32, 33, 34], "labels": [31, 32, 33, 34]}]


def test_rows_layout_pads_with_a_separate_segment() -> None:
    rows = [{"input_ids": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1], "labels": [1, 2, 3, 4, 5]},
            {"input_ids": [6, 7], "labels": [6, 7]}]
    b = PackedCollator(pad_token_id=0)(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # first label of every sequence and all padding are ignored
    assert b["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, -100, -100, -100]]
    assert "attention_mask" not in b


def test_flatten_layout_joins_the_batch_with_varlen_kwargs() -> None:
    rows = pack_examples(EXAMPLES, 5)
    b = PackedCollator(pad_token_id=0, layout="flatten")(rows)
    n = sum(len(e["input_ids"]) for e in EXAMPLES)
    assert b["input_ids"].shape == (1, n)
    assert b["cu_seq_lens_q"].dtype == torch.int32
    assert b["cu_seq_lens_q"].tolist()[-1] == n
    assert sorted(torch.diff(b["cu_seq_lens_q"]).tolist()) == [2, 3, 4]
    assert b["max_length_q"] == 4
    starts = b["cu_seq_lens_q"][:-1].tolist()
    assert all(b["labels"][0, s] == -100 for s in starts)


def test_segment_lengths() -> None:
    assert segment_lengths([0, 1, 2, 0, 0, 1]) == [3, 1, 2]


def test_padded_collator_masks_padding() -> None:
    b = PaddedCollator(pad_token_id=0, pad_to_multiple_of=8)(EXAMPLES)
    assert b["input_ids"].shape == (3, 8)
    assert b["attention_mask"].sum(1).tolist() == [3, 2, 4]
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
