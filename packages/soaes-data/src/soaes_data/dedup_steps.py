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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from .dedup import DedupConfig, band_hashes, exact_digest, iter_normalised_chunks, lsh_params, minhash_signature
from .steps import CurationStep, Record, reject_record, write_json_atomic

Kind = Literal["exact", "near"]
_BLOCK = 4096  # documents whose band records are buffered before they are appended to the bucket files
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
    earlier document, similarity)."""

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
        folder = Path(self.sig_folder) / self.kind
        files = sorted((folder / "buckets" / f"{k:03d}").glob("*.bin"))
        recs = np.concatenate([np.fromfile(f, dtype=BAND_RECORD) for f in files]) if files else \
            np.zeros(0, dtype=BAND_RECORD)
        if excluded.size:
            recs = recs[~np.isin(recs["o"], excluded)]
        recs = recs[np.lexsort((recs["o"], recs["h"]))]
        width = signature_width(self.kind, self.config)
        threshold = 1.0 if self.kind == "exact" else self.config.threshold
        sigs: dict[int, Any] = {}
        row = width * 4

        def sig_of(r: int, i: int) -> np.ndarray:
            # one positioned read per candidate: a memory map of the whole file would count every page
            # touched towards the worker's memory (512 MB per million documents)
            if r not in sigs:
                sigs[r] = open(folder / "sigs" / f"{r:05d}.bin", "rb")
            return np.frombuffer(os.pread(sigs[r].fileno(), row, i * row), dtype="<u4")

        pairs: list[np.ndarray] = []
        if len(recs) > 1:
            starts = np.flatnonzero(np.concatenate([[True], recs["h"][1:] != recs["h"][:-1]]))
            sizes = np.diff(np.append(starts, len(recs)))
            cap = self.config.max_candidates
            for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
                group = recs[start:start + size]
                sig = np.stack([sig_of(int(g["r"]), int(g["i"])) for g in group])
                for j in range(1, size):
                    earlier = sig[:min(j, cap)]
                    sims = (earlier == sig[j]).mean(axis=1)
                    hit = np.flatnonzero(sims >= threshold)
                    if hit.size:
                        p = np.zeros(hit.size, dtype=PAIR_RECORD)
                        p["o1"], p["r1"], p["i1"] = group[j]["o"], group[j]["r"], group[j]["i"]
                        p["o2"], p["r2"], p["i2"] = group[hit]["o"], group[hit]["r"], group[hit]["i"]
                        p["s"] = sims[hit]
                        pairs.append(p)
        for fh in sigs.values():
            fh.close()
        out = np.concatenate(pairs) if pairs else np.zeros(0, dtype=PAIR_RECORD)
        (Path(self.folder) / "pairs").mkdir(parents=True, exist_ok=True)
        np.save(Path(self.folder) / "pairs" / f"{k:03d}.npy", out)
        self.stat_update("candidate_pairs", value=len(out))


def removed_orders(cluster_folder: Path) -> np.ndarray:
    """Order keys of every document a `DedupCluster` removed."""
    orders = []
    for f in sorted((cluster_folder / "remove").glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            orders += [json.loads(line)["o"] for line in fh]
    return np.asarray(orders, dtype=np.uint64)


class IdStore:
    """Random access to the ids `DedupSignature` wrote (task, index → id) without loading them all."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._offsets: dict[int, np.ndarray] = {}

    def get(self, rank: int, index: int) -> str:
        if rank not in self._offsets:
            self._offsets[rank] = np.memmap(self.folder / f"{rank:05d}.offsets.bin", dtype="<u8", mode="r")
        off = self._offsets[rank]
        with open(self.folder / f"{rank:05d}.jsonl", "rb") as fh:
            fh.seek(int(off[index]))
            return str(json.loads(fh.read(int(off[index + 1]) - int(off[index]))))


