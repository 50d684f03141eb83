"""Sequence packing: bins of examples that fill fixed windows, and packed examples whose `position_ids`
restart at 0 for each sequence (what flash-attention varlen and block-diagonal SDPA need), so packed
training computes exactly the loss of the sequences run one by one."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from soaes_core.errors import DataError

IGNORE_INDEX = -100


class _MaxTree:
    """Segment tree over bin capacities: leftmost bin with capacity >= n in O(log bins)."""

    def __init__(self) -> None:
        self.size = 1
        self.tree = [0] * 2
        self.count = 0

    def _grow(self) -> None:
        old_leaves = self.tree[self.size:]
        self.size *= 2
        self.tree = [0] * (2 * self.size)
        self.tree[self.size:self.size + len(old_leaves)] = old_leaves
        for k in range(self.size - 1, 0, -1):
            self.tree[k] = max(self.tree[2 * k], self.tree[2 * k + 1])

    def append(self, cap: int) -> int:
        if self.count == self.size:
            self._grow()
        self.count += 1
        self.set(self.count - 1, cap)
        return self.count - 1

    def set(self, i: int, cap: int) -> None:
        k = i + self.size
        self.tree[k] = cap
        k //= 2
        while k:
            self.tree[k] = max(self.tree[2 * k], self.tree[2 * k + 1])
            k //= 2

    def first_at_least(self, n: int) -> int:
        if self.tree[1] < n:
            return -1
        k = 1
        while k < self.size:
            k = 2 * k if self.tree[2 * k] >= n else 2 * k + 1
        return k - self.size


def pack_first_fit_decreasing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Bin example indices so each bin's total length is ≤ `max_length` (first-fit-decreasing).

    Deterministic: ties keep input order; bins are returned in creation order, each bin's indices in the
    order they were placed (longest first). Exact first fit (the lowest-numbered bin with room), found with a
    segment tree so 10^5–10^6 examples pack in seconds. Raises `DataError` if an example is longer than
    `max_length` or empty.
    """
    if max_length <= 0:
        raise DataError(f"max_length must be positive, got {max_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    caps: list[int] = []
    tree = _MaxTree()
    for i in order:
        n = int(lengths[i])
        if n > max_length:
            raise DataError(f"example {i} has length {n} > max_length {max_length}", field="input_ids")
        if n <= 0:
            raise DataError(f"example {i} is empty", field="input_ids")
        b = tree.first_at_least(n)
        if b < 0:
            bins.append([i])
            caps.append(max_length - n)
            tree.append(max_length - n)
            continue
        bins[b].append(i)
        caps[b] -= n
        tree.set(b, caps[b])
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


@dataclass(frozen=True)
class PackingStats:
    """How well a packing fills its windows."""

    num_sequences: int
    num_bins: int
    real_tokens: int
    capacity_tokens: int
    utilisation: float
    mean_sequences_per_bin: float
    min_bin_fill: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def packing_stats(bins: Sequence[Sequence[int]], lengths: Sequence[int], max_length: int) -> PackingStats:
    """Utilisation and shape statistics of `bins` (as returned by `pack`)."""
    fills = [sum(int(lengths[i]) for i in b) for b in bins]
    real = sum(fills)
    cap = len(bins) * max_length
    return PackingStats(
        num_sequences=sum(len(b) for b in bins), num_bins=len(bins), real_tokens=real, capacity_tokens=cap,
        utilisation=real / cap if cap else 0.0,
        mean_sequences_per_bin=(sum(len(b) for b in bins) / len(bins)) if bins else 0.0,
        min_bin_fill=(min(fills) / max_length) if fills else 0.0)


def pack_cpt(documents: Iterable[Sequence[int]], max_length: int, eos_token_id: int, *,
             separate_documents: bool = True, drop_remainder: bool = False) -> Iterator[dict[str, Any]]:
    """Continued-pre-training packing: join documents, each followed by EOS, and cut into `max_length` windows.

    With `separate_documents=True` each document (or piece of one cut by a window edge) is its own segment:
    `position_ids` restart at 0 and its first label is -100, so documents never attend to each other under
    varlen / block-diagonal attention. With `False` a window is one segment (position_ids 0..L-1), the
    classic GPT-style concatenation. The last, shorter window is kept unless `drop_remainder`.
    Yields dicts with `input_ids`, `labels`, `position_ids`, `seq_lengths`.
    """
    if max_length <= 0:
        raise DataError(f"max_length must be positive, got {max_length}")
    window: list[int] = []
    segments: list[int] = []  # lengths of document pieces in the current window

    def emit() -> dict[str, Any]:
        seqs = segments if separate_documents else [len(window)]
        labels, position_ids, pos = list(window), [], 0
        for n in seqs:
            labels[pos] = IGNORE_INDEX
            position_ids += range(n)
            pos += n
        return {"input_ids": list(window), "labels": labels, "position_ids": position_ids,
                "seq_lengths": list(seqs)}

    for doc in documents:
        tokens = [*doc, eos_token_id]
        while tokens:
            room = max_length - len(window)
            piece, tokens = tokens[:room], tokens[room:]
            window += piece
            segments.append(len(piece))
            if len(window) == max_length:
                yield emit()
                window, segments = [], []
    if window and not drop_remainder:
        yield emit()
