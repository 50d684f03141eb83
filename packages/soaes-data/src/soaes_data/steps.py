"""Curation stages as datatrove `PipelineStep`s, streamed one document at a time per task.

Every stage is a `CurationStep`: `process(doc)` returns None to keep the document (possibly changed) or a
reason to drop it; the base class writes each task's rejects (with the reason) and counts (in = kept +
dropped, by reason) under `parts/NN_stage/`, which `FinalizeStep` merges. A new per-document stage is one
`CurationStep` subclass plus one `STAGE_REGISTRY` entry. Documents travel as datatrove `Document`s whose
`metadata` holds `source`, our free-form `meta` and `order`: the (input file, position) key that fixes the
global input order whatever the number of tasks.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from soaes_core.atomic import temp_path
from soaes_core.errors import DataError

from .cleaning import clean_text
from .filters import check_language, check_length, check_quality, mask_pii, relevance_scorer
from .readers import SUFFIXES, FieldMap, _record_doc, iter_records, read_document

Record = dict[str, Any]
ORDER_SCALE = 1 << 40  # order key = file index × ORDER_SCALE + position in the file (byte offset or record)


# ---- documents <-> records ---------------------------------------------------------------------------------
def make_document(doc_id: str, source: str, text: str, meta: dict[str, Any], order: int) -> Document:
    return Document(text=text, id=doc_id, metadata={"source": source, "meta": meta, "order": order})


def reject_record(stage: str, reason: str, doc: Document | None = None, **extra: Any) -> Record:
    if doc is None:
        return {"stage": stage, "reason": reason, "id": None, **extra}
    md = doc.metadata
    return {"stage": stage, "reason": reason, "id": doc.id, "source": md.get("source"),
            "line": md.get("meta", {}).get("line"), "text": doc.text[:200], **extra}


def reason_key(stage: str, reason: str) -> str:
    """The bucket a reason is counted under (its prefix; read errors all count as `read_error`)."""
    return "read_error" if stage == "read" else reason.split(":")[0]


# ---- per-task accounting -----------------------------------------------------------------------------------
class Accounting:
    """One stage's bookkeeping in one task: `NNNNN.rejects.jsonl` and, when the task's stream ends,
    `NNNNN.counts.json` (in, kept, dropped, dropped_by_reason, seconds: CPU time of the stage's own work)."""

    def __init__(self, folder: Path, stage: str, rank: int) -> None:
        self.folder, self.stage, self.rank = folder, stage, rank
        folder.mkdir(parents=True, exist_ok=True)
        self._rejects = open(folder / f"{rank:05d}.rejects.jsonl", "w", encoding="utf-8")
        self.kept = 0
        self.reasons: Counter[str] = Counter()
        self.seconds = 0.0

    def reject(self, record: Record) -> None:
        self.reasons[reason_key(self.stage, record["reason"])] += 1
        self._rejects.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

    def close(self) -> dict[str, Any]:
        self._rejects.close()
        dropped = sum(self.reasons.values())
        counts = {"in": self.kept + dropped, "kept": self.kept, "dropped": dropped,
                  "dropped_by_reason": dict(sorted(self.reasons.items())), "seconds": round(self.seconds, 4)}
        write_json_atomic(self.folder / f"{self.rank:05d}.counts.json", counts)
        return counts


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = temp_path(path)  # pid + host in the name: the next run can clean it up after a kill
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


class CurationStep(PipelineStep):
    """A per-document curation stage. Subclasses set `stage` and implement `process`; `setup` runs once per
    task (in the worker) before the first document, for things that should not be pickled (models, lexicons)."""

    type = "soaes-data"
    stage: ClassVar[str] = ""

    def __init__(self, index: int, config: Any, parts_dir: str) -> None:
        super().__init__()
        self.index, self.config, self.parts_dir = index, config, parts_dir
        self.name = self.stage

    @property
    def label(self) -> str:
        return f"{self.index:02d}_{self.stage}"

    def setup(self, rank: int) -> None:
        """Per-task initialisation (default: nothing)."""

    def process(self, doc: Document) -> str | None:
        raise NotImplementedError

    def reject(self, doc: Document, reason: str) -> Record:
        return reject_record(self.stage, reason, doc)

    def finish(self, rank: int) -> None:
        """Called once the task's stream has ended (default: nothing)."""

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.setup(rank)
        acc = Accounting(Path(self.parts_dir) / self.label, self.stage, rank)
        clock = time.process_time  # CPU seconds: a busy machine does not inflate them
        for doc in data or ():
            t0 = clock()
            reason = self.process(doc)
            acc.seconds += clock() - t0
            if reason is None:
                acc.kept += 1
                yield doc
            else:
                acc.reject(self.reject(doc, reason))
        counts = acc.close()
        self.finish(rank)
        self.stat_update("total", value=counts["in"])
        self.stat_update("forwarded", value=counts["kept"])
        self.stat_update("dropped", value=counts["dropped"])


# ---- the per-document stages -------------------------------------------------------------------------------
class CleanStep(CurationStep):
    stage = "clean"

    def process(self, doc: Document) -> str | None:
        text = clean_text(doc.text, self.config)
        if not text:
            return "empty_after_cleaning"
        doc.text = text
        return None


class PiiStep(CurationStep):
    stage = "pii"

    def process(self, doc: Document) -> str | None:
        text, counts = mask_pii(doc.text, self.config)
        if counts:
            doc.text = text
            doc.metadata["meta"] = {**doc.metadata.get("meta", {}), "pii_masked": dict(counts)}
        return None


class LengthStep(CurationStep):
    stage = "length"

    def process(self, doc: Document) -> str | None:
        return check_length(doc.text, self.config)


class LanguageStep(CurationStep):
    stage = "language"

    def process(self, doc: Document) -> str | None:
        return check_language(doc.text, self.config)


class QualityStep(CurationStep):
    stage = "quality"

    def process(self, doc: Document) -> str | None:
        return check_quality(doc.text, self.config)


class RelevanceStep(CurationStep):
    stage = "relevance"

    def setup(self, rank: int) -> None:
        self._scorer = relevance_scorer(self.config)

    def process(self, doc: Document) -> str | None:
        score = float(self._scorer(doc.text))
        doc.metadata["meta"] = {**doc.metadata.get("meta", {}), "relevance": round(score, 4)}
        return f"relevance:<{self.config.min_score}" if score < self.config.min_score else None


class DecontaminateStep(CurationStep):
    """Drops documents sharing long n-grams with benchmark items; per task, `NNNNN.overlaps.jsonl` (one row per
    overlap) and `NNNNN.report.json` (overlaps per benchmark and subject, merged by `FinalizeStep`)."""

    stage = "decontaminate"

    def setup(self, rank: int) -> None:
        from .decontam import NgramIndex, OverlapReport

        self._index = NgramIndex.from_config(self.config)
        self._report = OverlapReport(self._index.describe())
        folder = Path(self.parts_dir) / self.label
        folder.mkdir(parents=True, exist_ok=True)
        self._overlaps = open(folder / f"{rank:05d}.overlaps.jsonl", "w", encoding="utf-8")
        self._found: list[Any] = []

    def process(self, doc: Document) -> str | None:
        from .decontam import OverlapReport, is_contaminated, reject_reason

        found = self._index.overlaps(doc.text)
        bad = is_contaminated(found, self.config.min_overlaps)
        self._report.add(doc.id, found, bad)
        if not bad:
            return None
        for row in OverlapReport.rows(doc.id, found):
            self._overlaps.write(json.dumps(row, ensure_ascii=False) + "\n")
        return reject_reason(found)

    def finish(self, rank: int) -> None:
        self._overlaps.close()
        write_json_atomic(Path(self.parts_dir) / self.label / f"{rank:05d}.report.json", self._report.to_dict())


STAGE_REGISTRY: dict[str, type[CurationStep]] = {
    cls.stage: cls for cls in (CleanStep, PiiStep, LengthStep, LanguageStep, QualityStep, RelevanceStep,
                               DecontaminateStep)
}


# ---- reading raw inputs, sharded by byte ranges --------------------------------------------------------------
@dataclass(frozen=True)
class InputFile:
    """One input file: its index in the sorted listing (part of every document's order key), path, size."""

    index: int
    path: str
    size: int


def list_input_files(inputs: list[str]) -> list[InputFile]:
    """Every input file in a fixed order: the inputs as given, directories walked in sorted order (hidden
    files and files of unknown type inside directories skipped)."""
    out: list[InputFile] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES and not any(
                part.startswith(".") for part in f.relative_to(p).parts))
        elif p.exists():
            files = [p]
        else:
            raise DataError("no such file or directory", path=str(p))
        out += [InputFile(len(out) + k, str(f), f.stat().st_size) for k, f in enumerate(files)]
    return out