class DedupCluster(PipelineStep):
    """One task: the keep-first decision in global input order; writes `remove/NNNNN.jsonl` per data task
    (order key, kept id, similarity) and `clusters.json` (kept id → ids of its dropped duplicates)."""

    type = "soaes-data dedup"

    def __init__(self, kind: Kind, sig_folder: str, pairs_folder: str, folder: str, data_tasks: int) -> None:
        super().__init__()
        self.kind, self.sig_folder, self.pairs_folder, self.folder = kind, sig_folder, pairs_folder, folder
        self.data_tasks = data_tasks
        self.name = f"{kind} dedup cluster"

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        folder = Path(self.folder)
        parts = [np.load(f) for f in sorted((Path(self.pairs_folder) / "pairs").glob("*.npy"))]
        pairs = np.concatenate(parts) if parts else np.zeros(0, dtype=PAIR_RECORD)
        where: dict[int, tuple[int, int]] = {}
        earlier: dict[int, dict[int, float]] = {}
        for p in pairs.tolist():  # (o1, r1, i1, o2, r2, i2, s)
            o1, r1, i1, o2, r2, i2, s = p
            where[o1], where[o2] = (r1, i1), (r2, i2)
            cands = earlier.setdefault(o1, {})
            cands[o2] = max(s, cands.get(o2, 0.0))
        removed: dict[int, tuple[int, float]] = {}
        for o1 in sorted(earlier):  # input order: every earlier document is decided before a later one
            best: tuple[float, int] | None = None
            for o2, s in earlier[o1].items():
                if o2 not in removed and (best is None or (s, -o2) > (best[0], -best[1])):
                    best = (s, o2)
            if best is not None:
                removed[o1] = (best[1], best[0])
        ids = IdStore(Path(self.sig_folder) / "ids")  # shared by the kinds signed together
        per_task: dict[int, list[tuple[int, str, float]]] = {r: [] for r in range(self.data_tasks)}
        clusters: dict[str, list[str]] = {}
        kept_ids: dict[int, str] = {}
        for o1 in sorted(removed):
            o2, s = removed[o1]
            if o2 not in kept_ids:
                kept_ids[o2] = ids.get(*where[o2])
            r1, i1 = where[o1]
            per_task[r1].append((o1, kept_ids[o2], s))
            clusters.setdefault(kept_ids[o2], []).append(ids.get(r1, i1))
        (folder / "remove").mkdir(parents=True, exist_ok=True)
        for r, rows in per_task.items():
            with open(folder / "remove" / f"{r:05d}.jsonl", "w", encoding="utf-8") as fh:
                for o, kept, s in sorted(rows):
                    fh.write(json.dumps({"o": o, "kept": kept, "sim": round(float(s), 4)}, ensure_ascii=False) + "\n")
        write_json_atomic(folder / "clusters.json", clusters)
        self.stat_update("removed", value=len(removed))


class DedupFilter(CurationStep):
    """Drops the documents `DedupCluster` listed for this task (matched by their order key)."""

    kind: ClassVar[Kind] = "exact"

    def __init__(self, index: int, config: Any, parts_dir: str, folder: str) -> None:
        super().__init__(index, config, parts_dir)
        self.folder = folder

    def setup(self, rank: int) -> None:
        self._remove: dict[int, tuple[str, float]] = {}
        with open(Path(self.folder) / "remove" / f"{rank:05d}.jsonl", encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                self._remove[r["o"]] = (r["kept"], r["sim"])
        self._sim = 1.0

    def process(self, doc: Document) -> str | None:
        hit = self._remove.get(doc.metadata["order"])
        if hit is None:
            return None
        self._sim = hit[1]
        return f"{self.kind}_duplicate_of:{hit[0]}"

    def reject(self, doc: Document, reason: str) -> Record:
        extra = {"similarity": self._sim} if self.kind == "near" else {}
        return reject_record(self.stage, reason, doc, **extra)


class ExactDedupFilter(DedupFilter):
    stage = "dedup_exact"
    kind = "exact"


class NearDedupFilter(DedupFilter):
    stage = "dedup_near"
    kind = "near"
