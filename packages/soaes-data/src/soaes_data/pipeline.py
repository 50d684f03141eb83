"""`soaes-data curate RECIPE.yaml`: a YAML recipe of curation stages over raw documents.

Each stage reads the previous stage's `docs.jsonl` and writes, atomically, `stages/NN_name/` with
`docs.jsonl` (kept), `rejects.jsonl` (dropped, with reasons) and `manifest.json` (counts: in = kept +
dropped, reasons, a fingerprint of its input and config). A re-run skips stages whose fingerprint is
unchanged and whose outputs verify; an interrupted run resumes at the first unfinished stage.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from soaes_core import (
    Timer,
    load_config,
    progress,
    read_manifest,
    sha256_bytes,
    sha256_file,
    to_dict,
    verify_outputs,
    write_manifest,
)
from soaes_core.atomic import atomic_dir
from soaes_core.errors import ConfigError, DataError

from . import __version__
from .cleaning import CleanConfig, clean_text
from .decontam import DecontamConfig, NgramIndex
from .dedup import DedupConfig, exact_key, find_exact_duplicates, find_near_duplicates, minhash_signature
from .filters import (
    LanguageConfig,
    LengthConfig,
    PiiConfig,
    QualityConfig,
    RelevanceConfig,
    check_language,
    check_length,
    check_quality,
    mask_pii,
    relevance_scorer,
)
from .readers import FieldMap, iter_documents

STAGES = ("read", "clean", "pii", "length", "language", "quality", "dedup_exact", "dedup_near", "relevance",
          "decontaminate")
DEFAULT_STAGES = ["read", "clean", "pii", "length", "language", "quality", "dedup_exact", "dedup_near", "relevance"]
Record = dict[str, Any]
Result = tuple[Record | None, str | None]


@dataclass
class ReadConfig:
    """Field mapping for JSON/JSONL inputs (`text_field`, optional `id_field`, `meta_fields`)."""

    text_field: str = "text"
    id_field: str | None = None
    meta_fields: list[str] = field(default_factory=list)


@dataclass
class RecipeConfig:
    """A curation recipe: inputs (files/dirs, relative to the recipe), output dir, stage order and settings."""

    inputs: list[str]
    output_dir: str
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    on_error: Literal["raise", "skip"] = "skip"
    num_proc: int = 1
    output_format: Literal["jsonl", "parquet", "both"] = "both"
    read: ReadConfig = field(default_factory=ReadConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    relevance: RelevanceConfig = field(default_factory=RelevanceConfig)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
        if not self.stages or self.stages[0] != "read":
            raise ValueError("stages must start with 'read'")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError("a stage is listed twice")
        if self.num_proc < 1:
            raise ValueError("num_proc must be >= 1")
        if not self.inputs:
            raise ValueError("inputs is empty")


@dataclass
class StageReport:
    name: str
    counts: dict[str, Any]
    skipped: bool
    dir: Path


def load_recipe(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """Load a recipe; relative `inputs`, eval files and lexicon are resolved against the recipe's folder,
    `output_dir` against the working directory."""
    cfg = load_config(path, RecipeConfig, overrides)
    base = Path(path).resolve().parent

    def res(p: str) -> str:
        return str(p) if Path(p).is_absolute() else str(base / p)

    cfg.inputs = [res(p) for p in cfg.inputs]
    cfg.output_dir = str(Path(cfg.output_dir).resolve())  # relative to the working directory
    cfg.decontaminate.eval_files = [res(p) for p in cfg.decontaminate.eval_files]
    if cfg.relevance.lexicon:
        cfg.relevance.lexicon = res(cfg.relevance.lexicon)
    return cfg


# ---- per-document stage functions (pure, picklable through datasets' dill) -------------------------------
def _clean(cfg: CleanConfig) -> Callable[[Record], Result]:
    def fn(rec: Record) -> Result:
        text = clean_text(rec["text"], cfg)
        if not text:
            return None, "empty_after_cleaning"
        return {**rec, "text": text}, None
    return fn


def _pii(cfg: PiiConfig) -> Callable[[Record], Result]:
    def fn(rec: Record) -> Result:
        text, counts = mask_pii(rec["text"], cfg)
        meta = {**rec.get("meta", {}), "pii_masked": dict(counts)} if counts else rec.get("meta", {})
        return {**rec, "text": text, "meta": meta}, None
    return fn


def _check(check: Callable[..., str | None], cfg: Any) -> Callable[[Record], Result]:
    def fn(rec: Record) -> Result:
        reason = check(rec["text"], cfg)
        return (None, reason) if reason else (rec, None)
    return fn


def _relevance(cfg: RelevanceConfig) -> Callable[[Record], Result]:
    scorer = relevance_scorer(cfg)

    def fn(rec: Record) -> Result:
        score = float(scorer(rec["text"]))
        out = {**rec, "meta": {**rec.get("meta", {}), "relevance": round(score, 4)}}
        return (None, f"relevance:<{cfg.min_score}") if score < cfg.min_score else (out, None)
    return fn


def map_records(records: list[Record], fn: Callable[[Record], Result], num_proc: int,
                desc: str) -> list[Result]:
    """Apply `fn` to every record, in order; with num_proc > 1 through `datasets.map` worker processes."""
    if num_proc <= 1 or len(records) < 1000:
        return [fn(r) for r in progress(records, desc=desc, unit="doc")]
    import datasets

    ds = datasets.Dataset.from_dict({"rec": [json.dumps(r, ensure_ascii=False) for r in records]})

    def batch(b: dict[str, list[str]]) -> dict[str, list[str]]:
        return {"out": [json.dumps(fn(json.loads(x)), ensure_ascii=False) for x in b["rec"]]}

    from soaes_core.progress import progress_enabled

    bars = datasets.utils.logging.is_progress_bar_enabled()
    if not progress_enabled():
        datasets.disable_progress_bars()  # honour SOAES_PROGRESS=0 for datasets' own bars too
    try:
        out = ds.map(batch, batched=True, batch_size=500, num_proc=num_proc, remove_columns=["rec"], desc=desc,
                     load_from_cache_file=False, keep_in_memory=True)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return [tuple(json.loads(x)) for x in out["out"]]  # type: ignore[misc]


# ---- the runner -------------------------------------------------------------------------------------------
def _read_docs(path: Path) -> list[Record]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _write_lines(path: Path, rows: Iterator[Record] | list[Record]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def _reject(rec: Record, stage: str, reason: str) -> Record:
    return {"stage": stage, "reason": reason, "id": rec.get("id"), "source": rec.get("source"),
            "line": rec.get("meta", {}).get("line"), "text": rec.get("text", "")[:200]}


def _input_fingerprint(cfg: RecipeConfig) -> dict[str, str]:
    files: dict[str, str] = {}
    for p in cfg.inputs:
        path = Path(p)
        if not path.exists():
            raise DataError("no such file or directory", path=str(path))
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file() and not any(part.startswith(".") for part in f.parts[len(path.parts):]):
                files[str(f)] = sha256_file(f)
    return files


def _stage_config(cfg: RecipeConfig, name: str) -> Any:
    key = {"dedup_exact": "dedup", "dedup_near": "dedup"}.get(name, name)
    return to_dict(getattr(cfg, key))


def run_stage(name: str, cfg: RecipeConfig, docs: list[Record]) -> tuple[list[Record], list[Record],
                                                                          dict[str, Any]]:
    """Run one non-read stage over `docs`; returns (kept, rejects, extra outputs to write)."""
    kept: list[Record] = []
    rejects: list[Record] = []
    extra: dict[str, Any] = {}
    fns: dict[str, Callable[[], Callable[[Record], Result]]] = {
        "clean": lambda: _clean(cfg.clean), "pii": lambda: _pii(cfg.pii),
        "length": lambda: _check(check_length, cfg.length), "language": lambda: _check(check_language, cfg.language),
        "quality": lambda: _check(check_quality, cfg.quality), "relevance": lambda: _relevance(cfg.relevance)}
    if name in fns:
        # length and language checks cost less than shipping records to worker processes: run them here
        num_proc = 1 if name in ("length", "language") and not cfg.language.detector else cfg.num_proc
        for rec, (out, reason) in zip(docs, map_records(docs, fns[name](), num_proc, name), strict=True):
            if out is None:
                rejects.append(_reject(rec, name, reason or "dropped"))
            else:
                kept.append(out)
    elif name == "dedup_exact":
        keys = [exact_key(r["text"]) for r in progress(docs, desc="dedup_exact", unit="doc")]
        dup = find_exact_duplicates(keys, [r["id"] for r in docs])
        clusters: dict[str, list[str]] = {}
        for i, rec in enumerate(docs):
            if i in dup:
                rejects.append(_reject(rec, name, f"exact_duplicate_of:{dup[i]}"))
                clusters.setdefault(dup[i], []).append(rec["id"])
            else:
                kept.append(rec)
        extra["clusters.json"] = clusters
    elif name == "dedup_near":
        sig_fn = _signature(cfg.dedup)
        sigs = [x[0]["sig"] for x in map_records(docs, sig_fn, cfg.num_proc, "minhash")]  # type: ignore[index]
        import numpy as np

        clusters = {}
        pairs = find_near_duplicates((np.asarray(s, dtype=np.uint64) for s in sigs), [r["id"] for r in docs],
                                     cfg.dedup)
        for (_i, kept_key, sim), rec in zip(pairs, docs, strict=True):
            if kept_key is None:
                kept.append(rec)
                continue
            kept_id = kept_key.split(":", 1)[1]
            rejects.append({**_reject(rec, name, f"near_duplicate_of:{kept_id}"), "similarity": round(sim, 4)})
            clusters.setdefault(kept_id, []).append(rec["id"])
        extra["clusters.json"] = clusters
    elif name == "decontaminate":
        index = NgramIndex(cfg.decontaminate.eval_files, cfg.decontaminate.ngram)
        overlaps = []
        for rec in progress(docs, desc="decontaminate", unit="doc"):
            found = index.overlaps(rec["text"])
            total = sum(o.count for o in found)
            if total >= cfg.decontaminate.min_overlaps:
                rejects.append(_reject(rec, name, f"contaminated:{Path(found[0].eval_file).name}"))
                overlaps += [{"id": rec["id"], "eval_file": o.eval_file, "eval_item": o.eval_item,
                              "ngrams": o.count, "example": o.example} for o in found]
            else:
                kept.append(rec)
        extra["overlaps.jsonl"] = overlaps
    else:  # pragma: no cover - guarded by RecipeConfig
        raise ConfigError(f"unknown stage {name}")
    return kept, rejects, extra


def _signature(dcfg: DedupConfig) -> Callable[[Record], Result]:
    def fn(rec: Record) -> Result:
        return {"sig": [int(x) for x in minhash_signature(rec["text"], dcfg)]}, None
    return fn


def _read_stage(cfg: RecipeConfig) -> tuple[list[Record], list[Record]]:
    fields = FieldMap(cfg.read.text_field, cfg.read.id_field, tuple(cfg.read.meta_fields))
    kept: list[Record] = []
    rejects: list[Record] = []
    seen: Counter[str] = Counter()
    for item in progress(iter_documents(list(cfg.inputs), fields, cfg.on_error), desc="read", unit="doc"):
        if isinstance(item, DataError):
            rejects.append({"stage": "read", "reason": str(item), "id": None, "source": item.path, "line": item.line})
        else:
            seen[item.id] += 1
            if seen[item.id] > 1:  # identical content: keep ids unique (and stable) by occurrence number
                item.id = f"{item.id}-{seen[item.id]}"
            kept.append(item.to_dict())
    return kept, rejects


def _is_done(stage_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    manifest = read_manifest(stage_dir)
    if manifest is None or manifest.get("fingerprint") != fingerprint or verify_outputs(stage_dir):
        return None
    return manifest


def run_recipe(cfg: RecipeConfig, force: bool = False) -> list[StageReport]:
    """Run the recipe's stages in order, skipping finished ones; writes `final/` and a run manifest."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports: list[StageReport] = []
    prev_fp = sha256_bytes(json.dumps(_input_fingerprint(cfg), sort_keys=True).encode())
    prev_docs_path: Path | None = None
    timer = Timer()
    for k, name in enumerate(cfg.stages):
        stage_dir = out / "stages" / f"{k:02d}_{name}"
        conf = {"inputs": cfg.inputs, "read": to_dict(cfg.read), "on_error": cfg.on_error} if name == "read" \
            else _stage_config(cfg, name)
        fp = sha256_bytes(json.dumps({"stage": name, "config": conf, "input": prev_fp, "version": __version__},
                                     sort_keys=True, default=str).encode())
        done = None if force else _is_done(stage_dir, fp)
        if done is None:
            with timer(name):
                if name == "read":
                    kept, rejects = _read_stage(cfg)
                    extra: dict[str, Any] = {}
                    n_in = len(kept) + len(rejects)
                else:
                    assert prev_docs_path is not None
                    docs = _read_docs(prev_docs_path)
                    n_in = len(docs)
                    kept, rejects, extra = run_stage(name, cfg, docs)
                    del docs
            if n_in != len(kept) + len(rejects):
                raise DataError(f"stage {name} lost records: in {n_in} != kept {len(kept)} + dropped {len(rejects)}")
            counts = {"in": n_in, "kept": len(kept), "dropped": len(rejects),
                      "dropped_by_reason": dict(Counter(r["reason"].split(":")[0] if name != "read" else "read_error"
                                                        for r in rejects))}
            with atomic_dir(stage_dir) as tmp:
                _write_lines(tmp / "docs.jsonl", kept)
                _write_lines(tmp / "rejects.jsonl", rejects)
                for fname, obj in extra.items():
                    if fname.endswith(".jsonl"):
                        _write_lines(tmp / fname, obj)
                    else:
                        (tmp / fname).write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")
                write_manifest(tmp, f"curate:{name}", inputs={"docs": prev_docs_path} if prev_docs_path else
                               {f"input{i}": p for i, p in enumerate(cfg.inputs)}, config=None, counts=counts,
                               timings={name: timer.timings.get(name, 0.0)},
                               extra={"fingerprint": fp, "stage_config": conf})
            reports.append(StageReport(name, counts, False, stage_dir))
        else:
            reports.append(StageReport(name, done["counts"], True, stage_dir))
        prev_fp, prev_docs_path = fp, stage_dir / "docs.jsonl"
    assert prev_docs_path is not None
    _write_final(cfg, out, prev_docs_path, reports)
    return reports


def _write_final(cfg: RecipeConfig, out: Path, docs_path: Path, reports: list[StageReport]) -> None:
    docs = _read_docs(docs_path)
    with atomic_dir(out / "final") as tmp:
        if cfg.output_format in ("jsonl", "both"):
            _write_lines(tmp / "docs.jsonl", docs)
        if cfg.output_format in ("parquet", "both"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"id": [d["id"] for d in docs], "source": [d["source"] for d in docs],
                              "text": [d["text"] for d in docs],
                              "meta": [json.dumps(d.get("meta", {}), ensure_ascii=False) for d in docs]})
            pq.write_table(table, tmp / "docs.parquet", compression="zstd")
        _write_lines(tmp / "rejects.jsonl", (r for rep in reports
                                              for r in _read_docs(rep.dir / "rejects.jsonl")))
        stages = [{"name": r.name, "skipped": r.skipped, **r.counts} for r in reports]
        write_manifest(tmp, "curate", inputs={f"input{i}": p for i, p in enumerate(cfg.inputs)}, config=cfg,
                       counts={"in": reports[0].counts["in"], "kept": len(docs),
                               "dropped": sum(r.counts["dropped"] for r in reports)},
                       extra={"stages": stages})
