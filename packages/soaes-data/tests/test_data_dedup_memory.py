"""Cross-shard dedup at corpus scale (issue 16, acceptance 2): the buckets phase holds a bounded number of band
records whatever the number of documents, the cluster and filter steps give what the former in-memory
versions gave, and the long-document filters keep their results while working slice by slice."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document

import soaes_data.dedup_steps as dedup_steps
import soaes_data.filters as filters
from soaes_core.errors import DataError
from soaes_data.dedup import DedupConfig
from soaes_data.dedup_steps import (
    PAIR_RECORD,
    DedupBuckets,
    DedupSignature,
    ExactDedupFilter,
    IdStore,
    _write_clusters,
    keep_first,
)


def _sign(folder: Path, n: int, config: DedupConfig) -> None:
    """Exact-dedup signatures of `n` documents, every tenth a copy of an earlier one."""
    docs = (Document(text=f"文档{i % (n - n // 10)}号，国有资产监督管理。", id=f"d{i}", metadata={"order": i})
            for i in range(n))
    for _ in DedupSignature(["exact"], config, str(folder)).run(docs, rank=0, world_size=1):
        pass


def _bucket_run(tmp: Path, n: int, config: DedupConfig, name: str = "") -> tuple[int, np.ndarray]:
    """(tracemalloc peak of the buckets phase, its confirmed pairs sorted)."""
    sig = tmp / f"sig{n}"
    if not sig.is_dir():
        _sign(sig, n, config)
    out = tmp / f"buckets{n}{name}"
    tracemalloc.start()
    try:
        DedupBuckets("exact", config, str(sig), str(out)).run(rank=0, world_size=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pairs = np.fromfile(out / "pairs" / "000.bin", dtype=PAIR_RECORD)
    return peak, np.sort(pairs, order=["o1", "o2"])


def test_buckets_memory_does_not_grow_with_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = DedupConfig(buckets=1)  # one bucket file holds every document's record
    monkeypatch.setattr(dedup_steps, "MAX_BUCKET_RECORDS", 1024)
    small_peak, small_pairs = _bucket_run(tmp_path, 3_000, config)
    big_peak, big_pairs = _bucket_run(tmp_path, 24_000, config)
    # loading the whole file, as before, peaked at 0.19 MB for 3,000 documents and 1.4 MB for 24,000
    assert big_peak < 1.5 * small_peak + 256_000, (small_peak, big_peak)
    assert len(small_pairs) == 300 and len(big_pairs) == 2_400  # every tenth document is a copy
    assert (big_pairs["o2"] == big_pairs["o1"] - (24_000 - 2_400)).all()
    # the hash ranges give the pairs one sort of the whole file gives
    monkeypatch.setattr(dedup_steps, "MAX_BUCKET_RECORDS", 1 << 15)
    assert np.array_equal(_bucket_run(tmp_path, 24_000, config, "one_pass")[1], big_pairs)


def _reference_keep_first(pairs: np.ndarray) -> dict[int, tuple[int, float]]:
    """The former in-memory rule: in input order, drop a document linked to a kept earlier one (most similar,
    then earliest)."""
    earlier: dict[int, dict[int, float]] = {}
    for p in pairs.tolist():
        cands = earlier.setdefault(p[0], {})
        cands[p[3]] = max(p[6], cands.get(p[3], 0.0))
    removed: dict[int, tuple[int, float]] = {}
    for o1 in sorted(earlier):
        best = None
        for o2, s in earlier[o1].items():
            if o2 not in removed and (best is None or (s, -o2) > (best[0], -best[1])):
                best = (s, o2)
        if best is not None:
            removed[o1] = (best[1], best[0])
    return removed


def test_keep_first_matches_the_sequential_rule_on_chains() -> None:
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(2, 60)
        rows = []
        for _ in range(rng.randint(1, 150)):
            o2, o1 = sorted(rng.sample(range(n), 2))
            rows.append((o1, 0, o1, o2, 0, o2, rng.choice([0.8, 0.85, 0.9, 1.0])))
        rows += rows[: len(rows) // 3]  # the same pair found in several bands
        pairs = np.array(rows, dtype=PAIR_RECORD)
        got = pairs[keep_first(pairs)]
        assert got["o1"].tolist() == sorted(got["o1"].tolist())
        assert {int(r["o1"]): (int(r["o2"]), float(r["s"])) for r in got} == _reference_keep_first(pairs)


def _id_store(folder: Path, ids: list[str]) -> IdStore:
    folder.mkdir(parents=True)
    lines = [(json.dumps(i, ensure_ascii=False) + "\n").encode() for i in ids]
    (folder / "00000.jsonl").write_bytes(b"".join(lines))
    np.cumsum([0, *map(len, lines)], dtype="<u8").tofile(folder / "00000.offsets.bin")
    return IdStore(folder)


def test_clusters_file_is_what_dumping_the_dict_gives(tmp_path: Path) -> None:
    ids = ["a", "b", "甲", "c", "a", "d", "e"]  # "a" twice: two kept documents with one id share a key
    with _id_store(tmp_path / "ids", ids) as store:
        removed = np.array([(o1, 0, o1, o2, 0, o2, 1.0) for o1, o2 in [(1, 0), (3, 2), (5, 4), (6, 2)]],
                           dtype=PAIR_RECORD)
        _write_clusters(tmp_path / "clusters.json", removed, store)
        expected: dict[str, list[str]] = {}
        for r in removed:
            expected.setdefault(ids[int(r["o2"])], []).append(ids[int(r["o1"])])
        assert expected == {"a": ["b", "d"], "甲": ["c", "e"]}
        assert (tmp_path / "clusters.json").read_text(encoding="utf-8") == json.dumps(expected, ensure_ascii=False,
                                                                                       indent=1)
        _write_clusters(tmp_path / "empty.json", removed[:0], store)
        assert (tmp_path / "empty.json").read_text(encoding="utf-8") == "{}"


def test_dedup_filter_streams_its_list_and_notices_a_missing_document(tmp_path: Path) -> None:
    (tmp_path / "c" / "remove").mkdir(parents=True)
    rows = [{"o": 2, "kept": "d0", "sim": 1.0}, {"o": 5, "kept": "d1", "sim": 1.0}]
    (tmp_path / "c" / "remove" / "00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(orders: list[int]) -> list[str]:
        step = ExactDedupFilter(6, DedupConfig(), str(tmp_path / "parts"), str(tmp_path / "c"))
        docs = [Document(text="x", id=f"d{o}", metadata={"order": o}) for o in orders]
        return [d.id for d in step.run(iter(docs))]

    assert run([0, 1, 2, 3, 5, 7]) == ["d0", "d1", "d3", "d7"]
    with pytest.raises(DataError, match="never arrived"):
        run([0, 1, 2, 3, 4])  # order 5 is listed but does not come


def test_long_text_filters_work_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(0)
    text = "".join(rng.choice("国有资产ab1 ,。\n监督") for _ in range(3_000))
    whole = filters.quality_signals(text), filters.detect_language(text)
    monkeypatch.setattr(filters, "_SLICE", 7)
    assert (filters.quality_signals(text), filters.detect_language(text)) == whole
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    h = np.zeros(len(text) - 4, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(5):
            h = h * np.uint64(0x100000001B3) + cps[k:k + len(h)] + np.uint64(1)
    _, counts = np.unique(h, return_counts=True)
    assert filters._repeated_ngrams(text, 5) == (len(h), int(counts[counts > 1].sum()))
