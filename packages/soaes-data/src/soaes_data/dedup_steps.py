"""Exact and near deduplication across shards as datatrove pipeline steps, arranged like datatrove's MinHash
dedup: signature (per task) → buckets (per hash bucket) → cluster (one task) → filter (per task).

* `DedupSignature` (end of a phase): per document, a signature (near: the MinHash values over character
  5-gram shingles, which suit Chinese; exact: a 16-byte digest of the normalised text) and its LSH band
  hashes, each with the document's global order key, appended to hash-partitioned bucket files. Consecutive
  dedup stages (exact then near) share this pass and one normalisation of each text.
* `DedupBuckets` (bucket files spread over the tasks): documents sharing a band value are candidates; each is
  compared (full signature) with at most `max_candidates` earlier ones; pairs at or above the threshold are
  kept. Near dedup leaves out the documents exact dedup removed, as if it ran on exact dedup's output.
* `DedupCluster` (one task): in global input order, a document is dropped when a confirmed pair links it to
  an earlier document that is kept (the most similar, then the earliest, is named). This is the sequential
  keep-first rule, so which document of a cluster survives does not depend on the number of tasks.
* `DedupFilter` (in the next phase): drops the listed documents (by order key), naming the kept one.

Memory does not grow with the corpus (bucket files are taken in bounded hash ranges, lists and outputs are
streamed) except for what is O(duplicates) and compact: the cluster task holds the confirmed pairs and the
removed documents as numpy records (tens of bytes each; see `DedupCluster`), and near dedup's buckets phase
the order keys exact dedup removed (8 bytes each).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from soaes_core.atomic import temp_path
from soaes_core.errors import DataError

from .dedup import DedupConfig, band_hashes, exact_digest, iter_normalised_chunks, lsh_params, minhash_signature
from .steps import CurationStep, Record, reject_record

Kind = Literal["exact", "near"]
_BLOCK = 4096  # documents whose band records are buffered before they are appended to the bucket files
MAX_BUCKET_RECORDS = 1 << 16  # about how many band records (24 bytes each) the buckets phase holds at once
_OPEN_FILES = 64  # signature/id files kept open for positioned reads
_CHUNK = 1 << 16  # pairs turned into Python objects at a time
BAND_RECORD = np.dtype([("h", "<u8"), ("o", "<u8"), ("r", "<u4"), ("i", "<u4")])
PAIR_RECORD = np.dtype([("o1", "<u8"), ("r1", "<u4"), ("i1", "<u4"), ("o2", "<u8"), ("r2", "<u4"), ("i2", "<u4"),
                        ("s", "<f4")])


def dedup_layout(kind: Kind, config: DedupConfig) -> tuple[int, int, int]:
    """(bands, rows per band, bucket files) for this kind of dedup."""
    if kind == "exact":
        return 1, 0, config.buckets
    bands, rows = lsh_params(config.threshold, config.num_perm)
    return bands, rows, bands * config.buckets


def signature_width(kind: Kind, config: DedupConfig) -> int:
    return 4 if kind == "exact" else config.num_perm


class DedupSignature(PipelineStep):
    """Phase end: for each kind (exact and/or near, sharing one normalisation of the text), signatures and
    band records of this task's documents under `folder/<kind>/`, ids under `folder/ids/` (documents are
    passed on unchanged)."""

    type = "soaes-data dedup"

    def __init__(self, kinds: list[Kind], config: DedupConfig, folder: str) -> None:
        super().__init__()
        self.kinds, self.config, self.folder = kinds, config, folder
        self.name = f"{'+'.join(kinds)} dedup signature"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        folder = Path(self.folder)
        layout = {kind: dedup_layout(kind, self.config) for kind in self.kinds}
        (folder / "ids").mkdir(parents=True, exist_ok=True)
        files: dict[str, Any] = {}
        buckets: dict[str, list[Any]] = {}
        try:
            for kind in self.kinds:
                (folder / kind / "sigs").mkdir(parents=True, exist_ok=True)
                files[kind] = open(folder / kind / "sigs" / f"{rank:05d}.bin", "wb")
                buckets[kind] = []
                for k in range(layout[kind][2]):
                    (folder / kind / "buckets" / f"{k:03d}").mkdir(parents=True, exist_ok=True)
                    buckets[kind].append(open(folder / kind / "buckets" / f"{k:03d}" / f"{rank:05d}.bin", "wb"))
            yield from self._sign(data, rank, folder, layout, files, buckets)
        finally:
            for fh in [*files.values(), *(f for fs in buckets.values() for f in fs)]:
                fh.close()

    def _sign(self, data: DocumentsPipeline, rank: int, folder: Path, layout: dict[str, tuple[int, int, int]],
              files: dict[str, Any], buckets: dict[str, list[Any]]) -> DocumentsPipeline:
        """Band records are buffered `_BLOCK` documents at a time and appended (unsorted: the buckets phase
        sorts), so memory does not grow with the number of documents."""
        hashes = {kind: np.zeros((_BLOCK, layout[kind][0]), dtype=np.uint64) for kind in self.kinds}
        orders = np.zeros(_BLOCK, dtype=np.uint64)
        offsets = [0]  # byte offset of each id line; appended to ids/NNNNN.offsets.bin block by block
        pos = 0
        n = 0

        def flush(count: int) -> None:
            for kind in self.kinds:
                bands, _, n_files = layout[kind]
                per_band = n_files // bands
                for b in range(bands):
                    rec = np.zeros(count, dtype=BAND_RECORD)
                    rec["h"], rec["o"], rec["r"] = hashes[kind][:count, b], orders[:count], rank
                    rec["i"] = np.arange(n - count, n)
                    part = rec["h"] % np.uint64(per_band)
                    for k in range(per_band):
                        rec[part == k].tofile(buckets[kind][b * per_band + k])

        with open(folder / "ids" / f"{rank:05d}.jsonl", "wb") as id_f, \
                open(folder / "ids" / f"{rank:05d}.offsets.bin", "wb") as off_f:
            for doc in data or ():
                pieces = list(iter_normalised_chunks(doc.text))
                j = n % _BLOCK
                for kind in self.kinds:
                    if kind == "exact":
                        digest = exact_digest(doc.text, pieces)
                        sig = np.frombuffer(digest, dtype="<u4")
                        hashes[kind][j] = np.frombuffer(digest[:8], dtype="<u8")
                    else:
                        sig = minhash_signature(doc.text, self.config, pieces)
                        hashes[kind][j] = band_hashes(sig, *layout[kind][:2])
                    files[kind].write(sig.astype("<u4").tobytes())
                del pieces  # the normalised copy of the text is not kept while the document goes on
                orders[j] = doc.metadata["order"]
                n += 1
                if n % _BLOCK == 0:
                    flush(_BLOCK)
                line = (json.dumps(doc.id, ensure_ascii=False) + "\n").encode("utf-8")
                id_f.write(line)
                pos += len(line)
                offsets.append(pos)
                if len(offsets) >= _BLOCK:
                    np.asarray(offsets, dtype="<u8").tofile(off_f)
                    offsets = []
                yield doc
            np.asarray(offsets, dtype="<u8").tofile(off_f)
        if n % _BLOCK:
            flush(n % _BLOCK)
        self.stat_update("documents", value=n)


class DedupBuckets(PipelineStep):
    """Per bucket file (task r of T takes files r, r + T, ...): confirmed duplicate pairs (later document,
    earlier document, similarity), appended to `pairs/KKK.bin`."""

    type = "soaes-data dedup"

    def __init__(self, kind: Kind, config: DedupConfig, sig_folder: str, folder: str,
                 exclude: str | None = None) -> None:
        super().__init__()
        self.kind, self.config, self.sig_folder, self.folder = kind, config, sig_folder, folder
        self.exclude = exclude  # a cluster folder whose removed documents take no part (near after exact)
        self.name = f"{kind} dedup buckets"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        n_files = dedup_layout(self.kind, self.config)[2]
        excluded = removed_orders(Path(self.exclude)) if self.exclude else np.zeros(0, dtype=np.uint64)
        for k in range(rank, n_files, world_size):  # task `rank` takes bucket files rank, rank + tasks, ...
            self._bucket(k, excluded)

    def _bucket(self, k: int, excluded: np.ndarray) -> None:
        """The bucket file's records in ascending hash ranges of about `MAX_BUCKET_RECORDS` each (what one sort
        of the whole file gives, in pieces), so memory does not grow with the corpus."""
        files = sorted((Path(self.sig_folder) / self.kind / "buckets" / f"{k:03d}").glob("*.bin"))
        total = sum(f.stat().st_size for f in files) // BAND_RECORD.itemsize
        dest = Path(self.folder) / "pairs" / f"{k:03d}.bin"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(dest)
        n_pairs = 0
        with open(tmp, "wb") as out, SignatureReader(Path(self.sig_folder) / self.kind / "sigs",
                                                     signature_width(self.kind, self.config)) as sigs:
            parts = max(1, -(-total // MAX_BUCKET_RECORDS))
            for recs in _hash_ranges(files, parts, excluded, Path(self.folder) / "scratch" / f"{k:03d}"):
                recs = recs[np.lexsort((recs["o"], recs["h"]))]
                n_pairs += self._pairs(recs, sigs, out)
        os.replace(tmp, dest)
        self.stat_update("candidate_pairs", value=n_pairs)

    def _pairs(self, recs: np.ndarray, sigs: SignatureReader, out: Any) -> int:
        """Within each group of records sharing a band hash (sorted by order key), each document against at
        most `max_candidates` earlier ones; confirmed pairs are written to `out`. Only those earlier
        candidates' signatures are held, however large the group."""
        if len(recs) < 2:
            return 0
        threshold = 1.0 if self.kind == "exact" else self.config.threshold
        cap = self.config.max_candidates
        starts = np.flatnonzero(np.concatenate([[True], recs["h"][1:] != recs["h"][:-1]]))
        sizes = np.diff(np.append(starts, len(recs)))
        n = 0
        for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
            group = recs[start:start + size]
            head = np.zeros((min(size, cap), sigs.width), dtype="<u4")  # the first `cap` signatures
            head[0] = sigs.get(int(group[0]["r"]), int(group[0]["i"]))
            for j in range(1, size):
                sig = sigs.get(int(group[j]["r"]), int(group[j]["i"]))
                sims = (head[:min(j, cap)] == sig).mean(axis=1)
                if j < cap:
                    head[j] = sig
                hit = np.flatnonzero(sims >= threshold)
                if hit.size:
                    p = np.zeros(hit.size, dtype=PAIR_RECORD)
                    p["o1"], p["r1"], p["i1"] = group[j]["o"], group[j]["r"], group[j]["i"]
                    p["o2"], p["r2"], p["i2"] = group[hit]["o"], group[hit]["r"], group[hit]["i"]
                    p["s"] = sims[hit]
                    p.tofile(out)
                    n += hit.size
        return n


