"""The last curation phase (one task): merge every stage's per-task accounting into `stages/NN_name/`
(rejects.jsonl, manifest.json with in = kept + dropped by reason, clusters/overlap reports), check that the
counts chain (each stage's input is the previous stage's output), and write `final/` (docs.jsonl and/or
docs.parquet, all rejects, the run manifest). Everything is streamed: memory does not grow with the corpus."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from soaes_core import write_manifest
from soaes_core.atomic import atomic_dir
from soaes_core.errors import DataError


@dataclass
class StageOutputs:
    """Where one stage's per-task parts are (`parts` folder) and extra files to copy (name → source path)."""

    label: str
    parts: str
    tasks: int
    extra: dict[str, str]
    config: dict[str, Any]


def _copy_lines(paths: list[Path], dest: Any) -> int:
    n = 0
    for p in paths:
        with open(p, "rb") as fh:
            for line in fh:
                dest.write(line)
                n += 1
    return n


def merge_stage(stage: StageOutputs, stage_dir: Path, inputs: dict[str, str]) -> dict[str, Any]:
    """Merge one stage's parts into `stage_dir` (atomically); returns its counts."""
    parts = Path(stage.parts)
    counts_files = [parts / f"{r:05d}.counts.json" for r in range(stage.tasks)]
    missing = [str(p) for p in counts_files if not p.is_file()]
    if missing:
        raise DataError(f"stage {stage.label}: accounting of {len(missing)} task(s) missing ({missing[0]} ...)")
    total: dict[str, Any] = {"in": 0, "kept": 0, "dropped": 0}
    reasons: Counter[str] = Counter()
    seconds = 0.0
    for p in counts_files:
        c = json.loads(p.read_text(encoding="utf-8"))
        for k in ("in", "kept", "dropped"):
            total[k] += c[k]
        reasons.update(c["dropped_by_reason"])
        seconds += c.get("seconds", 0.0)
    total["dropped_by_reason"] = dict(sorted(reasons.items()))
    if total["in"] != total["kept"] + total["dropped"] or total["dropped"] != sum(reasons.values()):
        raise DataError(f"stage {stage.label} lost records: in {total['in']} != kept {total['kept']} + dropped "
                        f"{total['dropped']}")
    name = stage.label.split("_", 1)[1]
    with atomic_dir(stage_dir) as tmp:
        with open(tmp / "rejects.jsonl", "wb") as out:
            n = _copy_lines([parts / f"{r:05d}.rejects.jsonl" for r in range(stage.tasks)], out)
        if n != total["dropped"]:
            raise DataError(f"stage {stage.label}: {n} rejects written but {total['dropped']} counted")
        for fname, src in stage.extra.items():
            _extra(Path(src), tmp / fname, stage.tasks)
        write_manifest(tmp, f"curate:{name}", inputs=inputs, config=None, counts=total,
                       timings={name: seconds}, extra={"stage_config": stage.config, "tasks": stage.tasks})
    return {**total, "seconds": round(seconds, 3)}


def _extra(src: Path, dest: Path, tasks: int) -> None:
    """Copy a stage's extra output: a file as is, or a folder's per-task parts merged (`*.overlaps.jsonl`
    concatenated, `*.report.json` merged as decontamination reports)."""
    if src.is_file():
        shutil.copyfile(src, dest)
    elif dest.suffix == ".jsonl":
        with open(dest, "wb") as out:
            _copy_lines([p for r in range(tasks) if (p := src / f"{r:05d}.{dest.stem}.jsonl").is_file()], out)
    else:
        from .decontam import OverlapReport

        report = None
        for r in range(tasks):
            p = src / f"{r:05d}.report.json"
            if p.is_file():
                part = OverlapReport.from_dict(json.loads(p.read_text(encoding="utf-8")))
                report = part if report is None else report.merge(part)
        dest.write_text(json.dumps(report.to_dict() if report else {}, ensure_ascii=False, indent=1),
                        encoding="utf-8")


class FinalizeStep(PipelineStep):
    """Merges the stages' accounting and writes `final/`; runs as a one-task phase on any executor."""

    type = "soaes-data"
    name = "finalize"

    def __init__(self, out_dir: str, stages: list[StageOutputs], docs_dir: str, docs_tasks: int,
                 output_format: str, inputs: list[str], config: dict[str, Any]) -> None:
        super().__init__()
        self.out_dir, self.stages, self.docs_dir, self.docs_tasks = out_dir, stages, docs_dir, docs_tasks
        self.output_format, self.inputs, self.config = output_format, inputs, config

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        out = Path(self.out_dir)
        inputs = {f"input{i}": p for i, p in enumerate(self.inputs)}
        summary = []
        prev_kept = None
        for st in self.stages:
            counts = merge_stage(st, out / "stages" / st.label, inputs)
            if prev_kept is not None and counts["in"] != prev_kept:
                raise DataError(f"stage {st.label} received {counts['in']} documents but the stage before kept "
                                f"{prev_kept}")
            prev_kept = counts["kept"]
            summary.append({"name": st.label.split("_", 1)[1], **counts})
        shards = [Path(self.docs_dir) / f"{r:05d}.jsonl" for r in range(self.docs_tasks)]
        with atomic_dir(out / "final") as tmp:
            n_docs = self._write_docs(shards, tmp)
            if n_docs != prev_kept:
                raise DataError(f"final output has {n_docs} documents but the last stage kept {prev_kept}")
            with open(tmp / "rejects.jsonl", "wb") as fh:
                _copy_lines([out / "stages" / st.label / "rejects.jsonl" for st in self.stages], fh)
            write_manifest(tmp, "curate", inputs=inputs, config=self.config,
                           counts={"in": summary[0]["in"], "kept": n_docs,
                                   "dropped": sum(s["dropped"] for s in summary)},
                           extra={"stages": summary})
        self.stat_update("documents", value=n_docs)

    def _write_docs(self, shards: list[Path], tmp: Path) -> int:
        n = 0
        if self.output_format in ("jsonl", "both"):
            with open(tmp / "docs.jsonl", "wb") as fh:
                n = _copy_lines(shards, fh)
        if self.output_format in ("parquet", "both"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("text", pa.string()),
                                ("meta", pa.string())])
            rows: dict[str, list[Any]] = {k: [] for k in schema.names}
            n = 0
            with pq.ParquetWriter(tmp / "docs.parquet", schema, compression="zstd") as writer:
                for shard in shards:
                    with open(shard, encoding="utf-8") as fh:
                        for line in fh:
                            d = json.loads(line)
                            rows["id"].append(d["id"])
                            rows["source"].append(d["source"])
                            rows["text"].append(d["text"])
                            rows["meta"].append(json.dumps(d.get("meta", {}), ensure_ascii=False))
                            n += 1
                            if len(rows["id"]) >= 2000:
                                writer.write_table(pa.table(rows, schema=schema))
                                rows = {k: [] for k in schema.names}
                if rows["id"] or n == 0:
                    writer.write_table(pa.table(rows, schema=schema))
        return n
