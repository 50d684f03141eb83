"""Runs a pipeline recipe: decides per stage whether it is up to date, runs the others, commits atomically.

A stage's output is built in `<run>/stages/.<NN>_<name>.partial/` and renamed to `<run>/stages/<NN>_<name>/`
once its `manifest.json` is written, so a kill never leaves a half output in place. The manifest records the
stage's config fingerprint and the hashes of its inputs (upstream manifests, external files); a stage whose
recorded fingerprint equals the current one is skipped. Partial folders of resumable stages (training, logit
dumps) are kept across a kill so the package's own checkpoint resume continues them.
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

from soaes_core import atomic_write_json, progress_bar, read_manifest, sha256_file, to_dict, write_manifest
from soaes_core.atomic import replace_dir
from soaes_core.errors import ConfigError

from .recipe import PipelineRecipe, is_model_spec
from .stages import STAGES, Input, Stage, StageContext, stage_dirname

FINGERPRINT_FILE = ".pipeline_fingerprint.json"  # in a partial folder: which config its resumable work is for
DEFAULT_SECONDS_PER_WEIGHT = 30.0  # ETA guess for a stage never run before


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
    """Passed to `on_event`: 'skip', 'start', 'done'; `eta_s` is the estimated time left for the whole run."""

    kind: str
    stage: str
    index: int
    total: int
    message: str = ""
    seconds: float | None = None
    eta_s: float | None = None


def _sha_json(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _path_hash(p: Path) -> str | None:
    """A file's sha256; a folder's manifest sha256, else a listing of names, sizes and mtimes (cheap)."""
    if p.is_file():
        return sha256_file(p)
    if (p / "manifest.json").is_file():
        return "manifest:" + sha256_file(p / "manifest.json")
    if p.is_dir():
        listing = sorted((str(q.relative_to(p)), q.stat().st_size, int(q.stat().st_mtime))
                         for q in p.rglob("*") if q.is_file())
        return "tree:" + _sha_json(listing)
    return None


def _input_hash(ctx: StageContext, inp: Input) -> dict[str, Any] | None:
    where = ctx.resolve(inp)
    if where is None:
        return None
    if isinstance(where, str):  # a model spec such as embedded:smollm2-135m
        return {"path": where, "sha256": "spec:" + where}
    if inp.explicit is None and inp.stage is not None:  # an upstream stage: its manifest identifies its output
        manifest = ctx.stage_dir(inp.stage) / "manifest.json"
        return {"path": str(where), "stage": inp.stage,
                "sha256": "manifest:" + sha256_file(manifest) if manifest.is_file() else None}
    return {"path": str(where), "sha256": _path_hash(Path(where))}


def stage_fingerprint(ctx: StageContext, stage: Stage) -> dict[str, Any]:
    """Config hash (the stage's recipe section + the recipe values it depends on) and input hashes."""
    recipe = ctx.recipe
    config = {"settings": to_dict(stage.settings(recipe)), "extra": stage.fingerprint_extra(recipe)}
    inputs = {}
    for inp in stage.inputs(recipe):
        h = _input_hash(ctx, inp)
        if h is not None:
            inputs[inp.name] = h
    for name, path in stage.external_files(ctx).items():
        inputs[f"file:{name}"] = {"path": str(path), "sha256": _path_hash(Path(path))}
    return {"config_sha256": _sha_json(config), "inputs": inputs}


def _why_stale(manifest: dict[str, Any] | None, fp: dict[str, Any]) -> str | None:
    """None when `manifest` was made with fingerprint `fp`; else the reason it must run."""
    if manifest is None:
        return "no previous output"
    old = manifest.get("pipeline", {})
    if old.get("config_sha256") != fp["config_sha256"]:
        return "config changed"
    old_inputs = old.get("inputs", {})
    for name, h in fp["inputs"].items():
        if old_inputs.get(name, {}).get("sha256") != h["sha256"]:
            return f"input {name!r} changed" if name in old_inputs else f"new input {name!r}"
    gone = sorted(set(old_inputs) - set(fp["inputs"]))
    if gone:
        return f"input {gone[0]!r} removed"
    return None


def _outputs_present(folder: Path, manifest: dict[str, Any]) -> bool:
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == meta["size"]
               for rel, meta in manifest.get("outputs", {}).items())


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


