"""Sequence packing: bins of examples that fill fixed windows, and packed examples whose `position_ids`
restart at 0 for each sequence (what flash-attention varlen and block-diagonal SDPA need), so packed
training computes exactly the loss of the sequences run one by one."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

from soaes_core.errors import DataError

IGNORE_INDEX = -100


def pack_first_fit_decreasing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Bin example indices so each bin's total length is ≤ `max_length` (first-fit-decreasing).

    Deterministic: ties keep input order; bins are returned in creation order, each bin's indices in the
    order they were placed (longest first). Raises `DataError` if an example is longer than `max_length`.
    """
    if max_length <= 0:
        raise DataError(f"max_length must be positive, got {max_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # remaining capacities kept sorted with bin ids, so "first bin that fits" is a bisect over the capacity
    # ordering while first-fit order is approximated by the lowest bin id among those that fit.
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for i in order:
        n = int(lengths[i])
        if n > max_length:
            raise DataError(f"example {i} has length {n} > max_length {max_length}", field="input_ids")
        if n <= 0:
            raise DataError(f"example {i} is empty", field="input_ids")
        pos = bisect.bisect_left(free, (n, -1))
        if pos == len(free):
            bins.append([i])
            bisect.insort(free, (max_length - n, len(bins) - 1))
            continue
        # among bins that fit, take the lowest id (first fit); scan is short in practice
        best = min(range(pos, len(free)), key=lambda k: free[k][1])
        cap, b = free.pop(best)
        bins[b].append(i)
        bisect.insort(free, (cap - n, b))
    return bins


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Contract name for `pack_first_fit_decreasing`: bins of example indices, each summing ≤ max_length."""
    return pack_first_fit_decreasing(lengths, max_length)


def build_packed_example(examples: Sequence[Mapping[str, Sequence[int]]], indices: Sequence[int]) -> dict[str, Any]:
    """Concatenate `examples[i]` for `i` in `indices` into one packed example.

    Each example has `input_ids` and optionally `labels` (default: a copy of `input_ids`). Output:
    `input_ids`, `labels` (first label of every sequence set to -100, so the last token of one sequence
    never learns to predict the first token of the next), `position_ids` restarting at 0 per sequence, and
    `seq_lengths` (lengths of the concatenated sequences, for varlen attention).
    """
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    seq_lengths: list[int] = []
    for i in indices:
        ex = examples[i]
        ids = list(ex["input_ids"])
        lab = list(ex["labels"]) if "labels" in ex and ex["labels"] is not None else list(ids)
        if len(lab) != len(ids):
            raise DataError(f"example {i}: labels length {len(lab)} != input_ids length {len(ids)}",
                            field="labels")
        if not ids:
            raise DataError(f"example {i} is empty", field="input_ids")
        lab[0] = IGNORE_INDEX
        input_ids += ids
        labels += lab
        position_ids += list(range(len(ids)))
        seq_lengths.append(len(ids))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lengths": seq_lengths}


def pack_examples(examples: Sequence[Mapping[str, Sequence[int]]], max_length: int) -> list[dict[str, Any]]:
    """Pack tokenized examples into windows of at most `max_length` tokens (no padding)."""
    bins = pack([len(ex["input_ids"]) for ex in examples], max_length)
    return [build_packed_example(examples, b) for b in bins]


def packing_utilisation(bins: Sequence[Sequence[int]], lengths: Sequence[int], max_length: int) -> float:
    """Fraction of the allocated `len(bins) * max_length` token slots filled by real tokens."""
    if not bins:
        return 0.0
    return sum(int(lengths[i]) for b in bins for i in b) / (len(bins) * max_length)
