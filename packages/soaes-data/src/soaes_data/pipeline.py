"""`soaes-data curate RECIPE.yaml`: a YAML curation config compiled into datatrove pipelines.

The stages (read, clean, pii, length, language, quality, dedup_exact, dedup_near, relevance, decontaminate)
are datatrove `PipelineStep`s streamed one document at a time in each of `tasks` shards. A run is a chain of
phases, each one datatrove executor run (`executor: local | slurm | ray`):

    segment (tasks):  read or read-back → [dedup filters] → per-document stages → [dedup signatures] → shard
    buckets (bucket files over ≤ tasks) → cluster (one task)      per dedup stage, between two segments
    finalize (one task): stages/NN_name/{rejects.jsonl, manifest.json}, final/{docs.jsonl, docs.parquet, ...}

Each phase lives in `work/PP_name/` (datatrove's logs, stats and completion markers, plus its outputs) with a
fingerprint of its settings and of the phases before it: an unchanged phase is skipped, a killed run resumes
at the first unfinished task, and a changed setting re-runs that phase and everything after it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from soaes_core import load_config, read_manifest, sha256_bytes, to_dict, verify_outputs
from soaes_core.atomic import remove_stale_temps
from soaes_core.errors import ConfigError, DataError

from . import __version__
from .cleaning import CleanConfig
from .decontam import DecontamConfig
from .dedup import DedupConfig
from .dedup_steps import (
    DedupBuckets,
    DedupCluster,
    DedupSignature,
    ExactDedupFilter,
    NearDedupFilter,
    dedup_layout,
)
from .executors import ExecutorKind, ensure_ray, make_executor, quiet_datatrove_logs, release_free_memory
from .filters import LanguageConfig, LengthConfig, PiiConfig, QualityConfig, RelevanceConfig
from .finalize import FinalizeStep, StageOutputs
from .readers import FieldMap
from .steps import (
    STAGE_REGISTRY,
    ReadStep,
    ShardReader,
    ShardWriter,
    count_read_units,
    list_input_files,
    plan_read_units,
)

DEDUP_STAGES = {"dedup_exact": ("exact", ExactDedupFilter), "dedup_near": ("near", NearDedupFilter)}
STAGES = ("read", *STAGE_REGISTRY, *DEDUP_STAGES)
DEFAULT_STAGES = ["read", "clean", "pii", "length", "language", "quality", "dedup_exact", "dedup_near", "relevance",
                  "decontaminate"]


@dataclass
class ReadConfig:
    """Field mapping for JSON/JSONL inputs (`text_field`, optional `id_field`, `meta_fields`)."""

    text_field: str = "text"
    id_field: str | None = None
    meta_fields: list[str] = field(default_factory=list)


@dataclass
class CurationConfig:
    """A curation recipe: inputs (files/dirs, relative to the recipe), output dir, stage order, where it runs
    (`executor`, `tasks` shards, `workers` at a time, `engine` options of that executor) and each stage's
    settings. `decontaminate` runs only when it has benchmark data (eval files/dirs or fetched benchmarks)."""

    inputs: list[str] = field(metadata={"help": "Input files or folders (relative to the recipe's folder)."})
    output_dir: str = field(metadata={"help": "Output folder (relative to the working directory)."})
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES), metadata={
        "help": "Stage order, starting with read."})
    on_error: Literal["raise", "skip"] = field(default="skip", metadata={
        "help": "A document that cannot be read: stop, or skip it (reason in rejects)."})
    executor: ExecutorKind = field(default="local", metadata={"help": "Where to run (datatrove executor)."})
    tasks: int = field(default=1, metadata={
        "help": "Shards the corpus is split into (>= 1); the kept documents do not depend on it."})
    workers: int = field(default=1, metadata={"help": "Tasks run at the same time (>= 1)."})
    engine: dict[str, Any] = field(default_factory=dict)
    num_proc: int | None = field(default=None, metadata={
        "help": "Deprecated: same as workers N (and tasks N when tasks is 1)."})
    output_format: Literal["jsonl", "parquet", "both"] = field(default="both", metadata={
        "help": "Format of the final documents: jsonl, parquet or both."})
    read: ReadConfig = field(default_factory=ReadConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    relevance: RelevanceConfig = field(default_factory=RelevanceConfig)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)
    options: dict[str, Any] = field(default_factory=dict)  # settings of plug-in stages, by stage name

    def __post_init__(self) -> None:
        known = ("read", *STAGE_REGISTRY, *DEDUP_STAGES)  # read now: plug-in stages register at import time
        unknown = [s for s in self.stages if s not in known]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {', '.join(known)}")
        if not self.stages or self.stages[0] != "read":
            raise ValueError("stages must start with 'read'")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError("a stage is listed twice")
        if self.num_proc is not None:
            if self.num_proc < 1:
                raise ValueError("num_proc must be >= 1")
            self.workers = self.num_proc
            self.tasks = max(self.tasks, self.num_proc)
            self.num_proc = None
        if self.tasks < 1 or self.workers < 1:
            raise ValueError("tasks and workers must be >= 1")
        if self.executor not in ("local", "slurm", "ray"):
            raise ValueError(f"executor must be local, slurm or ray, not {self.executor!r}")
        if not self.inputs:
            raise ValueError("inputs is empty")


@dataclass
class StageReport:
    """One stage's outcome: counts (in, kept, dropped, dropped_by_reason), whether this run skipped it
    (finished before, unchanged) and its folder."""

    name: str
    counts: dict[str, Any]
    skipped: bool
    dir: Path


def load_curation_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> CurationConfig:
    """Load a curation recipe; relative `inputs`, eval files/dirs and lexicon are resolved against the recipe's
    folder, `output_dir` against the working directory."""
    return resolve_curation_paths(load_config(path, CurationConfig, overrides), path)


def resolve_curation_paths(cfg: CurationConfig, recipe: str | os.PathLike[str] | None) -> CurationConfig:
    """`cfg` with relative `inputs`, eval files/dirs and lexicon resolved against the folder of `recipe` (the
    working directory when there is none) and `output_dir` against the working directory."""
    base = Path(recipe).resolve().parent if recipe else Path.cwd()

    def res(p: str) -> str:
        return str(p) if Path(p).is_absolute() else str(base / p)

    cfg.inputs = [res(p) for p in cfg.inputs]
    cfg.output_dir = str(Path(cfg.output_dir).resolve())  # relative to the working directory
    cfg.decontaminate.eval_files = [res(p) for p in cfg.decontaminate.eval_files]
    cfg.decontaminate.eval_dirs = [res(p) for p in cfg.decontaminate.eval_dirs]
    if cfg.relevance.lexicon:
        cfg.relevance.lexicon = res(cfg.relevance.lexicon)
    return cfg


def input_holding(path: str | os.PathLike[str], inputs: list[str]) -> Path | None:
    """The input that `path` is, or the input folder it lies in (whose documents a run would read back)."""
    out = Path(path).resolve()
    for p in inputs:
        ip = Path(p).resolve()
        if ip == out or (ip.is_dir() and ip in out.parents):
            return ip
    return None


def check_output_location(cfg: CurationConfig) -> None:
    """Refuse an output folder inside an input folder (a later run would read its own outputs back as
    documents) or an input inside the output folder (a run may replace it)."""
    out = Path(cfg.output_dir).resolve()
    holder = input_holding(out, cfg.inputs)
    if holder is not None:
        raise ConfigError(f"output_dir {out} is inside input {holder}: the next run would read its own outputs "
                          "as documents; choose an output_dir outside the inputs")
    for p in cfg.inputs:
        ip = Path(p).resolve()
        if out in ip.parents:
            raise ConfigError(f"input {ip} is inside output_dir {out}; choose an output_dir that holds no input")


def cap_curation_sizes(cfg: CurationConfig) -> tuple[CurationConfig, list[str]]:
    """`cfg` with `tasks` capped to the documents and files the inputs hold (a task beyond them reads nothing
    yet writes its logs, stats and markers in every phase) and `workers` to `tasks`, plus a note per capped
    value; `cfg` itself is unchanged."""
    notes = []
    tasks = max(1, count_read_units(list_input_files(cfg.inputs), cfg.tasks))
    if tasks < cfg.tasks:
        notes.append(f"tasks {cfg.tasks} capped to {tasks}: the inputs hold {tasks} document(s) and file(s)")
    workers = min(cfg.workers, tasks)
    if workers < cfg.workers:
        notes.append(f"workers {cfg.workers} capped to {workers}: one task runs on one worker")
    if not notes:
        return cfg, []
    return replace(cfg, tasks=tasks, workers=workers), notes


# ---- planning: the recipe as a chain of datatrove phases -------------------------------------------------------
@dataclass
class Phase:
    """One executor run: its folder, number of tasks, pipeline steps, the stages it does work for, and the
    settings its fingerprint covers."""

    name: str
    dir: Path
    tasks: int
    steps: list[Any]
    stages: list[str]
    spec: dict[str, Any]


def effective_stages(cfg: CurationConfig) -> list[str]:
    """The stages that run: `decontaminate` only when there is benchmark data to check against."""
    return [s for s in cfg.stages if s != "decontaminate" or cfg.decontaminate.has_sources()]


def stage_config(cfg: CurationConfig, name: str) -> Any:
    if name in DEDUP_STAGES:
        return cfg.dedup
    if name == "read":
        return cfg.read
    if hasattr(cfg, name) and name != "options":
        return getattr(cfg, name)
    return cfg.options.get(name, {})


def _files_fingerprint(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, modification time) of each file: a changed input re-runs the phases it feeds (cheap for
    any corpus size, unlike hashing the contents)."""
    return [(str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths]


def _benchmark_files(cfg: DecontamConfig) -> list[Path]:
    files = [Path(f) for f in cfg.eval_files]
    for d in cfg.benchmark_dirs().values():
        files += sorted(f for f in Path(d).rglob("*") if f.is_file())
    return files


def plan_curation(cfg: CurationConfig) -> list[Phase]:
    """Compile the recipe into phases (see the module docstring), `tasks` capped by `cap_curation_sizes`."""
    cfg = cap_curation_sizes(cfg)[0]
    out = Path(cfg.output_dir)
    work = out / "work"
    stages = effective_stages(cfg)
    labels = [f"{k:02d}_{name}" for k, name in enumerate(stages)]
    files = list_input_files(cfg.inputs)
    tasks = cfg.tasks
    phases: list[Phase] = []
    stage_parts: dict[str, tuple[str, int, dict[str, str]]] = {}

    def phase_dir(name: str) -> Path:
        return work / f"{len(phases):02d}_{name}"

    seg_dir = phase_dir("segment")
    fields = FieldMap(cfg.read.text_field, cfg.read.id_field, tuple(cfg.read.meta_fields))
    steps: list[Any] = [ReadStep(plan_read_units(files, tasks), fields, cfg.on_error, str(seg_dir / "parts"))]
    seg_stages = [labels[0]]
    spec: dict[str, Any] = {"inputs": _files_fingerprint([Path(f.path) for f in files]), "read": to_dict(cfg.read),
                            "on_error": cfg.on_error}
    stage_parts[labels[0]] = (str(seg_dir / "parts" / labels[0]), tasks, {})
    k = 1
    while k < len(stages):
        name, label = stages[k], labels[k]
        if name in DEDUP_STAGES:
            # consecutive dedup stages share one signature pass (one normalisation of each text); the later
            # one ignores what the earlier one removed, as if it ran on its output
            group = [k]
            while group[-1] + 1 < len(stages) and stages[group[-1] + 1] in DEDUP_STAGES:
                group.append(group[-1] + 1)
            kinds = [DEDUP_STAGES[stages[j]][0] for j in group]
            sig_dir = seg_dir / "dedup"
            steps += [DedupSignature(kinds, cfg.dedup, str(sig_dir)), ShardWriter(str(seg_dir / "docs"))]
            phases.append(Phase(seg_dir.name, seg_dir, tasks, steps, seg_stages,
                                {**spec, "dedup": to_dict(cfg.dedup), "kinds": kinds}))
            clusters: list[Path] = []
            for j, kind in zip(group, kinds, strict=True):
                n_files = dedup_layout(kind, cfg.dedup)[2]
                bdir = phase_dir(f"{stages[j]}_buckets")
                buckets = DedupBuckets(kind, cfg.dedup, str(sig_dir), str(bdir),
                                       exclude=str(clusters[-1]) if clusters else None)
                phases.append(Phase(bdir.name, bdir, min(n_files, tasks), [buckets], [labels[j]],
                                    {"dedup": to_dict(cfg.dedup)}))
                cdir = phase_dir(f"{stages[j]}_cluster")
                phases.append(Phase(cdir.name, cdir, 1, [DedupCluster(kind, str(sig_dir), str(bdir), str(cdir), tasks)],
                                    [labels[j]], {}))
                clusters.append(cdir)
            prev_docs = seg_dir / "docs"
            seg_dir = phase_dir("segment")
            steps = [ShardReader(str(prev_docs))]
            seg_stages, spec = [], {}
            for j, cdir in zip(group, clusters, strict=True):
                steps.append(DEDUP_STAGES[stages[j]][1](j, cfg.dedup, str(seg_dir / "parts"), str(cdir)))
                seg_stages.append(labels[j])
                spec[labels[j]] = to_dict(cfg.dedup)
                stage_parts[labels[j]] = (str(seg_dir / "parts" / labels[j]), tasks,
                                          {"clusters.json": str(cdir / "clusters.json")})
            k = group[-1] + 1
            continue
        conf = stage_config(cfg, name)
        steps.append(STAGE_REGISTRY[name](k, conf, str(seg_dir / "parts")))
        seg_stages.append(label)
        spec[label] = to_dict(conf)
        extra = {}
        if name == "decontaminate":
            part = str(seg_dir / "parts" / label)
            extra = {"overlaps.jsonl": part, "decontamination.json": part}
            spec["benchmarks"] = _files_fingerprint(_benchmark_files(cfg.decontaminate))
        stage_parts[label] = (str(seg_dir / "parts" / label), tasks, extra)
        k += 1
    steps.append(ShardWriter(str(seg_dir / "docs")))
    phases.append(Phase(seg_dir.name, seg_dir, tasks, steps, seg_stages, spec))
    fdir = phase_dir("finalize")
    outputs = [StageOutputs(label, parts, n, extra, to_dict(stage_config(cfg, label.split("_", 1)[1])))
               for label, (parts, n, extra) in stage_parts.items()]
    final = FinalizeStep(str(out), outputs, str(seg_dir / "docs"), tasks, cfg.output_format, list(cfg.inputs),
                         to_dict(cfg))
    phases.append(Phase(fdir.name, fdir, 1, [final], list(labels),
                        {"output_format": cfg.output_format, "stages": labels}))
    return phases


# ---- running -----------------------------------------------------------------------------------------------------
def _fingerprints(phases: list[Phase]) -> list[str]:
    fps, prev = [], ""
    for ph in phases:
        prev = sha256_bytes(json.dumps({"prev": prev, "name": ph.name, "tasks": ph.tasks, "spec": ph.spec,
                                        "version": __version__}, sort_keys=True, default=str).encode())
        fps.append(prev)
    return fps


def _prepare(phase: Phase, fp: str, force: bool) -> bool:
    """Clear the phase's folder when its fingerprint changed (or `force`); True when all its tasks had
    finished before."""
    marker = phase.dir / "fingerprint.json"
    same = marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("fingerprint") == fp
    if force or not same:
        shutil.rmtree(phase.dir, ignore_errors=True)
        phase.dir.mkdir(parents=True)
        marker.write_text(json.dumps({"fingerprint": fp, "phase": phase.name}), encoding="utf-8")
        return False
    return all((phase.dir / "completions" / f"{r:05d}").is_file() for r in range(phase.tasks))


def _final_intact(out: Path, labels: list[str]) -> bool:
    dirs = [out / "final", *(out / "stages" / label for label in labels)]
    return all(read_manifest(d) is not None and not verify_outputs(d) for d in dirs)


def run_curation(cfg: CurationConfig, force: bool = False) -> list[StageReport]:
    """Run the curation recipe with its executor, `tasks` and `workers` capped by `cap_curation_sizes`; returns one
    report per stage (for `executor: slurm`, the jobs are submitted and an empty list is returned:
    `work/slurm_jobs.json` lists them)."""
    check_output_location(cfg)
    cfg = cap_curation_sizes(cfg)[0]  # the manifests record the effective tasks and workers
    phases = plan_curation(cfg)  # before creating anything: a missing input is one clear error
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # temps a killed earlier run left (stages/.01_clean.p<pid>-….tmp, .final.….tmp); a live run's are kept
    if (out / "stages").is_dir():
        remove_stale_temps(out / "stages")
    if (out / "work").is_dir():  # shard/report temps of killed tasks (work/PP_phase/…/.00003.jsonl.p<pid>-….tmp)
        for d in [out / "work", *(p for p in (out / "work").rglob("*") if p.is_dir())]:
            remove_stale_temps(d)
    for target in ("final", "manifest.json"):
        remove_stale_temps(out, target=target)
    fps = _fingerprints(phases)
    quiet_datatrove_logs(os.environ.get("SOAES_DATATROVE_LOG_LEVEL", "CRITICAL"))  # failures raise here
    labels = phases[-1].stages
    stale = False
    done_before: dict[str, bool] = {}
    for ph, fp in zip(phases, fps, strict=True):
        done = _prepare(ph, fp, force or stale)
        if ph is phases[-1] and done and not _final_intact(out, labels):
            done = _prepare(ph, fp, True)
        stale = stale or not done
        done_before[ph.name] = done
    if cfg.executor == "slurm":
        _submit_slurm(cfg, phases, out)
        return []
    stop = ensure_ray(cfg.engine) if cfg.executor == "ray" else (lambda: None)
    try:
        for ph in phases:
            if done_before[ph.name]:
                continue
            executor = make_executor(cfg.executor, ph.steps, tasks=ph.tasks, workers=cfg.workers, logging_dir=ph.dir,
                                     engine=cfg.engine, job_name=f"curate-{ph.name}")
            executor.run()
            release_free_memory()
            failed = [r for r in range(ph.tasks) if not (ph.dir / "completions" / f"{r:05d}").is_file()]
            if failed:
                raise DataError(f"curation phase {ph.name}: task(s) {failed} did not finish; see "
                                f"{ph.dir / 'logs'}; re-run to resume")
    finally:
        stop()
    reports = []
    for label in labels:
        manifest = read_manifest(out / "stages" / label) or {}
        skipped = all(done_before[ph.name] for ph in phases[:-1] if label in ph.stages)  # finalize merges all
        reports.append(StageReport(label.split("_", 1)[1], manifest.get("counts", {}), skipped,
                                   out / "stages" / label))
    return reports


def _submit_slurm(cfg: CurationConfig, phases: list[Phase], out: Path) -> None:
    """One Slurm job array per phase, each depending on the one before (datatrove's `depends`)."""
    prev = None
    executors = []
    for ph in phases:
        prev = make_executor("slurm", ph.steps, tasks=ph.tasks, workers=cfg.workers, logging_dir=ph.dir,
                             engine=cfg.engine, job_name=f"curate-{ph.name}", depends=prev)
        executors.append(prev)
    assert prev is not None
    prev.run()
    jobs = [{"phase": ph.name, "job_id": ex.job_id, "launch_script": str(ph.dir / "launch_script.slurm")}
            for ph, ex in zip(phases, executors, strict=True)]
    (out / "work" / "slurm_jobs.json").write_text(json.dumps(jobs, indent=1), encoding="utf-8")
