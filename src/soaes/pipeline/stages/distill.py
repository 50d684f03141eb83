"""Draft stages: teacher answers, the offline logit dump and draft distillation (soaes-distill)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from soaes_core import read_jsonl
from soaes_core.placement import input_device

from ..recipe import (
    PipelineRecipe,
    is_model_spec,
    model_spec,
    resolve_path,
    stage_placement,
)
from .base import (
    Input,
    Stage,
    StageContext,
    _target_input,
    load_placed_model,
    placed,
    placement_extra,
    register,
)


@register
class TeacherData(Stage):
    """The trained target answers domain prompts (soaes-distill `generate_teacher_answers`): KD training text, plus
    held-out prompts/answers."""

    name = "teacher_data"
    resumable = True  # answers already given are kept in the partial folder and not generated again
    weight = 2.0

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [_target_input(recipe)]

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        s = recipe.teacher_data
        paths: dict[str, str | None] = {}
        if s.source == "prompts":
            paths.update({f"teacher_data.prompts[{i}]": p for i, p in enumerate(s.prompts)})
        paths["teacher_data.heldout_prompts"] = s.heldout_prompts
        if s.domain_queries.max_queries and s.source != "magpie":
            paths.update({f"teacher_data.domain_queries.texts[{i}]": p for i, p in enumerate(s.domain_queries.texts)})
        return paths

    def external_files(self, ctx: StageContext) -> dict[str, Path]:
        return {k.removeprefix("teacher_data."): resolve_path(ctx.recipe, v)
                for k, v in self.data_paths(ctx.recipe).items() if v is not None}

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, **placement_extra(recipe, self.name)}

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:

        from soaes_core import load_tokenizer, seed_everything
        from soaes_distill.teacher_answers import generate_teacher_answers

        r = ctx.recipe
        seed_everything(r.seed)
        spec = ctx.spec(self.inputs(r)[0])
        cfg = teacher_answers_config(r, spec)
        model = load_placed_model(r, self.name, spec) if cfg.engine == "soaes" else None
        res = generate_teacher_answers(cfg, out, model=model, tokenizer=load_tokenizer(spec),
                                       resolve=lambda v: resolve_path(r, v),
                                       on_split_done=lambda split: ctx.fail_point(self.name, f"after_{split}"))
        return res.counts


def teacher_answers_config(r: PipelineRecipe, teacher: str) -> Any:
    """The recipe's teacher_data section as soaes-distill's `TeacherAnswersConfig` (paths resolved by the stage)."""
    from soaes_distill.teacher_answers import PassageSettings, TeacherAnswersConfig

    s = r.teacher_data
    dq = s.domain_queries
    return TeacherAnswersConfig(
        model=teacher, source=s.source, prompts=list(s.prompts), heldout_prompts=s.heldout_prompts,
        holdout_every=s.holdout_every, max_heldout=s.max_heldout, max_prompts=s.max_prompts,
        decontam_ngram=s.decontam_ngram, passages=PassageSettings(list(dq.texts), dq.max_queries, dq.num_terms),
        magpie=s.magpie, max_new_tokens=s.max_new_tokens, max_length=s.max_length, batch_size=s.batch_size,
        samples_per_prompt=s.samples_per_prompt, sample_temperature=s.sample_temperature, sample_top_p=s.sample_top_p,
        seed=r.seed, engine=s.engine, vllm=s.vllm, placement=stage_placement(r, "teacher_data"))


@register
class DumpLogits(Stage):
    """Top-k teacher logits of the trained target on the teacher data (soaes-distill `run_dump`)."""

    name = "dump_logits"
    resumable = True  # run_dump resumes a partial dump

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [_target_input(recipe), Input("data", "teacher_data", "teacher_data", None, "train_tokens.jsonl")]

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"temperatures": _temperatures(recipe), **placement_extra(recipe, self.name)}

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:

        from soaes_core import load_tokenizer
        from soaes_distill.dump import DumpConfig, run_dump

        r, s = ctx.recipe, ctx.recipe.dump_logits
        target, data = (ctx.spec(i) for i in self.inputs(r))
        cfg = DumpConfig(dataset=data, output_dir=str(out / "store"), model=target, top_k=s.top_k,
                         temperatures=_temperatures(r), batch_size=s.batch_size)
        res = run_dump(cfg, model=load_placed_model(r, self.name, target),
                       tokenizer=load_tokenizer(target))
        return {"examples": res.examples, "positions": res.positions, "bytes": res.bytes}


def _temperatures(recipe: PipelineRecipe) -> list[float]:
    d = recipe.distill_draft
    return sorted({float(d.kd.temperature), *(float(p.temperature) for p in d.sweep)})


def sweep_slug(alpha: float, temperature: float) -> str:
    return f"a{alpha:g}-t{temperature:g}"


@register
class DistillDraft(Stage):
    """KD of a draft from the trained target (soaes-distill `make_draft` + `run_distill` on the dumped logits);
    the offline acceptance estimate on held-out target answers for the undistilled and each distilled draft."""

    name = "distill_draft"
    resumable = True  # run_distill resumes from its last complete checkpoint
    weight = 3.0

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        ins = [_target_input(recipe), Input("data", "teacher_data", "teacher_data", None, "train_tokens.jsonl"),
               Input("heldout", "teacher_data", "teacher_data", None, "heldout_tokens.jsonl")]
        if recipe.distill_draft.kind == "layer":
            ins.append(Input("logits", "dump_logits", "dump_logits", None, "store"))
        if recipe.distill_draft.draft is not None:
            ins.append(Input("draft", None, "distill_draft.draft", recipe.distill_draft.draft))
        if recipe.distill_draft.online is not None:
            ins.append(Input("prompts", "teacher_data", "teacher_data", None, "train_prompts.jsonl"))
        return ins

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        return {"distill_draft.draft": recipe.distill_draft.draft}

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, **placement_extra(recipe, self.name)}

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        if ctx.recipe.distill_draft.kind == "feature":
            return self._run_feature(ctx, out)
        return self._run_layer(ctx, out)

    def _run_feature(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        """An EAGLE-style feature head trained on the target's hidden states (soaes-distill feature_kd); the
        undistilled point is the same head before training (the target's last layer, pass-through fc)."""
        import torch

        from soaes_core import atomic_write_json, load_tokenizer, seed_everything
        from soaes_distill.feature_kd import (
            build_draft,
            estimate_feature_acceptance,
            extract_features,
            train_feature_draft,
        )
        from soaes_distill.token_data import load_token_examples
        from soaes_specdec.feature_draft import FeatureDraft

        r, s = ctx.recipe, ctx.recipe.distill_draft
        target_spec, data, heldout = (ctx.spec(i) for i in self.inputs(r))
        seed_everything(r.seed)
        target = load_placed_model(r, self.name, target_spec)
        tok = load_tokenizer(target_spec)
        train, held = load_token_examples(data), load_token_examples(heldout)
        init = out / "undistilled"
        if not (init / "feature_draft.json").is_file():
            build_draft(target, train, s.feature, special_ids=tok.all_special_ids).save_pretrained(init)
            tok.save_pretrained(init)
        ctx.fail_point(self.name, "before_train")
        res = train_feature_draft(target, train, None, s.feature, out / "distilled", heldout_examples=held,
                                  tokenizer=tok)
        with torch.no_grad():  # the distilled draft was scored on the held-out answers by train_feature_draft
            draft = FeatureDraft.from_pretrained(init, dtype=target.dtype, device=input_device(target))
            feats = extract_features(target, held, batch_size=s.feature.extract_batch_size)
            init_est = estimate_feature_acceptance(target, draft, held, feats, top_p=s.feature.top_p,
                                                   temperature=s.feature.temperature, block_sizes=(3,))
        drafts: dict[str, Any] = {
            "undistilled": {"dir": "undistilled", "kind": "feature", "offline_acceptance": init_est},
            "distilled": {"dir": "distilled/draft", "kind": "feature", "train_seconds": round(res.train_seconds, 2),
                          "extract_seconds": round(res.extract_seconds, 2), "steps": res.steps,
                          "best_step": res.best_step, "offline_acceptance": res.heldout_metrics or {}}}
        for info in drafts.values():
            info["offline_acceptance"] = {k: round(float(v), 6) for k, v in info["offline_acceptance"].items()}
        atomic_write_json(out / "drafts.json", drafts)
        return {"drafts": len(drafts), "heldout_examples": len(held), "kind": "feature"}

    def _run_layer(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_core import atomic_write_json
        from soaes_distill.acceptance import estimate_drafts_acceptance
        from soaes_distill.draft_init import make_draft
        from soaes_distill.recipe import DistillRecipe, run_distill

        r, s = ctx.recipe, ctx.recipe.distill_draft
        target, data, heldout, logits = (ctx.spec(i) for i in self.inputs(r)[:4])
        init = out / "undistilled"
        if s.draft is not None:
            student = model_spec(r, s.draft)
        else:
            if not (init / "config.json").is_file():
                make_draft(target, init, num_layers=s.draft_layers)
            student = str(init)
        ctx.fail_point(self.name, "before_train")
        points = [("distilled", s.kd)] + [(f"sweep/{sweep_slug(p.alpha, p.temperature)}",
                                           dataclasses.replace(s.kd, alpha=p.alpha, temperature=p.temperature))
                                          for p in s.sweep]
        drafts: dict[str, Any] = {"undistilled": {"dir": "undistilled" if s.draft is None else student}}
        for rel, kd in points:
            res = run_distill(DistillRecipe(student=student, train_data=data, output_dir=str(out / rel),
                                            teacher_logits=logits, train_embeddings=s.train_embeddings, kd=kd,
                                            train=s.train))
            shutil.rmtree(out / rel / "checkpoints", ignore_errors=True)
            drafts[rel] = {"dir": f"{rel}/model", "alpha": kd.alpha, "temperature": kd.temperature,
                           "train_seconds": round(res.train_seconds, 2),
                           "final_loss": res.kd_history[-1].get("loss") if res.kd_history else None,
                           "stopped_by": res.stop.stopped_by if res.stop else None}
        if s.online is not None:  # online distillation from the same start, on the teacher's train prompts
            from soaes_distill.online import OnlineDistillRecipe, run_online

            on = run_online(OnlineDistillRecipe.of(
                s.online, target=target, draft=student, prompts=ctx.spec(self.inputs(r)[-1]),
                output_dir=str(out / "online"), device=placed(r, self.name).device))
            drafts["online"] = {"dir": "online/model", "train_seconds": round(on.seconds, 2), **on.metrics}
        p = placed(r, self.name)
        folders = {k: v["dir"] if is_model_spec(str(v["dir"])) else out / v["dir"] for k, v in drafts.items()}
        estimates = estimate_drafts_acceptance(load_placed_model(r, self.name, target), heldout, folders,
                                               {"dtype": p.dtype, "device": p.device})
        for k, est in estimates.items():
            drafts[k]["offline_acceptance"] = est
        atomic_write_json(out / "drafts.json", drafts)
        return {"drafts": len(drafts), "heldout_examples": len(read_jsonl(heldout))}
