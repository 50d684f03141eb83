"""Seeded train/dev/test split stratified by task type, with near-duplicates of test items removed from
train (so the test split measures generalisation, not recall)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .dedup import DedupConfig, jaccard, minhash_signature, minhash_template, shingles
from .records import record_text


@dataclass
class SplitConfig:
    """Fractions (default 80/10/10), seed, the field to stratify by, and the near-duplicate threshold."""

    train: float = field(default=0.8, metadata={"help": "Fraction of records in train."})
    dev: float = field(default=0.1, metadata={"help": "Fraction of records in dev."})
    test: float = field(default=0.1, metadata={"help": "Fraction of records in test."})
    seed: int = field(default=42, metadata={"help": "Seed of the shuffle."})
    stratify_field: str = field(default="task", metadata={"help": "Record field the split is stratified by."})
    near_duplicate_threshold: float = field(default=0.8, metadata={
        "help": "Near-duplicate Jaccard threshold: a train record this close to a test item is removed."})
    ngram: int = field(default=5, metadata={"help": "Character n-gram size of the near-duplicate check."})

    def __post_init__(self) -> None:
        if min(self.train, self.dev, self.test) < 0 or abs(self.train + self.dev + self.test - 1.0) > 1e-6:
            raise ValueError("train, dev and test must be >= 0 and sum to 1")


def split_records(records: Sequence[dict[str, Any]], config: SplitConfig = SplitConfig()
                  ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Returns ({"train", "dev", "test"} → records, removed) where `removed` are train records that were
    near-duplicates of a test item (each with `reason`). Deterministic for a given seed and input order."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str(r.get(config.stratify_field, "_none")), []).append(i)
    assign: dict[int, str] = {}
    for name in sorted(groups):
        idx = list(groups[name])
        random.Random(f"{config.seed}:{name}").shuffle(idx)
        n = len(idx)
        n_test = round(n * config.test)
        n_dev = round(n * config.dev)
        for k, i in enumerate(idx):
            assign[i] = "test" if k < n_test else "dev" if k < n_test + n_dev else "train"
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "dev": [], "test": []}
    for i in range(len(records)):
        splits[assign[i]].append(records[i])
    kept, removed = remove_near_duplicates_of(splits["train"], splits["test"], config)
    splits["train"] = kept
    return splits, removed


def remove_near_duplicates_of(candidates: Sequence[dict[str, Any]], references: Sequence[dict[str, Any]],
                              config: SplitConfig = SplitConfig()) -> tuple[list[dict[str, Any]],
                                                                            list[dict[str, Any]]]:
    """Drop candidates whose character-shingle Jaccard with any reference is ≥ the threshold
    (MinHash-LSH candidates, confirmed by the exact Jaccard)."""
    from datasketch import MinHash, MinHashLSH

    dcfg = DedupConfig(threshold=config.near_duplicate_threshold, ngram=config.ngram)
    lsh = MinHashLSH(threshold=max(0.05, dcfg.threshold - 0.1), num_perm=dcfg.num_perm)
    perms = minhash_template(dcfg.num_perm, dcfg.seed).permutations
    ref_shingles = []
    for k, r in enumerate(references):
        text = record_text(r)
        ref_shingles.append(shingles(text, dcfg.ngram))
        lsh.insert(str(k), MinHash(num_perm=dcfg.num_perm, seed=dcfg.seed, scheme="affine32", permutations=perms,
                                   hashvalues=minhash_signature(text, dcfg)))
    kept, removed = [], []
    for r in candidates:
        text = record_text(r)
        m = MinHash(num_perm=dcfg.num_perm, seed=dcfg.seed, scheme="affine32", permutations=perms,
                    hashvalues=minhash_signature(text, dcfg))
        sh = shingles(text, dcfg.ngram)
        hits = [(jaccard(sh, ref_shingles[int(k)]), int(k)) for k in lsh.query(m)]
        hits = [h for h in hits if h[0] >= dcfg.threshold]
        if hits:
            sim, k = max(hits)
            removed.append({**r, "reason": f"near_duplicate_of_test:{references[k].get('id', k)}",
                            "similarity": round(sim, 4)})
        else:
            kept.append(r)
    return kept, removed
