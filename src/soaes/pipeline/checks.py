"""Whole-recipe checks before any work starts: the stage list against the registry, paths, inputs, placements,
eval tasks, the export draft and block size, the draft's tokenizer. Each failure is one `ConfigError` naming the
recipe file and the field. This module reads both the recipe and the stages (neither imports it)."""

from __future__ import annotations

import difflib
import os
from typing import Any

from soaes_core.errors import ConfigError, SoaesError

from .recipe import (
    MODEL_STAGES,
    PipelineRecipe,
    is_model_spec,
    model_spec,
    owned_by_pipeline,
    read_pipeline_recipe,
    resolve_path,
    stage_placement,
    target_spec,
)
from .stages import STAGES
from .stages.distill import sweep_slug


def load_pipeline_recipe(name_or_path: str | os.PathLike[str], *, quick: bool = False,
                         overrides: dict[str, Any] | None = None) -> PipelineRecipe:
    """Load and validate a recipe (a path or a shipped recipe name); `quick` applies its `quick:` overrides."""
    recipe = read_pipeline_recipe(name_or_path, quick=quick, overrides=overrides)
    validate_recipe(recipe)
    return recipe


def _fail(recipe: PipelineRecipe, where: str, message: str) -> ConfigError:
    return ConfigError(f"{recipe.source}: {where}: {message}")


def validate_recipe(recipe: PipelineRecipe) -> None:
    """Unknown, duplicated or misordered stages, missing paths and models, stages whose input stage is absent (and
    not given as a path), fields the pipeline sets itself, unknown eval tasks or export draft, and a draft whose
    tokenizer differs from the target's. Section values are checked by the section classes."""
    _check_stage_list(recipe)
    for key in ("target", "trained_target"):
        value = getattr(recipe, key)
        if value is not None and not is_model_spec(value):
            p = resolve_path(recipe, value.removeprefix("gguf:"))
            if not p.exists():
                raise _fail(recipe, key, f"no such model file or directory: {p}")
    for i, name in enumerate(recipe.stages):
        _check_stage_inputs(recipe, i, name)
    _check_pipeline_fields(recipe)
    _check_export(recipe)
    _check_eval_tasks(recipe)
    _check_placements(recipe)
    _check_draft_tokenizer(recipe)


def _check_stage_list(recipe: PipelineRecipe) -> None:
    known = list(STAGES)
    if not recipe.stages:
        raise _fail(recipe, "stages", f"no stages; list some of: {', '.join(known)}")
    for i, name in enumerate(recipe.stages):
        if name not in STAGES:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise _fail(recipe, f"stages[{i}]", f"unknown stage {name!r}{hint}; known: {', '.join(known)}")
        if recipe.stages.index(name) != i:
            raise _fail(recipe, f"stages[{i}]", f"stage {name!r} is listed twice")


def _check_stage_inputs(recipe: PipelineRecipe, i: int, name: str) -> None:
    stage = STAGES[name]
    for inp in stage.inputs(recipe):
        if inp.explicit is None and inp.stage in recipe.stages and recipe.stages.index(inp.stage) > i:
            raise _fail(recipe, f"stages[{i}]", f"stage {name!r} reads the output of stage {inp.stage!r}, which is "
                        f"listed after it (stages[{recipe.stages.index(inp.stage)}]); list {inp.stage!r} first")
    for path_field, value in stage.data_paths(recipe).items():
        if value is None or is_model_spec(value):
            continue
        p = resolve_path(recipe, value.removeprefix("gguf:"))
        if not p.exists():
            raise _fail(recipe, path_field, f"no such file or directory: {p}")
    for inp in stage.inputs(recipe):
        if inp.explicit is None and inp.stage is not None and inp.stage not in recipe.stages and inp.required:
            raise _fail(recipe, "stages", f"stage {name!r} needs the output of stage {inp.stage!r}, which is not "
                        f"in stages (add it, or set {inp.field} to a path)")


def _check_pipeline_fields(recipe: PipelineRecipe) -> None:
    """A package-config field the pipeline sets itself (e.g. the bench's `target`) is refused, not ignored."""
    for name in STAGES:
        section = getattr(recipe, name, None)
        for key in owned_by_pipeline(section) if section is not None else []:
            raise _fail(recipe, f"{name}.{key}", f"set by the pipeline ({type(section).PIPELINE_SETS[key]}); "
                        "remove it from the recipe")


