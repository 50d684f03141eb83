"""Prompt-lookup proposals: longest matching suffix n-gram, most recent occurrence."""

from __future__ import annotations

import torch

from soaes_specdec.lookup import find_ngram_continuation, propose_ngram_continuations


def test_find_ngram_continuation() -> None:
    assert find_ngram_continuation([1, 2, 3, 4, 9, 1, 2, 3], 3, 3) == [4, 9, 1]
    assert find_ngram_continuation([5, 1, 7, 6, 1, 8, 1], 2, 3) == [8, 1]  # most recent match of [1]
    assert find_ngram_continuation([1, 2, 3], 3, 3) == []
    assert find_ngram_continuation([4], 3, 3) == []


def test_batched_proposals_pad_and_count() -> None:
    tokens = torch.tensor([[1, 2, 3, 1, 2, 0, 0], [7, 8, 9, 0, 0, 0, 0]])
    drafts, counts = propose_ngram_continuations(tokens, torch.tensor([5, 3]), torch.tensor([True, True]), 2, 3)
    assert counts.tolist() == [2, 0] and drafts.tolist() == [[3, 1], [0, 0]]
    _, none = propose_ngram_continuations(tokens, torch.tensor([5, 3]), torch.tensor([False, True]), 2, 3)
    assert none.tolist() == [0, 0]
