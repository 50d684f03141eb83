"""Deduplication: exact (normalised-text hash) and near-duplicate MinHash-LSH (datasketch) over character
n-gram shingles, which suit Chinese (no word boundaries). Keep-first in input order, deterministic; every
dropped document names the kept one it duplicates, so clusters can be reported."""

from __future__ import annotations

import hashlib
import re
import struct
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

_STRIP_RE = re.compile(r"[\s\W_]+", re.UNICODE)


def normalise_for_dedup(text: str) -> str:
    """NFKC, lower-case, drop whitespace and punctuation: formatting differences do not hide a duplicate."""
    return _STRIP_RE.sub("", unicodedata.normalize("NFKC", text).lower())


def exact_key(text: str) -> str:
    """sha256 of the normalised text."""
    return hashlib.sha256(normalise_for_dedup(text).encode("utf-8")).hexdigest()


def shingles(text: str, n: int = 5) -> set[str]:
    """Character n-grams of the normalised text (the whole text if shorter than n)."""
    s = normalise_for_dedup(text)
    if len(s) <= n:
        return {s} if s else set()
    return {s[i:i + n] for i in range(len(s) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class DedupConfig:
    """Near-duplicate settings: Jaccard `threshold` over character `ngram` shingles, `num_perm` MinHash
    permutations, `seed` for the permutations (fixed: results are reproducible)."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if self.ngram < 1 or self.num_perm < 16:
            raise ValueError("need ngram >= 1 and num_perm >= 16")


def _hash32(data: bytes) -> int:
    # blake2b is ~2x faster than datasketch's default sha1 and just as well mixed
    return struct.unpack("<I", hashlib.blake2b(data, digest_size=4).digest())[0]


def minhash_signature(text: str, config: DedupConfig) -> np.ndarray:
    """MinHash hash values (uint64 array of `num_perm`) of the text's shingles (datasketch MinHash)."""
    from datasketch import MinHash

    m = MinHash(num_perm=config.num_perm, seed=config.seed, hashfunc=_hash32, scheme="affine32")
    sh = shingles(text, config.ngram)
    if sh:
        m.update_batch([s.encode("utf-8") for s in sh])
    return m.hashvalues


def find_exact_duplicates(keys: Sequence[str], ids: Sequence[str]) -> dict[int, str]:
    """Map index → id of the first document with the same key (for every later copy)."""
    first: dict[str, str] = {}
    dup: dict[int, str] = {}
    for i, (k, doc_id) in enumerate(zip(keys, ids, strict=True)):
        if k in first:
            dup[i] = first[k]
        else:
            first[k] = doc_id
    return dup


def find_near_duplicates(signatures: Iterable[np.ndarray], ids: Sequence[str],
                         config: DedupConfig) -> Iterator[tuple[int, str | None, float]]:
    """For each document in order yield (index, id of the kept near-duplicate or None, estimated Jaccard).

    A document is compared with the already kept ones through LSH (bands tuned to `threshold`); candidates
    are confirmed by the MinHash Jaccard estimate ≥ threshold, the most similar (then earliest) wins.
    """
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    kept: dict[str, tuple[int, np.ndarray]] = {}
    for i, (sig, doc_id) in enumerate(zip(signatures, ids, strict=True)):
        m = MinHash(num_perm=config.num_perm, seed=config.seed, hashvalues=sig, scheme="affine32")
        best: tuple[float, int, str] | None = None
        for cand in lsh.query(m):
            j, other = kept[cand]
            sim = float(np.mean(sig == other))
            if sim >= config.threshold and (best is None or (-sim, j) < (-best[0], best[1])):
                best = (sim, j, cand)
        if best is not None:
            yield i, best[2], best[0]
            continue
        key = f"{i}:{doc_id}"
        lsh.insert(key, m)
        kept[key] = (i, sig)
        yield i, None, 1.0
