"""The evaluation stage: soaes-eval (lm-eval) on the base, CPT and trained models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

from ..recipe import (
    PipelineRecipe,
    package_config,
    resolve_path,
    target_spec,
)
from .base import (
    MODEL_DIR,
    Input,
    Stage,
    StageContext,
    placed,
    placement_extra,
    register,
)


@register
class Eval(Stage):
    """soaes-eval (lm-eval): general tasks (CMMLU / C-Eval) for the base and CPT models, domain QA for every
    trained stage present (Table 1 and 2)."""

    name = "eval"
    resumable = True  # lm-eval's request cache under the stage folder
    weight = 3.0

    MODELS: ClassVar[tuple[tuple[str, str | None, str, bool], ...]] = (
        # label, stage (None = the base target), Table 2 row, general tasks too
        ("base", None, "base", True),
        ("cpt", "cpt", "CPT", True),
        ("sft_stage2_only", "sft_stage2_only", "CPT + stage-2 SFT", False),
        ("sft_stage2", "sft_stage2", "CPT + stage-1 + stage-2 SFT", False),
        ("base_sft_stage1", "base_sft_stage1", "base + stage-1 SFT", False),  # stages/variants.py
        ("base_sft_stage2", "base_sft_stage2", "base + stage-2 SFT", False),
        ("sft_joint", "sft_joint", "CPT + stage-1&2 joint SFT", False),
        ("general_draft", "general_draft", "general undistilled draft", False),  # a draft: Table 3
    )

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        ins = [Input("base", None, "target", recipe.target)]
        ins += [Input(label, st, "stages", None, MODEL_DIR, required=st in recipe.stages)
                for label, st, _, _ in self.MODELS if st is not None]
        if recipe.distill_draft.sweep:  # Table 3: the drafts' own domain QA quality
            ins.append(Input("drafts", "distill_draft", "distill_draft.sweep", None, required=False))
        return ins

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        return {"eval.data_dir": recipe.eval.data_dir}

    def external_files(self, ctx: StageContext) -> dict[str, Path]:
        return {"eval_data": resolve_path(ctx.recipe, ctx.recipe.eval.data_dir)}  # a folder: hashed by content

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"target": recipe.target, **placement_extra(recipe, self.name)}

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_core import atomic_write_json

        r, s = ctx.recipe, ctx.recipe.eval
        data_dir = str(resolve_path(r, s.data_dir))
        index = []
        for label, st, row, general in self.MODELS:
            if st is not None and st not in r.stages:
                continue
            model = target_spec(r) if st is None else str(ctx.stage_dir(st) / MODEL_DIR)
            runs = [("domain", [s.domain_task], True)] + ([("general", list(s.general_tasks), False)] if general
                                                           else [])
            entry: dict[str, Any] = {"label": label, "stage": row, "model": model,
                                     "kind": "draft" if st == "general_draft" else "target"}
            index.append(self._evaluate(ctx, out, entry, runs, data_dir))
        if r.distill_draft.sweep and "distill_draft" in r.stages:
            ddir = ctx.stage_dir("distill_draft")
            drafts = json.loads((ddir / "drafts.json").read_text(encoding="utf-8"))
            for key, info in drafts.items():
                label = "draft-" + key.replace("/", "-")
                entry = {"label": label, "stage": f"draft ({key})", "model": str(ddir / info["dir"]), "kind": "draft",
                         "alpha": info.get("alpha"), "temperature": info.get("temperature")}
                index.append(self._evaluate(ctx, out, entry, [("domain", [s.domain_task], True)], data_dir))
        atomic_write_json(out / "index.json", index)
        shutil.rmtree(out / ".cache", ignore_errors=True)
        return {"models": len(index)}

    def _evaluate(self, ctx: StageContext, out: Path, entry: dict[str, Any], runs: list[tuple[str, list[str], bool]],
                  data_dir: str | None) -> dict[str, Any]:
        from soaes_eval.runner import EvalRunConfig, run_eval

        r, s, label = ctx.recipe, ctx.recipe.eval, entry["label"]
        where = placed(r, self.name)
        for kind, tasks, chat in runs:
            folder = out / label / kind
            cfg = package_config(s, EvalRunConfig, tasks=tasks, model=entry["model"], output_dir=str(folder),
                                 data_dir=data_dir, apply_chat_template=chat, name=label, stage=entry["stage"],
                                 seed=r.seed, cache=str(out / ".cache" / f"{label}-{kind}"), device=where.device,
                                 dtype=where.dtype)
            run_eval(cfg)
            entry[kind] = f"{label}/{kind}"
            ctx.fail_point(self.name, f"after_{label}_{kind}")
        return entry


