"""Runs a pipeline recipe: decides per stage whether it is up to date, runs the others, commits atomically.

A stage's output is built in `<run>/stages/.<NN>_<name>.partial/` and renamed to `<run>/stages/<NN>_<name>/`
once its `manifest.json` is written, so a kill never leaves a half output in place. The manifest records the
stage's config fingerprint and the content hashes of its inputs (upstream manifests, data files, model folders);
a stage whose recorded fingerprint equals the current one, and whose outputs still match their recorded sha256,
is skipped. File hashes are cached by inode and stat in `<run>/.pipeline_hashes.json`, so an unchanged file is
hashed once. Partial folders of resumable stages (training, logit dumps) are kept across a kill so the package's
own checkpoint resume continues them. A run holds `<run>/.pipeline.lock`: a second run on the folder refuses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaes_core import atomic_write_json, to_dict, write_manifest
from soaes_core.atomic import replace_dir
from soaes_core.cache import lock_holder, owner_lock
from soaes_core.errors import ConfigError, SoaesError
from soaes_core.hashing import FileHashCache
from soaes_core.manifest import MANIFEST_NAME

from .recipe import PipelineRecipe, is_model_spec
from .stages import STAGES, Input, Stage, StageContext, stage_dirname
from .timings import StageTimes, estimate_stage, run_rate

FINGERPRINT_FILE = ".pipeline_fingerprint.json"  # in a partial folder: which config its resumable work is for
HASH_CACHE_FILE = ".pipeline_hashes.json"  # in the run folder: file sha256s by inode and stat
LOCK_FILE = ".pipeline.lock"  # in the run folder: held by the run using it (pid and host inside)
DAMAGED = ": rerunning the stage"  # ends the reason given for an unusable manifest


@dataclass
class StagePlan:
    """What `plan` says about one stage: `status` is 'up-to-date', 'will run' or 'not selected'."""

    name: str
    dir: Path
    status: str
    reason: str
    fingerprint: dict[str, Any] = field(default_factory=dict)
    last_seconds: float | None = None


@dataclass
class StageEvent:
    """Passed to `on_event`: 'skip', 'start', 'done'. `eta_s`: the estimated time left for the whole run (after
    this stage, for 'skip' and 'done'); `stage_eta_s`: this stage's expected seconds; `counts`: what it returned."""

    kind: str
    stage: str
    index: int
    total: int
    message: str = ""
    seconds: float | None = None
    eta_s: float | None = None
    stage_eta_s: float | None = None
    counts: dict[str, Any] | None = None


