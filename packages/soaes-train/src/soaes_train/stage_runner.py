"""Multi-stage training runner: a `TrainRecipe`'s stages (`cpt → sft_stage1 → sft_stage2`, or any recipe's),
each starting from the previous stage's output. (Curriculum *selection* of SFT data is `soaes_data.curriculum`.)

Layout under the recipe's `output_dir`: `<stage>/model/` (save_pretrained + manifest.json + loss curve),
`<stage>/checkpoints/` and `<stage>/stage_config.json`. A stage whose `model/manifest.json` verifies and was
made with the same config and parent is skipped on re-run; an interrupted stage resumes from its last
complete checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from soaes_core import atomic_write_json, load_yaml, read_manifest, sha256_file, to_dict
from soaes_core.config import apply_overrides, from_dict
from soaes_core.errors import ConfigError

from .config import StageConfig, TrainRecipe
from .trainer import MODEL_DIRNAME, StageResult, train_stage

log = logging.getLogger(__name__)

STAGE_REF = "stage:"
STAGE_CONFIG_NAME = "stage_config.json"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def train_recipe_from_dict(data: Any, source: str = "<recipe>", overrides: dict[str, Any] | None = None) -> TrainRecipe:
    """Build a `TrainRecipe`, merging `defaults` into every stage and applying dotted `overrides`
    (`train.max_steps=3` applies to every stage; `stages.NAME.train.max_steps=3` to one)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping with 'name' and 'stages'")
    data = copy.deepcopy(data)
    stage_over: dict[str, dict[str, Any]] = {}
    top_over: dict[str, Any] = {}
    all_over: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        if parts[0] == "stages" and len(parts) > 2:
            stage_over.setdefault(parts[1], {})[".".join(parts[2:])] = value
        elif parts[0] in ("name", "output_dir", "base_model", "description"):
            top_over[key] = value
        else:  # a stage field, for every stage (wins over values set in the stages themselves)
            all_over[key] = value
    data = apply_overrides(data, top_over) if top_over else data
    defaults = data.get("defaults") or {}
    stages = data.get("stages")
    if isinstance(stages, list):
        merged = []
        for s in stages:
            if isinstance(s, dict):
                s = _deep_merge(defaults, s)
                if all_over:
                    s = apply_overrides(s, all_over)
                if s.get("name") in stage_over:
                    s = apply_overrides(s, stage_over.pop(s["name"]))
            merged.append(s)
        data["stages"] = merged
        if stage_over:
            raise ConfigError(f"{source}: override names unknown stage(s): {', '.join(sorted(stage_over))}")
    return from_dict(TrainRecipe, data, source=source)


