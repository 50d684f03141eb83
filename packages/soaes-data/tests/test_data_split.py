"""Split: seeded, stratified 80/10/10, no near-duplicate of a test item left in train."""

from __future__ import annotations

import make_samples
import pytest

from soaes_data.dedup import jaccard, shingles
from soaes_data.records import record_text
from soaes_data.split import SplitConfig, remove_near_duplicates_of, split_records


def _records() -> list[dict]:
    recs = []
    for k in range(200):
        task = "report" if k % 10 == 0 else "qa"
        q = f"第{k}个问题：关于国有企业第{k * 7919 % 1000}号事项的监管要求是什么？请说明具体依据和程序。"
        recs.append({"id": f"r{k}", "task": task, "messages": [{"role": "user", "content": q},
                                                               {"role": "assistant", "content": f"答案{k}。"}]})
    return recs


def test_stratified_and_deterministic() -> None:
    recs = _records()
    a, removed = split_records(recs, SplitConfig(seed=1))
    b, _ = split_records(recs, SplitConfig(seed=1))
    c, _ = split_records(recs, SplitConfig(seed=2))
    assert a == b and a != c
    assert {k: len(v) for k, v in a.items()} == {"train": 160 - len(removed), "dev": 20, "test": 20}
    for name, n in (("dev", 2), ("test", 2)):
        assert sum(r["task"] == "report" for r in a[name]) == n  # 20 reports → 10% each
    ids = [r["id"] for s in a.values() for r in s] + [r["id"] for r in removed]
    assert sorted(ids) == sorted(r["id"] for r in recs)


def test_near_duplicates_of_test_removed_from_train() -> None:
    recs = _records()
    long_text = "".join(t for _, t in make_samples.DOMAIN_DOCS[:2])
    victim = {"id": "victim", "task": "qa", "messages": [{"role": "user", "content": long_text},
                                                         {"role": "assistant", "content": "好的。"}]}
    edited = long_text.replace("国资委", "国资监管机构")
    twin = {"id": "twin", "task": "qa", "messages": [{"role": "user", "content": edited},
                                                     {"role": "assistant", "content": "好的。"}]}
    kept, removed = remove_near_duplicates_of([twin, *recs[:5]], [victim, *recs[5:8]])
    assert [r["id"] for r in removed] == ["twin"] and removed[0]["reason"] == "near_duplicate_of_test:victim"
    assert len(kept) == 5
    # property of a full split: no train item reaches the threshold with any test item (exact Jaccard)
    pool = [*recs, victim, twin]
    for seed in range(3):
        splits, _ = split_records(pool, SplitConfig(seed=seed))
        test_sh = [shingles(record_text(r)) for r in splits["test"]]
        for r in splits["train"]:
            sh = shingles(record_text(r))
            assert all(jaccard(sh, t) < 0.8 for t in test_sh)


def test_bad_fractions() -> None:
    with pytest.raises(ValueError):
        SplitConfig(train=0.9, dev=0.1, test=0.1)