def _sha_json(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def hash_cache(run_dir: Path) -> FileHashCache:
    """The run's file-hash cache (kept in the run folder)."""
    return FileHashCache(run_dir / HASH_CACHE_FILE)


def _path_hash(p: Path, hashes: FileHashCache) -> str | None:
    """A file's sha256, or a folder's content hash (every file's path and sha256); None when absent."""
    try:
        if p.is_file():
            return hashes.sha256(p)
        if p.is_dir():
            return "tree:" + hashes.tree_sha256(p)
    except OSError:  # gone while read (e.g. a stage being replaced by a concurrent run)
        return None
    return None


def _input_hash(ctx: StageContext, inp: Input, hashes: FileHashCache) -> dict[str, Any] | None:
    where = ctx.resolve(inp)
    if where is None:
        return None
    if isinstance(where, str):
        if where.startswith("gguf:"):
            return {"path": where, "sha256": _path_hash(Path(where.removeprefix("gguf:")), hashes)}
        return {"path": where, "sha256": "spec:" + where}  # a model spec such as embedded:smollm2-135m
    if inp.explicit is None and inp.stage is not None:  # an upstream stage: its (verified) manifest identifies it
        manifest = ctx.stage_dir(inp.stage) / MANIFEST_NAME
        h = _path_hash(manifest, hashes) if manifest.is_file() else None
        return {"path": str(where), "stage": inp.stage, "sha256": "manifest:" + h if h else None}
    return {"path": str(where), "sha256": _path_hash(Path(where), hashes)}


def stage_fingerprint(ctx: StageContext, stage: Stage, hashes: FileHashCache | None = None) -> dict[str, Any]:
    """Config hash (the stage's recipe section + the recipe values it depends on) and input content hashes."""
    recipe = ctx.recipe
    hashes = hashes if hashes is not None else FileHashCache()
    config = {"settings": to_dict(stage.settings(recipe)), "extra": stage.fingerprint_extra(recipe)}
    inputs = {}
    for inp in stage.inputs(recipe):
        h = _input_hash(ctx, inp, hashes)
        if h is not None:
            inputs[inp.name] = h
    for name, path in stage.external_files(ctx).items():
        inputs[f"file:{name}"] = {"path": str(path), "sha256": _path_hash(Path(path), hashes)}
    return {"config_sha256": _sha_json(config), "inputs": inputs}


def read_stage_manifest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A stage folder's manifest, or None with why it cannot be used (None, None: there is none)."""
    path = folder / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return None, f"cannot read {path} ({err.strerror or err})"
    if not raw.strip():
        return None, f"{path} is corrupt (empty)"
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, f"{path} is corrupt (not UTF-8 text)"
    except ValueError as err:
        return None, f"{path} is corrupt (not JSON: {err})"
    pipeline, outputs = (data.get("pipeline"), data.get("outputs")) if isinstance(data, dict) else (None, None)
    if not (isinstance(pipeline, dict) and isinstance(pipeline.get("inputs"), dict) and isinstance(outputs, dict)
            and all(isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
                    for m in outputs.values())):
        return None, f"{path} is corrupt (not a pipeline stage manifest)"
    return data, None


def _why_stale(manifest: dict[str, Any] | None, fp: dict[str, Any]) -> str | None:
    """None when `manifest` was made with fingerprint `fp`; else the reason it must run."""
    if manifest is None:
        return "no previous output"
    old = manifest["pipeline"]
    if old.get("config_sha256") != fp["config_sha256"]:
        return "config changed"
    old_inputs = old["inputs"]
    for name, h in fp["inputs"].items():
        before = old_inputs.get(name)
        if not isinstance(before, dict) or before.get("sha256") != h["sha256"]:
            return f"input {name!r} changed" if name in old_inputs else f"new input {name!r}"
    gone = sorted(set(old_inputs) - set(fp["inputs"]))
    if gone:
        return f"input {gone[0]!r} removed"
    return None


def _outputs_problem(folder: Path, manifest: dict[str, Any], hashes: FileHashCache) -> str | None:
    """None when every output listed in the manifest is there with its recorded size and sha256."""
    for rel, meta in manifest["outputs"].items():
        p = folder / rel
        try:
            if not p.is_file():
                return f"output {rel!r} missing"
            if p.stat().st_size != meta["size"] or hashes.sha256(p) != meta["sha256"]:
                return f"output {rel!r} changed since it was written"
        except OSError:
            return f"output {rel!r} missing"
    return None


def _stage_state(ctx: StageContext, stage: Stage, hashes: FileHashCache) -> tuple[dict[str, Any] | None,
                                                                                  dict[str, Any], str | None]:
    """The stage's manifest, its current fingerprint and why it must run (None: up to date)."""
    folder = ctx.stage_dir(stage.name)
    manifest, problem = read_stage_manifest(folder)
    fp = stage_fingerprint(ctx, stage, hashes)
    if problem is not None:
        return None, fp, f"{problem}{DAMAGED}"
    why = _why_stale(manifest, fp)
    if why is None and manifest is not None:
        why = _outputs_problem(folder, manifest, hashes)
    return manifest, fp, why


def select_stages(recipe: PipelineRecipe, start: str | None = None, until: str | None = None) -> list[str]:
    """The recipe's stages from `start` through `until` (inclusive), in order."""
    names = list(recipe.stages)
    for opt, value in (("--from", start), ("--until", until)):
        if value is not None and value not in names:
            raise ConfigError(f"{recipe.source}: {opt} {value}: not a stage of this recipe "
                              f"(stages: {', '.join(names)})")
    lo = names.index(start) if start else 0
    hi = names.index(until) if until else len(names) - 1
    if lo > hi:
        raise ConfigError(f"{recipe.source}: --from {start} comes after --until {until}")
    return names[lo:hi + 1]


def run_dir_of(recipe: PipelineRecipe, output_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(output_dir) if output_dir is not None else Path(recipe.output_dir)


def _last_seconds(manifest: dict[str, Any] | None) -> float | None:
    timings = manifest.get("timings_s") if manifest else None
    if not isinstance(timings, dict):
        return None
    return sum(v for v in timings.values() if isinstance(v, (int, float))) or None


def run_lock_holder(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The record (pid, host, since) of the run holding `run_dir`, or None when no run holds it."""
    return lock_holder(Path(run_dir) / LOCK_FILE)


def plan_pipeline(recipe: PipelineRecipe, output_dir: str | os.PathLike[str] | None = None,
                  start: str | None = None, until: str | None = None,
                  hashes: FileHashCache | None = None) -> list[StagePlan]:
    """Each stage of the recipe: up-to-date, will run (and why), or not selected by --from/--until."""
    ctx = StageContext(recipe, run_dir_of(recipe, output_dir))
    selected = set(select_stages(recipe, start, until))
    own_cache = hashes is None
    hashes = hash_cache(ctx.run_dir) if hashes is None else hashes
    plans: list[StagePlan] = []
    will_run: set[str] = set()
    for name in recipe.stages:
        stage = STAGES[name]
        folder = ctx.stage_dir(name)
        manifest, fp, why = _stage_state(ctx, stage, hashes)
        last = _last_seconds(manifest)
        upstream = [i.stage for i in stage.inputs(recipe) if i.explicit is None and i.stage in will_run]
        if upstream and not (why or "").endswith(DAMAGED):  # a damaged manifest is worth saying
            why = f"input stage {upstream[0]!r} will run"
        if name not in selected:
            status, reason = "not selected", "outside --from/--until" + ("" if why is None else f" ({why})")
        elif why is None:
            status, reason = "up-to-date", "inputs and config unchanged"
        else:
            status, reason = "will run", why
            will_run.add(name)
        plans.append(StagePlan(name, folder, status, reason, fp, last))
    if own_cache:
        hashes.save()
    return plans


def _check_inputs_exist(ctx: StageContext, stage: Stage) -> None:
    for inp in stage.inputs(ctx.recipe):
        if inp.explicit is not None or inp.stage is None or not inp.required:
            continue
        manifest, problem = read_stage_manifest(ctx.stage_dir(inp.stage))
        if problem is not None:
            raise ConfigError(f"{ctx.recipe.source}: stage {stage.name!r} needs the output of stage {inp.stage!r}, "
                              f"but {problem} (run it again: --from {inp.stage})")
        if manifest is None:
            raise ConfigError(f"{ctx.recipe.source}: stage {stage.name!r} needs the output of stage {inp.stage!r}, "
                              f"which has not run in {ctx.run_dir} (run it first, or start --from {inp.stage})")


def _prepare_partial(stage: Stage, partial: Path, fp: dict[str, Any]) -> bool:
    """Make the partial folder; keep a resumable stage's earlier work only when it was for the same fingerprint.
    Returns whether earlier work is resumed."""
    marker = partial / FINGERPRINT_FILE
    try:
        resume = stage.resumable and json.loads(marker.read_text(encoding="utf-8")) == fp
    except (OSError, ValueError):  # none, or damaged: start again
        resume = False
    if not resume:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, fp)
    return resume


@dataclass
class RunSummary:
    """Per stage: 'ran' or 'skipped', with seconds; the run folder."""

    run_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ran(self) -> list[str]:
        return [n for n, s in self.stages.items() if s["status"] == "ran"]

    @property
    def skipped(self) -> list[str]:
        return [n for n, s in self.stages.items() if s["status"] == "skipped"]


def run_pipeline(recipe: PipelineRecipe, output_dir: str | os.PathLike[str] | None = None,
                 start: str | None = None, until: str | None = None,
                 on_event: Callable[[StageEvent], None] | None = None,
                 times: StageTimes | None = None) -> RunSummary:
    """Run the selected stages in order, skipping the up-to-date ones; returns what ran and what was skipped.

    Each stage's time is recorded in `times` (default: this machine's history, `timings.StageTimes.load()`), which
    the ETAs passed to `on_event` come from. Holds the run folder's lock throughout: a second run on the same folder
    raises `LockedError` naming this one."""
    run_dir = run_dir_of(recipe, output_dir)
    ctx = StageContext(recipe, run_dir)
    names = select_stages(recipe, start, until)
    for name in names:  # before anything is created
        STAGES[name].check(ctx)
    try:
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SoaesError(f"run folder {run_dir}: cannot create it ({err.strerror or err})") from None
    with owner_lock(run_dir / LOCK_FILE, what=f"run folder {run_dir}"):
        hashes = hash_cache(run_dir)
        try:
            times = StageTimes.load() if times is None else times
            return _run_locked(ctx, names, start, until, on_event, hashes, times)
        finally:
            hashes.save()


def _run_locked(ctx: StageContext, names: list[str], start: str | None, until: str | None,
                on_event: Callable[[StageEvent], None] | None, hashes: FileHashCache, times: StageTimes) -> RunSummary:
    recipe, run_dir = ctx.recipe, ctx.run_dir
    if recipe.threads:
        import torch

        torch.set_num_threads(recipe.threads)
    plans = {p.name: p for p in plan_pipeline(recipe, run_dir, start, until, hashes=hashes)}
    summary = RunSummary(run_dir)
    done: list[tuple[float, float, float | None]] = []  # (seconds, weight, measured before) of the stages run
    emit = on_event or (lambda ev: None)

    def expected(name: str) -> float:
        p = plans[name]
        measured = times.measured(name, p.fingerprint.get("config_sha256", ""))
        return estimate_stage(measured if measured is not None else p.last_seconds, STAGES[name].weight,
                              run_rate(done))

    def eta(after: int) -> float:
        return sum(expected(n) for n in names[after:] if plans[n].status == "will run")

    for i, name in enumerate(names):
        stage = STAGES[name]
        final = ctx.stage_dir(name)
        _, fp, why = _stage_state(ctx, stage, hashes)  # now: upstream stages may just have been rerun
        if why is None:
            summary.stages[name] = {"status": "skipped", "seconds": 0.0}
            plans[name].status = "up-to-date"
            emit(StageEvent("skip", name, i + 1, len(names), "up to date", eta_s=eta(i + 1)))
            continue
        plans[name].status, plans[name].fingerprint = "will run", fp
        _check_inputs_exist(ctx, stage)
        partial = final.with_name(f".{final.name}.partial")
        resumed = _prepare_partial(stage, partial, fp)
        guess = expected(name)
        emit(StageEvent("start", name, i + 1, len(names), why + ("; resuming" if resumed else ""), eta_s=eta(i),
                        stage_eta_s=guess))
        t0 = time.perf_counter()
        counts = stage.run(ctx, partial)
        seconds = time.perf_counter() - t0
        _commit(ctx, stage, partial, final, fp, counts, seconds, resumed, hashes)
        done.append((seconds, stage.weight, times.measured(name, fp["config_sha256"])))
        if not resumed:  # a resumed stage's time is a part of the work
            times.record(name, fp["config_sha256"], seconds)
        plans[name].status = "up-to-date"
        summary.stages[name] = {"status": "ran", "seconds": round(seconds, 2)}
        emit(StageEvent("done", name, i + 1, len(names), why, seconds=seconds, eta_s=eta(i + 1), stage_eta_s=guess,
                        counts=counts))
    return summary


def _commit(ctx: StageContext, stage: Stage, partial: Path, final: Path, fp: dict[str, Any], counts: dict[str, Any],
            seconds: float, resumed: bool, hashes: FileHashCache) -> None:
    """Write the stage's manifest into its partial folder and put the folder in place."""
    recipe = ctx.recipe
    (partial / FINGERPRINT_FILE).unlink(missing_ok=True)
    paths = {k: v["path"] for k, v in fp["inputs"].items() if not is_model_spec(str(v["path"]))
             and Path(v["path"]).exists()}
    write_manifest(partial, f"pipeline.{stage.name}", inputs=paths, config=stage.settings(recipe), counts=counts,
                   timings={"total": seconds},
                   extra={"pipeline": {**fp, "recipe": recipe.source, "recipe_name": recipe.name,
                                       "stage_dir": stage_dirname(stage.name), "resumed": resumed}})
    replace_dir(partial, final)
    _remember_outputs(final, hashes)


def _remember_outputs(folder: Path, hashes: FileHashCache) -> None:
    """Seed the hash cache with the sha256s the manifest just recorded, so the next check does not rehash."""
    manifest, _ = read_stage_manifest(folder)
    for rel, meta in (manifest or {}).get("outputs", {}).items():
        try:
            hashes.remember(folder / rel, meta["sha256"])
        except OSError:
            pass
    hashes.save()
