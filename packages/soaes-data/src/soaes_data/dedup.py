"""Deduplication: exact (normalised-text hash) and near-duplicate MinHash-LSH (datasketch) over character
n-gram shingles, which suit Chinese (no word boundaries). Keep-first in input order, deterministic; every
dropped document names the kept one it duplicates, so clusters can be reported."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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


_P = np.uint64(0x100000001B3)  # FNV-64 prime: multiplier of the polynomial n-gram hash


def _identity(x: int) -> int:
    return x


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """Distinct 32-bit hashes of the character n-grams of the normalised text, computed vectorised
    (polynomial hash over code points + a murmur3 finaliser), so MinHash costs no Python call per shingle."""
    s = normalise_for_dedup(text)
    if not s:
        return np.zeros(0, dtype=np.uint64)
    cps = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(cps) <= n:
        h = np.zeros(1, dtype=np.uint64)
        for c in cps:
            h = h * _P + c + np.uint64(1)
    else:
        m = len(cps) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                h = h * _P + cps[k:k + m] + np.uint64(1)
    with np.errstate(over="ignore"):  # murmur3 fmix64: spread the bits before keeping the low 32
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return np.unique(h & np.uint64(0xFFFFFFFF))


@lru_cache(maxsize=8)
def minhash_template(num_perm: int, seed: int) -> Any:
    """A datasketch MinHash whose (cached) permutations all signatures of this (num_perm, seed) share."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity, scheme="affine32")


def minhash_signature(text: str, config: DedupConfig) -> np.ndarray:
    """MinHash hash values (uint64 array of `num_perm`) of the text's character n-gram shingles
    (datasketch MinHash with its affine32 permutations over `shingle_hashes`)."""
    m = minhash_template(config.num_perm, config.seed).copy()  # permutations are drawn once per (num_perm, seed)
    hv = shingle_hashes(text, config.ngram)
    if hv.size:
        m.update_batch(hv.tolist())
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
    perms = minhash_template(config.num_perm, config.seed).permutations  # reuse: drawing them costs more than a query
    kept: dict[str, tuple[int, np.ndarray]] = {}
    for i, (sig, doc_id) in enumerate(zip(signatures, ids, strict=True)):
        m = MinHash(num_perm=config.num_perm, seed=config.seed, hashvalues=sig, permutations=perms, scheme="affine32")
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