def _check_placements(recipe: PipelineRecipe) -> None:
    """Each model-running stage's placement resolves on this machine (e.g. `cuda` without a GPU is refused here)."""
    for name in MODEL_STAGES:
        if name not in recipe.stages:
            continue
        own = getattr(recipe, name).placement is not None
        try:
            stage_placement(recipe, name).resolve()
        except ConfigError as err:
            raise _fail(recipe, f"{name}.placement" if own else "placement", str(err)) from None


def draft_names(recipe: PipelineRecipe) -> list[str]:
    """The keys of the `drafts.json` that distill_draft writes for this recipe."""
    return ["undistilled", "distilled"] + [f"sweep/{sweep_slug(p.alpha, p.temperature)}"
                                           for p in recipe.distill_draft.sweep]


def _check_export(recipe: PipelineRecipe) -> None:
    names = draft_names(recipe)
    if recipe.export.draft not in names:
        raise _fail(recipe, "export.draft", f"no draft {recipe.export.draft!r}; distill_draft makes: "
                    f"{', '.join(names)}")
    bench = recipe.specdec_bench
    if "export" in recipe.stages and recipe.export.num_speculative_tokens is None and (
            "specdec_bench" not in recipe.stages or "greedy" not in bench.modes or "speculative" not in bench.methods):
        raise _fail(recipe, "export.num_speculative_tokens", "unset means the bench's fastest greedy speculative "
                    "block size, but specdec_bench does not run greedy speculative decoding: set it")


def shipped_eval_tasks() -> set[str]:
    """Task and group names of soaes-eval's shipped lm-eval YAMLs (read as text: no lm-eval import)."""
    import re

    from soaes_eval.tasks import TASKS_DIR

    pattern = re.compile(r"^(?:task|group):\s*[\"']?([A-Za-z0-9_.\-]+)[\"']?\s*$", re.M)
    return {m for p in TASKS_DIR.rglob("*.yaml") for m in pattern.findall(p.read_text(encoding="utf-8"))}


def _check_eval_tasks(recipe: PipelineRecipe) -> None:
    """soaes tasks against the shipped YAMLs; any other name against lm-eval's index (slow, so only when asked)."""
    s = recipe.eval
    named = [(f"eval.general_tasks[{i}]", t) for i, t in enumerate(s.general_tasks)] + [("eval.domain_task",
                                                                                         s.domain_task)]
    shipped = shipped_eval_tasks()
    for where, task in named:
        if task.startswith("soaes_") and task not in shipped:
            near = difflib.get_close_matches(task, sorted(shipped), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise _fail(recipe, where, f"unknown task {task!r}{hint}; soaes tasks: soaes_cmmlu, soaes_ceval, "
                        "soaes_domain_qa, their subtasks, or any lm-eval task")
    others = [(w, t) for w, t in named if not t.startswith("soaes_")]
    if others and "eval" in recipe.stages:
        from soaes_eval.tasks import task_manager

        known = task_manager(include_defaults=True).all_tasks
        for where, task in others:
            if task not in known:
                raise _fail(recipe, where, f"unknown task {task!r}: neither a soaes task (soaes_cmmlu, soaes_ceval, "
                            "soaes_domain_qa, their subtasks) nor an lm-eval task")


def _check_draft_tokenizer(recipe: PipelineRecipe) -> None:
    draft = recipe.distill_draft.draft
    if draft is None or "distill_draft" not in recipe.stages:
        return
    from soaes_core import load_tokenizer, tokenizer_fingerprint

    spec, target = model_spec(recipe, draft), target_spec(recipe)
    try:
        a = tokenizer_fingerprint(load_tokenizer(spec), ids_only=True)
    except SoaesError as err:
        raise _fail(recipe, "distill_draft.draft", f"cannot load the draft's tokenizer: {err}") from None
    b = tokenizer_fingerprint(load_tokenizer(target), ids_only=True)
    if a != b:
        raise _fail(recipe, "distill_draft.draft", f"the draft's tokenizer ({draft}) differs from the target's "
                    f"({recipe.target}); speculative decoding needs identical token ids")