@dataclass(frozen=True)
class ReadUnit:
    """A piece of one file for one task: JSONL files are split at line starts by byte range [start, end),
    other files are read whole by one task."""

    file: InputFile
    start: int
    end: int


def plan_read_units(files: list[InputFile], tasks: int) -> list[list[ReadUnit]]:
    """Split the concatenated inputs into `tasks` contiguous byte ranges of equal size; task order is input
    order, so concatenating the tasks' outputs gives the documents in input order."""
    total = sum(f.size for f in files)
    bounds = [total * r // tasks for r in range(tasks + 1)]
    plan: list[list[ReadUnit]] = [[] for _ in range(tasks)]
    offset = 0
    for f in files:
        if f.path.lower().endswith(".jsonl"):  # an empty JSONL file holds no records: no unit
            for r in range(tasks):
                lo, hi = max(bounds[r], offset), min(bounds[r + 1], offset + f.size)
                if lo < hi:
                    plan[r].append(ReadUnit(f, lo - offset, hi - offset))
        else:
            owner = next((r for r in range(tasks) if bounds[r] <= offset < bounds[r + 1]), tasks - 1)
            plan[owner].append(ReadUnit(f, 0, f.size))
        offset += f.size
    return plan


def count_read_units(files: list[InputFile], limit: int) -> int:
    """How many tasks `plan_read_units` can give a document to, counted up to `limit`: one per line start of a
    JSONL file (its byte ranges split at line starts), one per other non-empty file (read whole by one task)."""
    n = 0
    for f in files:
        if n >= limit:
            break
        if not f.path.lower().endswith(".jsonl"):
            n += f.size > 0
            continue
        with open(f.path, "rb") as fh:
            previous = b"\n"  # the file's first byte starts a line
            while n < limit and (chunk := fh.read(1 << 20)):
                n += (previous + chunk[:-1]).count(b"\n")  # a newline followed by a byte starts a line
                previous = chunk[-1:]
    return min(n, limit)


def _count_newlines(fh: Any, end: int) -> int:
    fh.seek(0)
    n, left = 0, end
    while left > 0:
        chunk = fh.read(min(left, 1 << 24))
        if not chunk:
            break
        n += chunk.count(b"\n")
        left -= len(chunk)
    return n


def iter_jsonl_range(unit: ReadUnit, fields: FieldMap) -> Iterator[Document | DataError]:
    """Documents (or a `DataError` per bad line) of the JSONL lines that start inside the unit's byte range."""
    path = unit.file.path
    ppath = Path(path)
    with open(path, "rb") as fh:
        start = unit.start
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # the line in progress belongs to the task before
            start = fh.tell()
        lineno = _count_newlines(fh, start) + 1 if start > 0 else 1
        fh.seek(start)
        pos = start
        while pos < unit.end:
            raw = fh.readline()
            if not raw:
                break
            line_pos, pos = pos, pos + len(raw)
            try:
                text = raw.decode("utf-8-sig" if line_pos == 0 else "utf-8")
            except UnicodeDecodeError as err:
                yield DataError(f"not valid UTF-8 ({err.reason} at byte {err.start})", path=path, line=lineno)
                lineno += 1
                continue
            if text.strip():
                try:
                    obj = json.loads(text)
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                except (json.JSONDecodeError, ValueError) as err:
                    yield DataError(f"invalid JSON: {err}", path=path, line=lineno)
                else:
                    try:
                        d = _record_doc(obj, ppath, lineno, fields)
                    except DataError as err:
                        yield err
                    else:
                        doc = make_document(d.id, d.source, d.text, d.meta, unit.file.index * ORDER_SCALE + line_pos)
                        del raw, text, obj, d  # while the document goes down the pipeline, no other copy waits here
                        yield doc
            lineno += 1


def iter_unit(unit: ReadUnit, fields: FieldMap) -> Iterator[Document | DataError]:
    """Documents of one read unit (a JSONL byte range, a JSON file's records, or a single-document file)."""
    f = unit.file
    suffix = Path(f.path).suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from iter_jsonl_range(unit, fields)
        elif suffix == ".json":
            for k, item in enumerate(iter_records(f.path, fields, on_error="skip")):
                if isinstance(item, DataError):
                    yield item
                else:
                    yield make_document(item.id, item.source, item.text, item.meta, f.index * ORDER_SCALE + k)
        else:
            d = read_document(f.path)
            yield make_document(d.id, d.source, d.text, d.meta, f.index * ORDER_SCALE)
    except DataError as err:
        yield err


class ReadStep(PipelineStep):
    """Stage `read`: this task's share of the input files (`plan_read_units`) as documents; unreadable files
    and records go to the rejects file (or raise, with `on_error: raise`)."""

    type = "soaes-data"
    name = "read"
    stage = "read"

    def __init__(self, units: list[list[ReadUnit]], fields: FieldMap, on_error: Literal["raise", "skip"],
                 parts_dir: str) -> None:
        super().__init__()
        self.units, self.fields, self.on_error, self.parts_dir = units, fields, on_error, parts_dir

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if len(self.units) != world_size:
            raise DataError(f"read plan has {len(self.units)} tasks but the executor runs {world_size}")
        acc = Accounting(Path(self.parts_dir) / "00_read", "read", rank)
        clock = time.process_time  # CPU seconds: a busy machine does not inflate them
        t0 = clock()
        for unit in self.units[rank]:
            for item in iter_unit(unit, self.fields):
                if isinstance(item, DataError):
                    if self.on_error == "raise":
                        raise item
                    acc.reject({"stage": "read", "reason": str(item), "id": None, "source": item.path,
                                "line": item.line})
                    continue
                acc.kept += 1
                acc.seconds += clock() - t0
                yield item
                t0 = clock()
        acc.close()


# ---- intermediate shards between phases ----------------------------------------------------------------------
class ShardWriter(PipelineStep):
    """Writes this task's documents to `folder/NNNNN.jsonl` (atomically, when the stream ends)."""

    type = "soaes-data"
    name = "write shard"

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{rank:05d}.jsonl"
        tmp = temp_path(final)  # pid + host in the name: the next run can clean it up after a kill
        dumps = json.dumps
        with open(tmp, "w", encoding="utf-8") as fh:
            for doc in data or ():
                md = doc.metadata
                fh.write(dumps({"id": doc.id, "source": md.get("source"), "text": doc.text,
                                "meta": md.get("meta", {}), "order": md.get("order")}, ensure_ascii=False) + "\n")
                yield doc
        os.replace(tmp, final)


class ShardReader(PipelineStep):
    """Reads back the documents `ShardWriter` wrote for this task in the previous phase."""

    type = "soaes-data"
    name = "read shard"

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        loads = json.loads
        with open(Path(self.folder) / f"{rank:05d}.jsonl", encoding="utf-8") as fh:
            for line in fh:
                r = loads(line)
                doc = Document(text=r["text"], id=r["id"],
                               metadata={"source": r["source"], "meta": r["meta"], "order": r["order"]})
                del line, r  # only the document keeps the text while it goes down the pipeline
                yield doc
