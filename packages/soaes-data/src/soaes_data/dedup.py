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


# Chinese full-width punctuation has no NFKC quick-check "yes", so NFKC over a whole Chinese text is slow;
# normalising the pieces between those marks (and each mark alone: none composes with a neighbour) is the
# same string, and pieces that are already normalised (cleaned text) pass the quick check.
_NFKC_SPLIT_RE = re.compile("([" + re.escape("，。！？：；（）【】《》、“”‘’…—～「」『』") + "])")


def normalise_for_dedup(text: str) -> str:
    """NFKC, lower-case, drop whitespace and punctuation: formatting differences do not hide a duplicate."""
    nfkc = "".join(unicodedata.normalize("NFKC", p) for p in _NFKC_SPLIT_RE.split(text))
    return _STRIP_RE.sub("", nfkc.lower())


# Texts longer than this are normalised and hashed piece by piece, so memory per document stays bounded
# however long one document (or one line of it) is.
CHUNK_CHARS = 1 << 20
HASH_CHARS = 1 << 18  # shingles hashed at a time (the slices overlap by n - 1 characters)


def iter_normalised_chunks(text: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """`normalise_for_dedup(text)` in pieces of about `chunk_chars` input characters (one piece for a normal
    document); pieces are cut before a non-combining character, so NFKC sees whole character sequences."""
    if len(text) <= chunk_chars:
        yield normalise_for_dedup(text)
        return
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        while end < len(text) and unicodedata.combining(text[end]):
            end += 1
        yield normalise_for_dedup(text[start:end])
        start = end


def exact_digest(text: str, pieces: Iterable[str] | None = None) -> bytes:
    """16-byte blake2b digest of the normalised text (computed in bounded memory); `pieces`: the text's
    `iter_normalised_chunks`, when already computed."""
    h = hashlib.blake2b(digest_size=16)
    for piece in iter_normalised_chunks(text) if pieces is None else pieces:
        h.update(piece.encode("utf-8"))
    return h.digest()


def exact_key(text: str) -> str:
    """sha256 of the normalised text."""
    h = hashlib.sha256()
    for piece in iter_normalised_chunks(text):
        h.update(piece.encode("utf-8"))
    return h.hexdigest()


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
    # a document is compared with at most this many earlier documents sharing an LSH band (bounds the work
    # on boilerplate that thousands of documents share)
    max_candidates: int = 100
    # exact-dedup keys, and each LSH band, are spread over this many bucket files (tasks of the buckets phase)
    buckets: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if self.ngram < 1 or self.num_perm < 16:
            raise ValueError("need ngram >= 1 and num_perm >= 16")
        if self.max_candidates < 1 or self.buckets < 1:
            raise ValueError("need max_candidates >= 1 and buckets >= 1")


_P = np.uint64(0x100000001B3)  # FNV-64 prime: multiplier of the polynomial n-gram hash


def _identity(x: int) -> int:
    return x


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """Distinct 32-bit hashes of the character n-grams of the normalised text, computed vectorised
    (polynomial hash over code points + a murmur3 finaliser), so MinHash costs no Python call per shingle."""
    return np.unique(_shingle_hashes_normalised(normalise_for_dedup(text), n))


def iter_shingle_hashes(text: str, n: int = 5, chunk_chars: int = CHUNK_CHARS,
                        pieces: Iterable[str] | None = None) -> Iterator[np.ndarray]:
    """The 32-bit shingle hashes of `shingle_hashes` (not deduplicated), in arrays of at most about
    `chunk_chars` values: n-grams spanning two pieces are included (each piece carries the last n-1
    characters of the one before), so the set of values is the same as `shingle_hashes`."""
    carry = ""
    produced = False
    for piece in iter_normalised_chunks(text, chunk_chars) if pieces is None else pieces:
        s = carry + piece
        if len(s) >= n:
            for a in range(0, len(s) - n + 1, HASH_CHARS):  # ~40 bytes per character hashed at once
                yield _shingle_hashes_normalised(s[a:a + HASH_CHARS + n - 1], n)
            produced = True
            carry = s[-(n - 1):] if n > 1 else ""
        else:
            carry = s
    if not produced and carry:
        yield _shingle_hashes_normalised(carry, n)


def _shingle_hashes_normalised(s: str, n: int) -> np.ndarray:
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
    return h & np.uint64(0xFFFFFFFF)


@lru_cache(maxsize=8)
def minhash_template(num_perm: int, seed: int) -> Any:
    """A datasketch MinHash whose (cached) permutations all signatures of this (num_perm, seed) share."""
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity, scheme="affine32")


_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35), np.uint32(16))
_MINHASH_BLOCK = 4096  # shingles per block: block × num_perm uint32 values (2 MB at 128 permutations)


@lru_cache(maxsize=8)
def _permutations32(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = minhash_template(num_perm, seed).permutations
    return a.astype(np.uint32)[None, :], b.astype(np.uint32)[None, :]


def minhash_signature(text: str, config: DedupConfig, pieces: Iterable[str] | None = None) -> np.ndarray:
    """MinHash hash values (uint32 array of `num_perm`) of the text's character n-gram shingles: datasketch's
    affine32 scheme (same permutations, same values as `MinHash.update_batch` over `shingle_hashes`), computed
    block by block so memory stays bounded whatever the document's length. `pieces`: the text's
    `iter_normalised_chunks`, when already computed."""
    a, b = _permutations32(config.num_perm, config.seed)
    sig = np.full(config.num_perm, np.uint32(0xFFFFFFFF), dtype=np.uint32)
    s1, m1, s2, m2, s3 = _FMIX32
    for hv in iter_shingle_hashes(text, config.ngram, pieces=pieces):
        for k in range(0, hv.size, _MINHASH_BLOCK):
            h = hv[k:k + _MINHASH_BLOCK].astype(np.uint32)
            h ^= h >> s1
            h *= m1
            h ^= h >> s2
            h *= m2
            h ^= h >> s3
            phv = h[:, None] * a + b  # uint32 arithmetic wraps: the modulo 2^32 of affine32
            np.minimum(sig, phv.min(axis=0), out=sig)
    return sig


@lru_cache(maxsize=16)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold (equal FP/FN weights)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)  # type: ignore[no-any-return]


@lru_cache(maxsize=8)
def _band_weights(rows: int) -> np.ndarray:
    w = np.ones(rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows - 2, -1, -1):
            w[j] = w[j + 1] * _P
    return w


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 per LSH band: a hash of the band's `rows` signature values (equal bands, equal hashes)."""
    block = sig[:bands * rows].astype(np.uint64).reshape(bands, rows)
    with np.errstate(over="ignore"):
        h = (block * _band_weights(rows)).sum(axis=1, dtype=np.uint64)  # polynomial hash, wrapping mod 2^64
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    return h


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
