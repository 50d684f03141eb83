"""Packing: exact first-fit-decreasing, packed-example boundaries, CPT chunking, utilisation statistics."""

from __future__ import annotations

import random

import pytest

from soaes_core.errors import DataError
from soaes_data.packing import (
    IGNORE_INDEX,
    build_packed_example,
    pack,
    pack_cpt,
    pack_examples,
    packing_stats,
    packing_utilisation,
)


def reference_ffd(lengths: list[int], max_length: int) -> list[list[int]]:
    """Textbook O(n·bins) first-fit-decreasing."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_length:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_ffd_equals_reference(seed: int) -> None:
    rng = random.Random(seed)
    max_length = rng.choice([16, 100, 2048])
    lengths = [rng.randint(1, max_length) for _ in range(rng.randint(1, 400))]
    bins = pack(lengths, max_length)
    assert bins == reference_ffd(lengths, max_length)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= max_length for b in bins)


def test_pack_errors() -> None:
    with pytest.raises(DataError, match="> max_length"):
        pack([3, 9], 8)
    with pytest.raises(DataError, match="empty"):
        pack([3, 0], 8)
    with pytest.raises(DataError, match="positive"):
        pack([3], 0)


def test_build_packed_example_exact() -> None:
    examples = [
        {"input_ids": [10, 11, 12], "labels": [IGNORE_INDEX, 11, 12]},
        {"input_ids": [20, 21], "labels": [20, 21]},
        {"input_ids": [30, 31, 32, 33]},
    ]
    out = build_packed_example(examples, [2, 0, 1])
    assert out == {
        "input_ids": [30, 31, 32, 33, 10, 11, 12, 20, 21],
        "labels": [IGNORE_INDEX, 31, 32, 33, IGNORE_INDEX, 11, 12, IGNORE_INDEX, 21],
        "position_ids": [0, 1, 2, 3, 0, 1, 2, 0, 1],
        "seq_lengths": [4, 3, 2],
    }
    with pytest.raises(DataError, match="labels length"):
        build_packed_example([{"input_ids": [1, 2], "labels": [1]}], [0])


def test_pack_examples_round_trip() -> None:
    rng = random.Random(0)
    examples = [{"input_ids": [rng.randrange(1000) for _ in range(rng.randint(1, 50))]} for _ in range(60)]
    for ex in examples:
        ex["labels"] = [IGNORE_INDEX if rng.random() < 0.3 else t for t in ex["input_ids"]]
    packed = pack_examples(examples, 128)
    seen = []
    for row in packed:
        assert len(row["input_ids"]) <= 128 and sum(row["seq_lengths"]) == len(row["input_ids"])
        start = 0
        for n in row["seq_lengths"]:
            seg = row["input_ids"][start:start + n]
            j = next(k for k, ex in enumerate(examples) if ex["input_ids"] == seg and k not in seen)
            seen.append(j)
            assert row["position_ids"][start:start + n] == list(range(n))
            assert row["labels"][start] == IGNORE_INDEX
            assert row["labels"][start + 1:start + n] == examples[j]["labels"][1:]
            start += n
    assert sorted(seen) == list(range(60))


def test_pack_cpt_separate_documents_exact() -> None:
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    eos = 0
    rows = list(pack_cpt(docs, 4, eos, separate_documents=True))
    # stream: 1 2 3 0 | 4 5 0 6 | 7 8 9 10 | 0
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10], [0]]
    assert [r["seq_lengths"] for r in rows] == [[4], [3, 1], [4], [1]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3], [0]]
    assert [r["labels"] for r in rows] == [[IGNORE_INDEX, 2, 3, 0], [IGNORE_INDEX, 5, 0, IGNORE_INDEX],
                                           [IGNORE_INDEX, 8, 9, 10], [IGNORE_INDEX]]
    dropped = list(pack_cpt(docs, 4, eos, drop_remainder=True))
    assert len(dropped) == 3


def test_pack_cpt_concatenated() -> None:
    rows = list(pack_cpt([[1, 2, 3], [4, 5]], 4, 0, separate_documents=False))
    assert rows[0] == {"input_ids": [1, 2, 3, 0], "labels": [IGNORE_INDEX, 2, 3, 0],
                       "position_ids": [0, 1, 2, 3], "seq_lengths": [4]}
    assert rows[1]["input_ids"] == [4, 5, 0] and rows[1]["position_ids"] == [0, 1, 2]
    # every token of the corpus appears exactly once, in order
    rng = random.Random(1)
    docs = [[rng.randrange(1, 99) for _ in range(rng.randint(1, 30))] for _ in range(50)]
    stream = [t for d in docs for t in [*d, 0]]
    for sep in (True, False):
        got = [t for r in pack_cpt(docs, 16, 0, separate_documents=sep) for t in r["input_ids"]]
        assert got == stream


def test_stats() -> None:
    lengths = [5, 4, 3, 3, 1]
    bins = pack(lengths, 8)
    stats = packing_stats(bins, lengths, 8)
    assert stats.num_bins == len(bins) == 2 and stats.real_tokens == 16 and stats.capacity_tokens == 16
    assert stats.utilisation == packing_utilisation(bins, lengths, 8) == 1.0
    assert stats.as_dict()["num_sequences"] == 5
    assert packing_stats([], [], 8).utilisation == 0.0