def _chunks(files: list[Path], excluded: np.ndarray) -> Iterator[np.ndarray]:
    """The band records of `files` whose document is not in `excluded` (sorted), `MAX_BUCKET_RECORDS` at a time."""
    for f in files:
        with open(f, "rb") as fh:
            while (chunk := np.fromfile(fh, dtype=BAND_RECORD, count=MAX_BUCKET_RECORDS)).size:
                if excluded.size:
                    pos = np.minimum(np.searchsorted(excluded, chunk["o"]), excluded.size - 1)
                    chunk = chunk[excluded[pos] != chunk["o"]]
                yield chunk


def _hash_ranges(files: list[Path], parts: int, excluded: np.ndarray, scratch: Path) -> Iterator[np.ndarray]:
    """The records of `_chunks` in `parts` ranges of ascending hash: with one part, all at once; with more,
    each chunk is first split by range into files under `scratch` (every record is read and written once)."""
    if parts == 1:
        chunks = list(_chunks(files, excluded))
        yield np.concatenate(chunks) if chunks else np.zeros(0, dtype=BAND_RECORD)
        return
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        for chunk in _chunks(files, excluded):
            part = ((chunk["h"] >> np.uint64(32)) * np.uint64(parts)) >> np.uint64(32)  # monotone in the hash
            by_part = np.argsort(part, kind="stable")
            chunk, part = chunk[by_part], part[by_part]
            bounds = np.searchsorted(part, np.arange(parts + 1, dtype=np.uint64))
            for p in np.flatnonzero(np.diff(bounds)).tolist():
                with open(scratch / f"{p:05d}.bin", "ab") as fh:
                    chunk[bounds[p]:bounds[p + 1]].tofile(fh)
        for p in range(parts):
            f = scratch / f"{p:05d}.bin"
            yield np.fromfile(f, dtype=BAND_RECORD) if f.is_file() else np.zeros(0, dtype=BAND_RECORD)
            f.unlink(missing_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class SignatureReader:
    """Positioned reads of single signatures from `sigs/NNNNN.bin` (a memory map of the whole file would
    count every page touched towards the worker's memory: 512 MB per million documents)."""

    def __init__(self, folder: Path, width: int) -> None:
        self.folder, self.width = folder, width
        self._files: dict[int, Any] = {}

    def get(self, rank: int, index: int) -> np.ndarray:
        if rank not in self._files:
            if len(self._files) >= _OPEN_FILES:
                self.close()
            self._files[rank] = open(self.folder / f"{rank:05d}.bin", "rb")
        row = self.width * 4
        return np.frombuffer(os.pread(self._files[rank].fileno(), row, index * row), dtype="<u4")

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files = {}

    def __enter__(self) -> SignatureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def removed_orders(cluster_folder: Path) -> np.ndarray:
    """Order keys of every document a `DedupCluster` removed, sorted (8 bytes each)."""
    parts = []
    for f in sorted((cluster_folder / "remove").glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            parts.append(np.fromiter((json.loads(line)["o"] for line in fh), dtype=np.uint64))
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)


class IdStore:
    """Random access to the ids `DedupSignature` wrote (task, index → id) by positioned reads, without loading
    them all."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[int, tuple[Any, Any]] = {}

    def get(self, rank: int, index: int) -> str:
        if rank not in self._files:
            if len(self._files) >= _OPEN_FILES:
                self.close()
            self._files[rank] = (open(self.folder / f"{rank:05d}.offsets.bin", "rb"),
                                 open(self.folder / f"{rank:05d}.jsonl", "rb"))
        offsets, ids = self._files[rank]
        start, end = np.frombuffer(os.pread(offsets.fileno(), 16, index * 8), dtype="<u8").tolist()
        return str(json.loads(os.pread(ids.fileno(), end - start, start)))

    def close(self) -> None:
        for fhs in self._files.values():
            for fh in fhs:
                fh.close()
        self._files = {}

    def __enter__(self) -> IdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DedupCluster(PipelineStep):
    """One task: the keep-first decision in global input order; writes `remove/NNNNN.jsonl` per data task
    (order key, kept id, similarity) and `clusters.json` (kept id → ids of its dropped duplicates).

    Memory is O(confirmed pairs) in numpy records (36 bytes per pair, plus 8 per pair to sort them) and
    O(removed documents) (8 bytes each for the keep-first state, ~60 for the outputs' sorting); the ids are
    read from disk when written and the outputs are streamed."""

    type = "soaes-data dedup"

    def __init__(self, kind: Kind, sig_folder: str, pairs_folder: str, folder: str, data_tasks: int) -> None:
        super().__init__()
        self.kind, self.sig_folder, self.pairs_folder, self.folder = kind, sig_folder, pairs_folder, folder
        self.data_tasks = data_tasks
        self.name = f"{kind} dedup cluster"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        folder = Path(self.folder)
        files = sorted((Path(self.pairs_folder) / "pairs").glob("*.bin"))
        bucket_dirs = Path(self.sig_folder) / self.kind / "buckets"
        n_buckets = sum(1 for d in bucket_dirs.iterdir() if d.is_dir()) if bucket_dirs.is_dir() else 0
        if len(files) != n_buckets:  # e.g. a buckets phase written by an older version (pairs/*.npy)
            raise DataError(f"{self.kind} dedup: pairs of {n_buckets - len(files)} bucket file(s) missing in "
                            f"{Path(self.pairs_folder) / 'pairs'}; re-run with --force")
        pairs = np.concatenate([np.fromfile(f, dtype=PAIR_RECORD) for f in files]) if files else \
            np.zeros(0, dtype=PAIR_RECORD)
        removed = pairs[keep_first(pairs)]  # one row per removed document (o1 ascending): its chosen pair
        del pairs
        (folder / "remove").mkdir(parents=True, exist_ok=True)
        with IdStore(Path(self.sig_folder) / "ids") as ids:  # shared by the kinds signed together
            by_task = removed[np.argsort(removed["r1"], kind="stable")]  # per task, in order-key order
            bounds = np.searchsorted(by_task["r1"], np.arange(self.data_tasks + 1))
            for r in range(self.data_tasks):
                with open(folder / "remove" / f"{r:05d}.jsonl", "w", encoding="utf-8") as fh:
                    for row in by_task[bounds[r]:bounds[r + 1]]:
                        fh.write(json.dumps({"o": int(row["o1"]), "kept": ids.get(int(row["r2"]), int(row["i2"])),
                                             "sim": round(float(row["s"]), 4)}, ensure_ascii=False) + "\n")
            del by_task
            _write_clusters(folder / "clusters.json", removed, ids)
        self.stat_update("removed", value=len(removed))


def keep_first(pairs: np.ndarray) -> np.ndarray:
    """Indices into `pairs` of the pair that removes each removed document, in input order: walking the
    later documents (o1) in order, o1 is removed by its most similar, then earliest, earlier document o2
    that was not removed itself. The state is the sorted array of removed order keys."""
    if not len(pairs):
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((pairs["o2"], -pairs["s"], pairs["o1"]))  # per o1: best candidate first
    removed: array[int] = array("Q")
    chosen: array[int] = array("q")
    current, decided = -1, False
    for base in range(0, len(order), _CHUNK):
        idx = order[base:base + _CHUNK]
        for j, o1, o2 in zip(idx.tolist(), pairs["o1"][idx].tolist(), pairs["o2"][idx].tolist(), strict=True):
            if o1 != current:
                current, decided = o1, False
            if decided:
                continue
            pos = bisect_left(removed, o2)  # removed keys are appended in ascending order
            if pos < len(removed) and removed[pos] == o2:
                continue
            removed.append(o1)
            chosen.append(j)
            decided = True
    return np.frombuffer(chosen, dtype=np.int64) if chosen else np.zeros(0, dtype=np.int64)


def _write_clusters(path: Path, removed: np.ndarray, ids: IdStore) -> None:
    """`clusters.json`: {kept id: [ids of the documents it removed]}, kept ids in order of their first removal,
    each list in input order (exactly what building the dict in memory and `json.dumps(indent=1)` gives),
    streamed. Kept documents are grouped by a 128-bit digest of their id (equal ids merge, as dict keys do)."""
    kept_orders, first_row, inverse = np.unique(removed["o2"], return_index=True, return_inverse=True)
    digests = np.array([hashlib.blake2b(ids.get(int(removed["r2"][k]), int(removed["i2"][k])).encode("utf-8"),
                                        digest_size=16).digest() for k in first_row.tolist()], dtype="S16")
    del kept_orders
    _, group_first, group = np.unique(digests[inverse], return_index=True, return_inverse=True)
    del digests, inverse
    rows = np.lexsort((np.arange(len(removed)), group_first[group]))  # groups by first removal, rows in order
    key = group_first[group][rows]
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        if not len(removed):
            fh.write("{}")
        for n, k in enumerate(rows.tolist()):
            r = removed[k]
            if n == 0 or key[n] != key[n - 1]:
                kept = ids.get(int(r["r2"]), int(r["i2"]))
                fh.write(("\n ],\n " if n else "{\n ") + json.dumps(kept, ensure_ascii=False) + ": [\n  ")
            else:
                fh.write(",\n  ")
            fh.write(json.dumps(ids.get(int(r["r1"]), int(r["i1"])), ensure_ascii=False))
        if len(removed):
            fh.write("\n ]\n}")
    os.replace(tmp, path)


class DedupFilter(CurationStep):
    """Drops the documents `DedupCluster` listed for this task (matched by their order key). The list is
    sorted by order key, as the task's documents arrive, so it is read alongside them: one row in memory."""

    kind: ClassVar[Kind] = "exact"

    def __init__(self, index: int, config: Any, parts_dir: str, folder: str) -> None:
        super().__init__(index, config, parts_dir)
        self.folder = folder

    def setup(self, rank: int) -> None:
        self._path = Path(self.folder) / "remove" / f"{rank:05d}.jsonl"
        self._fh = open(self._path, encoding="utf-8")
        self._next: dict[str, Any] | None = None
        self._advance()
        self._last = -1
        self._sim = 1.0

    def _advance(self) -> None:
        line = self._fh.readline()
        self._next = json.loads(line) if line else None

    def process(self, doc: Document) -> str | None:
        order = doc.metadata["order"]
        if order <= self._last:
            raise DataError(f"{self.stage}: documents out of input order (order key {order} after {self._last})")
        self._last = order
        row = self._next
        if row is not None and row["o"] < order:
            raise DataError(f"{self.stage}: a document listed for removal never arrived", path=str(self._path),
                            field=f"o={row['o']}")
        if row is None or row["o"] != order:
            return None
        self._advance()
        self._sim = row["sim"]
        return f"{self.kind}_duplicate_of:{row['kept']}"

    def finish(self, rank: int) -> None:
        left = self._next
        self._fh.close()
        if left is not None:
            raise DataError(f"{self.stage}: a document listed for removal never arrived", path=str(self._path),
                            field=f"o={left['o']}")

    def reject(self, doc: Document, reason: str) -> Record:
        extra = {"similarity": self._sim} if self.kind == "near" else {}
        return reject_record(self.stage, reason, doc, **extra)


class ExactDedupFilter(DedupFilter):
    stage = "dedup_exact"
    kind = "exact"


class NearDedupFilter(DedupFilter):
    stage = "dedup_near"
    kind = "near"