def plan_pipeline(recipe: PipelineRecipe, output_dir: str | os.PathLike[str] | None = None,
                  start: str | None = None, until: str | None = None) -> list[StagePlan]:
    """Each stage of the recipe: up-to-date, will run (and why), or not selected by --from/--until."""
    ctx = StageContext(recipe, run_dir_of(recipe, output_dir))
    selected = set(select_stages(recipe, start, until))
    plans: list[StagePlan] = []
    will_run: set[str] = set()
    for name in recipe.stages:
        stage = STAGES[name]
        folder = ctx.stage_dir(name)
        manifest = read_manifest(folder)
        last = sum(manifest.get("timings_s", {}).values()) if manifest else None
        fp = stage_fingerprint(ctx, stage)
        upstream = [i.stage for i in stage.inputs(recipe) if i.explicit is None and i.stage in will_run]
        if upstream:
            why: str | None = f"input stage {upstream[0]!r} will run"
        else:
            why = _why_stale(manifest, fp)
            if why is None and manifest is not None and not _outputs_present(folder, manifest):
                why = "outputs missing or truncated"
        if name not in selected:
            status, reason = "not selected", "outside --from/--until" + ("" if why is None else f" ({why})")
        elif why is None:
            status, reason = "up-to-date", "inputs and config unchanged"
        else:
            status, reason = "will run", why
            will_run.add(name)
        plans.append(StagePlan(name, folder, status, reason, fp, last))
    return plans


def _check_inputs_exist(ctx: StageContext, stage: Stage) -> None:
    for inp in stage.inputs(ctx.recipe):
        if inp.explicit is not None or inp.stage is None or not inp.required:
            continue
        if read_manifest(ctx.stage_dir(inp.stage)) is None:
            raise ConfigError(f"{ctx.recipe.source}: stage {stage.name!r} needs the output of stage {inp.stage!r}, "
                              f"which has not run in {ctx.run_dir} (run it first, or start --from {inp.stage})")


def _prepare_partial(stage: Stage, partial: Path, fp: dict[str, Any]) -> bool:
    """Make the partial folder; keep a resumable stage's earlier work only when it was for the same fingerprint.
    Returns whether earlier work is resumed."""
    marker = partial / FINGERPRINT_FILE
    resume = (stage.resumable and marker.is_file()
              and json.loads(marker.read_text(encoding="utf-8")) == fp)
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
                 on_event: Callable[[StageEvent], None] | None = None) -> RunSummary:
    """Run the selected stages in order, skipping the up-to-date ones; returns what ran and what was skipped."""
    run_dir = run_dir_of(recipe, output_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    if recipe.threads:
        import torch

        torch.set_num_threads(recipe.threads)
    ctx = StageContext(recipe, run_dir)
    names = select_stages(recipe, start, until)
    plans = {p.name: p for p in plan_pipeline(recipe, run_dir, start, until)}
    weights = {n: STAGES[n].weight for n in names}
    summary = RunSummary(run_dir)
    bar = progress_bar(total=len(names), desc="pipeline", unit="stage")
    spent, done_weight = 0.0, 0.0

    def eta(after: int) -> float:
        rate = spent / done_weight if done_weight else DEFAULT_SECONDS_PER_WEIGHT
        left = 0.0
        for n in names[after:]:
            p = plans[n]
            if p.status == "will run":
                left += p.last_seconds if p.last_seconds else weights[n] * rate
        return left

    try:
        for i, name in enumerate(names):
            stage = STAGES[name]
            final = ctx.stage_dir(name)
            fp = stage_fingerprint(ctx, stage)  # now: upstream stages may just have been rerun
            manifest = read_manifest(final)
            why = _why_stale(manifest, fp)
            if why is None and manifest is not None and not _outputs_present(final, manifest):
                why = "outputs missing or truncated"
            if why is None:
                summary.stages[name] = {"status": "skipped", "seconds": 0.0}
                plans[name].status = "up-to-date"
                if on_event:
                    on_event(StageEvent("skip", name, i + 1, len(names), "up to date", eta_s=eta(i + 1)))
                bar.update(1)
                continue
            plans[name].status = "will run"
            _check_inputs_exist(ctx, stage)
            partial = final.with_name(f".{final.name}.partial")
            resumed = _prepare_partial(stage, partial, fp)
            if on_event:
                on_event(StageEvent("start", name, i + 1, len(names), why + ("; resuming" if resumed else ""),
                                    eta_s=eta(i)))
            t0 = time.perf_counter()
            counts = stage.run(ctx, partial)
            seconds = time.perf_counter() - t0
            (partial / FINGERPRINT_FILE).unlink(missing_ok=True)
            paths = {k: v["path"] for k, v in fp["inputs"].items() if not is_model_spec(str(v["path"]))
                     and Path(v["path"]).exists()}
            write_manifest(partial, f"pipeline.{name}", inputs=paths, config=stage.settings(recipe), counts=counts,
                           timings={"total": seconds},
                           extra={"pipeline": {**fp, "recipe": recipe.source, "recipe_name": recipe.name,
                                               "stage_dir": stage_dirname(name), "resumed": resumed}})
            replace_dir(partial, final)
            spent += seconds
            done_weight += weights[name]
            plans[name].status = "up-to-date"
            summary.stages[name] = {"status": "ran", "seconds": round(seconds, 2)}
            bar.update(1)
            if on_event:
                on_event(StageEvent("done", name, i + 1, len(names), seconds=seconds, eta_s=eta(i + 1)))
    finally:
        bar.close()
    return summary