def load_train_recipe(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> TrainRecipe:
    """Load a recipe YAML (a path, or the name of a shipped recipe — see `soaes_train.recipes`)."""
    from .recipes import resolve_recipe

    p = resolve_recipe(str(path))
    return train_recipe_from_dict(load_yaml(p), source=str(p), overrides=overrides)


def stage_dir(recipe: TrainRecipe, name: str) -> Path:
    """Directory of stage `name` under the recipe's output dir."""
    return Path(recipe.output_dir) / name


def stage_model_dir(recipe: TrainRecipe, name: str) -> Path:
    """Where stage `name` saves its model (`save_pretrained` directory)."""
    return stage_dir(recipe, name) / MODEL_DIRNAME


def resolve_parent(recipe: TrainRecipe, index: int) -> tuple[str, str | None]:
    """(model spec, parent stage name or None) that stage `index` starts from."""
    stage = recipe.stages[index]
    ref = stage.model
    if ref is None:
        if index == 0:
            if not recipe.base_model:
                raise ConfigError(f"recipe {recipe.name!r}: first stage {stage.name!r} needs 'model' "
                                  "(or set the recipe's base_model)")
            return recipe.base_model, None
        prev = recipe.stages[index - 1].name
        return str(stage_model_dir(recipe, prev)), prev
    if ref.startswith(STAGE_REF):
        name = ref[len(STAGE_REF):]
        names = [s.name for s in recipe.stages]
        if name not in names:
            raise ConfigError(f"recipe {recipe.name!r}: stage {stage.name!r} model {ref!r} names no stage "
                              f"(stages: {', '.join(names)})")
        if names.index(name) >= index:
            raise ConfigError(f"recipe {recipe.name!r}: stage {stage.name!r} starts from {name!r}, which runs later")
        return str(stage_model_dir(recipe, name)), name
    return ref, None


def _fingerprint(stage: StageConfig, parent_spec: str) -> dict[str, Any]:
    parent_manifest = Path(parent_spec) / "manifest.json"
    return {"config": to_dict(stage), "parent": parent_spec,
            "parent_manifest_sha256": sha256_file(parent_manifest) if parent_manifest.is_file() else None}


def _outputs_present(model_dir: Path, manifest: dict[str, Any]) -> bool:
    """Every output the manifest lists exists with its recorded size (full checksums: `verify_outputs`;
    too slow to run on every re-run of a 72B recipe)."""
    for rel, meta in manifest.get("outputs", {}).items():
        p = model_dir / rel
        if not p.is_file() or p.stat().st_size != meta["size"]:
            return False
    return True


def stage_is_finished(recipe: TrainRecipe, index: int) -> bool:
    """True when the stage's model dir has a manifest whose outputs are all present and whose recorded
    config and parent match the recipe now."""
    stage = recipe.stages[index]
    sdir = stage_dir(recipe, stage.name)
    manifest = read_manifest(sdir / MODEL_DIRNAME)
    cfg_file = sdir / STAGE_CONFIG_NAME
    if manifest is None or not cfg_file.is_file() or not _outputs_present(sdir / MODEL_DIRNAME, manifest):
        return False
    spec, _ = resolve_parent(recipe, index)
    return json.loads(cfg_file.read_text(encoding="utf-8")) == _fingerprint(stage, spec)


def run_train_recipe(recipe: TrainRecipe, *, only: Sequence[str] | None = None, force: bool = False,
               on_stage: Callable[[str, str], None] | None = None) -> list[StageResult]:
    """Run the recipe's stages in order (or just `only`), skipping finished ones and resuming killed ones.

    `force` retrains a stage from scratch even if finished (its checkpoints are discarded). `on_stage(name,
    event)` is told "skip", "start" or "done" (for CLI output). Raises `ConfigError` when a stage's parent
    output does not exist, or when a stage's directory holds work from a different config (unless `force`).
    """
    names = [s.name for s in recipe.stages]
    for n in only or []:
        if n not in names:
            raise ConfigError(f"recipe {recipe.name!r} has no stage {n!r} (stages: {', '.join(names)})")
    results = []
    for i, stage in enumerate(recipe.stages):
        if only and stage.name not in only:
            continue
        spec, parent_stage = resolve_parent(recipe, i)
        sdir = stage_dir(recipe, stage.name)
        if parent_stage is not None and not (Path(spec) / "manifest.json").is_file():
            raise ConfigError(f"recipe {recipe.name!r}: stage {stage.name!r} starts from stage "
                              f"{parent_stage!r}, whose output {spec} does not exist; run {parent_stage!r} first")
        if not force and stage_is_finished(recipe, i):
            log.info("stage %s already finished: skipping", stage.name)
            if on_stage:
                on_stage(stage.name, "skip")
            results.append(StageResult(name=stage.name, model_dir=sdir / MODEL_DIRNAME, skipped=True))
            continue
        fingerprint = _fingerprint(stage, spec)
        cfg_file = sdir / STAGE_CONFIG_NAME
        if force and sdir.exists():
            shutil.rmtree(sdir)
        elif cfg_file.is_file() and json.loads(cfg_file.read_text(encoding="utf-8")) != fingerprint:
            raise ConfigError(f"recipe {recipe.name!r}: {sdir} holds a run of stage {stage.name!r} with a different "
                              "config or parent; use --force to retrain it, or another output_dir")
        atomic_write_json(cfg_file, fingerprint)
        if on_stage:
            on_stage(stage.name, "start")
        parent_info = {"stage": parent_stage}
        parent_manifest = Path(spec) / "manifest.json"
        if parent_manifest.is_file():
            parent_info["manifest_sha256"] = sha256_file(parent_manifest)
        results.append(train_stage(stage, spec, sdir, parent=parent_info))
        if on_stage:
            on_stage(stage.name, "done")
    return results
