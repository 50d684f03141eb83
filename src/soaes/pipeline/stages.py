"""The pipeline's stages: one small class each, registered in `STAGES`; each is a call of package APIs.

A stage declares its inputs (an upstream stage's output, or an explicit path from the recipe), the recipe section
that configures it, and `run(ctx, out)`, which writes everything into `out` and returns counts for the manifest.
The runner (`runner.py`) decides whether a stage runs, and makes its output appear atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from soaes_core import read_jsonl, write_jsonl
from soaes_core.errors import ConfigError, SoaesError
from soaes_core.placement import ResolvedPlacement, input_device

from .recipe import (
    STAGE_ORDER,
    PipelineRecipe,
    is_model_spec,
    model_spec,
    resolve_path,
    stage_placement,
    target_spec,
)

FAIL_ENV = "SOAES_PIPELINE_FAIL_AT"  # "STAGE:POINT": raise there (tests of kill-and-rerun)
# "STAGE:POINT=FILE": at that point create FILE.waiting, then wait until FILE exists (tests of concurrent runs)
PAUSE_ENV = "SOAES_PIPELINE_PAUSE_AT"
MODEL_DIR = "model"


class InjectedFailure(SoaesError):
    """Raised at a stage's named point when `SOAES_PIPELINE_FAIL_AT` asks for it (tests of kill-and-rerun)."""


@dataclass
class Input:
    """Something a stage reads: the output of `stage` (under `subpath`), unless the recipe gives `explicit`."""

    name: str
    stage: str | None
    field: str
    explicit: str | None = None
    subpath: str = ""
    required: bool = True


@dataclass
class StageContext:
    """What a running stage may use: the recipe, the run directory and the finished stages' output folders."""

    recipe: PipelineRecipe
    run_dir: Path

    def stage_dir(self, name: str) -> Path:
        """The final output folder of stage `name` (`<run>/stages/<NN>_<name>`)."""
        return self.run_dir / "stages" / stage_dirname(name)

    def resolve(self, inp: Input) -> Path | str | None:
        """Where input `inp` is: an explicit path/model spec, or the upstream stage's output (None if absent)."""
        if inp.explicit is not None:
            if is_model_spec(inp.explicit) or inp.explicit.startswith("gguf:"):
                return model_spec(self.recipe, inp.explicit)
            return resolve_path(self.recipe, inp.explicit)
        if inp.stage is None or inp.stage not in self.recipe.stages:
            return None
        return self.stage_dir(inp.stage) / inp.subpath if inp.subpath else self.stage_dir(inp.stage)

    def path(self, inp: Input) -> Path:
        p = self.resolve(inp)
        if p is None:
            raise SoaesError(f"{self.recipe.source}: {inp.field}: no input for {inp.name!r}")
        return Path(p)

    def spec(self, inp: Input) -> str:
        p = self.resolve(inp)
        if p is None:
            raise SoaesError(f"{self.recipe.source}: {inp.field}: no input for {inp.name!r}")
        return str(p)

    def fail_point(self, stage: str, point: str) -> None:
        """Raise `InjectedFailure` when `SOAES_PIPELINE_FAIL_AT` is `stage:point` (a stand-in for a kill)."""
        if os.environ.get(FAIL_ENV) == f"{stage}:{point}":
            raise InjectedFailure(f"injected failure at {stage}:{point} ({FAIL_ENV})")
        where, sep, gate = os.environ.get(PAUSE_ENV, "").partition("=")
        if sep and where == f"{stage}:{point}":
            import time

            Path(gate + ".waiting").touch()
            deadline = time.monotonic() + 600
            while not Path(gate).exists():
                if time.monotonic() > deadline:
                    raise InjectedFailure(f"paused at {stage}:{point} for 600 s: {gate} never appeared ({PAUSE_ENV})")
                time.sleep(0.05)


def stage_dirname(name: str) -> str:
    return f"{STAGE_ORDER.index(name) + 1:02d}_{name}"


class Stage:
    """One pipeline stage. `resumable`: its partial output is kept across a kill, because the package it calls
    resumes from it (training checkpoints, dump shards); otherwise a rerun starts from an empty folder."""

    name: ClassVar[str]
    resumable: ClassVar[bool] = False
    weight: ClassVar[float] = 1.0  # relative cost, for the overall ETA before any timing is known

    def settings(self, recipe: PipelineRecipe) -> Any:
        """The recipe section that configures this stage (hashed into its config fingerprint); its `placement` is
        left out: what it resolves to is hashed instead (`placement_extra`)."""
        section = getattr(recipe, self.name, None)
        if getattr(section, "placement", None) is not None:
            section = dataclasses.replace(section, placement=None)
        return section

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        """Recipe values outside the stage's section that change its output."""
        return {"seed": recipe.seed}

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return []

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        """Recipe field → path value that must exist before anything runs."""
        return {}

    def external_files(self, ctx: StageContext) -> dict[str, Path]:
        """Files outside the run that this stage reads (hashed, so an edit reruns the stage)."""
        return {}

    def check(self, ctx: StageContext) -> None:
        """Refuse, before the run creates anything, a setting this stage would fail on."""

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        raise NotImplementedError


STAGES: dict[str, Stage] = {}


def register(cls: type[Stage]) -> type[Stage]:
    STAGES[cls.name] = cls()
    return cls


def placed(recipe: PipelineRecipe, stage: str) -> ResolvedPlacement:
    """Where stage `stage` loads its models on this machine (its placement, resolved)."""
    return stage_placement(recipe, stage).resolve()


def load_placed_model(recipe: PipelineRecipe, stage: str, spec: str) -> Any:
    """Model `spec` loaded where stage `stage` places its models, in eval mode."""
    from soaes_core import load_model

    return load_model(spec, **placed(recipe, stage).load_kwargs()).eval()


def placement_extra(recipe: PipelineRecipe, stage: str, dtype: bool = True) -> dict[str, Any]:
    """The fingerprint entry of a stage's placement: nothing when it resolves to the CPU in float32 (what every stage
    used before placements existed, so those runs stay up to date), else its device type (and dtype)."""
    r = placed(recipe, stage)
    fp = r.fingerprint() if dtype else ({} if r.device_type == "cpu" else {"device": r.device_type})
    return {"placement": fp} if fp else {}


def _target_input(recipe: PipelineRecipe) -> Input:
    """The trained target: sft_stage2's model, or the recipe's `trained_target`."""
    return Input("target", "sft_stage2", "trained_target", recipe.trained_target, MODEL_DIR)


# ------------------------------------------------------------------------------------------------- data


@register
class Curate(Stage):
    name = "curate"
    resumable = True  # soaes-data's curation resumes its own phases

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        return {"curate.recipe": recipe.curate.recipe}

    def _config(self, ctx: StageContext, out: Path | None = None) -> Any:
        from soaes_data.pipeline import load_curation_config

        over = {**ctx.recipe.curate.overrides, "output_dir": str(out or ctx.run_dir / "_probe")}
        return load_curation_config(resolve_path(ctx.recipe, ctx.recipe.curate.recipe), overrides=over)

    def external_files(self, ctx: StageContext) -> dict[str, Path]:
        files = {"curation_recipe": resolve_path(ctx.recipe, ctx.recipe.curate.recipe)}
        for i, p in enumerate(self._config(ctx).inputs):
            p = Path(p)
            for j, f in enumerate(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]):
                files[f"corpus{i}.{j}"] = f
        return files

    def check(self, ctx: StageContext) -> None:
        from soaes_data.pipeline import input_holding

        run_dir = ctx.run_dir.resolve()
        holder = input_holding(run_dir, self._config(ctx).inputs)
        if holder is not None:
            raise ConfigError(f"output folder {run_dir} is inside curation input {holder}: curation would read its "
                              "own outputs back as documents; choose an output folder outside the inputs")

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_data.pipeline import run_curation

        reports = run_curation(self._config(ctx, out / "curation"))
        docs = out / "curation" / "final" / "docs.jsonl"
        if not docs.is_file():
            raise SoaesError(f"curation wrote no {docs}")
        return {"documents": len(read_jsonl(docs)), "curation": {r.name: dict(r.counts) for r in reports}}


def curated_docs(recipe: PipelineRecipe) -> Input:
    """The corpus that packing reads: decontaminated when that stage runs, else curated (or `pack.cpt_data`)."""
    if "decontaminate" in recipe.stages:
        return Input("corpus", "decontaminate", "pack.cpt_data", recipe.pack.cpt_data, "docs.jsonl")
    return Input("corpus", "curate", "pack.cpt_data", recipe.pack.cpt_data, "curation/final/docs.jsonl")


@register
class Decontaminate(Stage):
    name = "decontaminate"

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [Input("corpus", "curate", "pack.cpt_data", recipe.pack.cpt_data, "curation/final/docs.jsonl")]

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        paths = {f"decontaminate.eval_dirs[{i}]": d for i, d in enumerate(recipe.decontaminate.eval_dirs)}
        return {**paths, "pack.sft_stage1": recipe.pack.sft_stage1, "pack.sft_stage2": recipe.pack.sft_stage2}

    def external_files(self, ctx: StageContext) -> dict[str, Path]:
        r = ctx.recipe
        files = {"sft_stage1": resolve_path(r, r.pack.sft_stage1), "sft_stage2": resolve_path(r, r.pack.sft_stage2)}
        for i, d in enumerate(r.decontaminate.eval_dirs):
            for j, f in enumerate(sorted(resolve_path(r, d).rglob("*.csv"))):
                files[f"eval{i}.{j}"] = f
        return files

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_data.decontam import DecontamConfig, NgramIndex, decontaminate_records

        r, s = ctx.recipe, ctx.recipe.decontaminate
        index = NgramIndex.from_config(DecontamConfig(eval_dirs=[str(resolve_path(r, d)) for d in s.eval_dirs],
                                                      use_fetched=False, ngram=s.ngram, min_overlaps=s.min_overlaps))
        counts: dict[str, Any] = {}
        sources = {"docs": ctx.path(self.inputs(r)[0]), "sft_stage1": resolve_path(r, r.pack.sft_stage1),
                   "sft_stage2": resolve_path(r, r.pack.sft_stage2)}
        rejects: list[dict[str, Any]] = []
        for name, path in sources.items():
            rows = read_jsonl(path)
            kept, dropped, _ = decontaminate_records(rows, index, s.min_overlaps)
            write_jsonl(out / f"{name}.jsonl", kept)
            rejects += [{"file": name, **d} for d in dropped]
            counts[name] = {"in": len(rows), "kept": len(kept), "dropped": len(dropped)}
        write_jsonl(out / "rejects.jsonl", rejects)
        return counts


@register
class Pack(Stage):
    name = "pack"

    def _sft(self, recipe: PipelineRecipe, key: str) -> Input:
        if "decontaminate" in recipe.stages:
            return Input(key, "decontaminate", f"pack.{key}", None, f"{key}.jsonl")
        return Input(key, None, f"pack.{key}", getattr(recipe.pack, key))

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [curated_docs(recipe), self._sft(recipe, "sft_stage1"), self._sft(recipe, "sft_stage2"),
                Input("tokenizer", None, "target", recipe.target)]

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        return {"pack.cpt_data": recipe.pack.cpt_data, "pack.sft_stage1": recipe.pack.sft_stage1,
                "pack.sft_stage2": recipe.pack.sft_stage2}

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"target": recipe.target}  # its tokenizer

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_core import load_tokenizer
        from soaes_data.tokenize_pack import pack_cpt_corpus, pack_sft_file

        r = ctx.recipe
        target = target_spec(r)
        tok = load_tokenizer(target)
        corpus, sft1, sft2 = (ctx.path(i) for i in self.inputs(r)[:3])
        pack_cpt_corpus([corpus], out / "cpt", tok, r.pack.max_length, tokenizer_spec=target)
        ctx.fail_point(self.name, "after_cpt")
        counts = {"cpt": _packed_rows(out / "cpt")}
        for key, path in (("sft_stage1", sft1), ("sft_stage2", sft2)):
            pack_sft_file(path, out / key, tok, r.pack.max_length, tokenizer_spec=target, on_error="skip")
            counts[key] = _packed_rows(out / key)
        return counts


def _packed_rows(folder: Path) -> Any:
    from soaes_core import read_manifest

    return (read_manifest(folder) or {}).get("counts", {})


# ------------------------------------------------------------------------------------------------- training


class TrainStage(Stage):
    """A CPT or SFT stage: soaes-train's `train_stage` on packed data, from the parent stage's model."""

    kind: ClassVar[str]
    data_key: ClassVar[str]
    parent: ClassVar[str | None]  # None: the recipe's base target
    resumable = True  # train_stage resumes from its last complete checkpoint
    weight = 3.0

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        s = getattr(recipe, self.name)
        data = Input("data", "pack", f"{self.name}.data", s.data, self.data_key)
        if self.parent is None:
            return [data, Input("model", None, f"{self.name}.model", s.model or recipe.target)]
        return [data, Input("model", self.parent, f"{self.name}.model", s.model, MODEL_DIR)]

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        s = getattr(recipe, self.name)
        return {f"{self.name}.data": s.data, f"{self.name}.model": s.model}

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, "target": recipe.target if self.parent is None else None}

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_train.config import DataConfig, StageConfig
        from soaes_train.trainer import train_stage

        r, s = ctx.recipe, getattr(ctx.recipe, self.name)
        ins = self.inputs(r)
        spec = ctx.spec(ins[1])
        cfg = StageConfig(name=self.name, kind=self.kind,  # type: ignore[arg-type]
                          data=DataConfig(paths=[str(ctx.path(ins[0]))], format="packed", max_length=s.max_length),
                          train=s.train)
        ctx.fail_point(self.name, "before_train")
        result = train_stage(cfg, spec, out, parent={"stage": self.parent or "base", "spec": spec})
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: the model is the output
        return {"model": MODEL_DIR, "metrics": result.metrics, "data": result.counts,
                "resumed_from": result.resumed_from}


@register
class Cpt(TrainStage):
    name, kind, data_key, parent = "cpt", "cpt", "cpt", None


@register
class SftStage1(TrainStage):
    name, kind, data_key, parent = "sft_stage1", "sft", "sft_stage1", "cpt"


@register
class SftStage2(TrainStage):
    name, kind, data_key, parent = "sft_stage2", "sft", "sft_stage2", "sft_stage1"


@register
class SftStage2Only(TrainStage):
    """Table 2's ablation: stage-2 SFT straight after CPT, without stage 1."""

    name, kind, data_key, parent = "sft_stage2_only", "sft", "sft_stage2", "cpt"


# ------------------------------------------------------------------------------------------------- draft


@register
class TeacherData(Stage):
    """The trained target answers domain prompts greedily: KD training text, plus held-out prompts/answers."""

    name = "teacher_data"
    weight = 2.0

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [_target_input(recipe)]

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        s = recipe.teacher_data
        paths: dict[str, str | None] = {f"teacher_data.prompts[{i}]": p for i, p in enumerate(s.prompts)}
        paths["teacher_data.heldout_prompts"] = s.heldout_prompts
        if s.domain_queries.max_queries:
            paths.update({f"teacher_data.domain_queries.texts[{i}]": p for i, p in enumerate(s.domain_queries.texts)})
        return paths

    def external_files(self, ctx: StageContext) -> dict[str, Path]:
        return {k.removeprefix("teacher_data."): resolve_path(ctx.recipe, v)
                for k, v in self.data_paths(ctx.recipe).items() if v is not None}

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, **placement_extra(recipe, self.name)}

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:

        from soaes_core import load_tokenizer, seed_everything
        from soaes_distill.synth import blackbox_sft_records, chat_records_to_examples, sampled_sft_records
        from soaes_distill.token_data import write_token_jsonl

        r, s = ctx.recipe, ctx.recipe.teacher_data
        seed_everything(r.seed)
        spec = ctx.spec(self.inputs(r)[0])
        tok, model = load_tokenizer(spec), load_placed_model(r, self.name, spec)
        rejects: list[dict[str, Any]] = []
        train, held = _teacher_prompts(r, rejects)
        counts: dict[str, Any] = {"prompts": len(train) + len(held)}
        for split, ps in (("train", train), ("heldout", held)):
            records = blackbox_sft_records(model, tok, ps, s.max_new_tokens, batch_size=s.batch_size)
            if split == "train":
                for k in range(s.samples_per_prompt):
                    records += sampled_sft_records(model, tok, ps, s.max_new_tokens, batch_size=s.batch_size,
                                                   temperature=s.sample_temperature, top_p=s.sample_top_p,
                                                   seed=r.seed + 1 + k)
            examples = chat_records_to_examples(tok, records, s.max_length, rejects)
            write_jsonl(out / f"{split}_records.jsonl", records)
            write_token_jsonl(out / f"{split}_tokens.jsonl", examples)
            write_jsonl(out / f"{split}_prompts.jsonl",  # chat messages: benchmarks apply the chat template
                        [{"id": p.get("id"), "messages": [{"role": "user", "content": p["prompt"]}]} for p in ps])
            counts[split] = {"prompts": len(ps), "records": len(records), "examples": len(examples)}
            ctx.fail_point(self.name, f"after_{split}")
        write_jsonl(out / "rejects.jsonl", rejects)
        counts["rejected"] = len(rejects)
        return counts


def _teacher_prompts(r: PipelineRecipe, rejects: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                                                   list[dict[str, Any]]]:
    """Training and held-out prompts of the teacher_data stage; what is dropped goes to `rejects` with the reason."""
    from soaes_core import read_prompts
    from soaes_distill.domain_queries import held_out_matcher

    s = r.teacher_data
    prompts = [p for f in s.prompts for p in read_prompts(resolve_path(r, f))]
    prompts = prompts[: s.max_prompts] if s.max_prompts else prompts
    if s.heldout_prompts is None:
        k = s.holdout_every
        train = [p for i, p in enumerate(prompts) if i % k != k - 1]
        held = [p for i, p in enumerate(prompts) if i % k == k - 1]
    else:
        held = read_prompts(resolve_path(r, s.heldout_prompts))
        held = held[: s.max_heldout] if s.max_heldout else held
        held_out_index = held_out_matcher([h["prompt"] for h in held], s.decontam_ngram)
        train = []
        for p in prompts:
            if held_out_index(p["prompt"]) is not None:
                rejects.append({"id": p.get("id"), "reason": f"shares a {s.decontam_ngram}-character span with a "
                                "held-out prompt"})
            else:
                train.append(p)
    if s.domain_queries.max_queries:
        from soaes_distill.domain_queries import DomainQueryConfig, build_domain_queries

        texts = []
        for f in s.domain_queries.texts:
            for rec in read_jsonl(resolve_path(r, f)):
                texts += [rec["text"]] if isinstance(rec.get("text"), str) else [
                    m["content"] for m in rec.get("messages", []) if isinstance(m.get("content"), str)]
        cfg = DomainQueryConfig(num_terms=s.domain_queries.num_terms, max_queries=s.domain_queries.max_queries,
                                decontam_ngram=s.decontam_ngram, seed=r.seed)
        q = build_domain_queries(texts, [h["prompt"] for h in held], cfg)
        train += q.prompts
        rejects += q.rejects
    return train, held


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
        import dataclasses

        from soaes_core import atomic_write_json
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
                           "final_loss": res.kd_history[-1].get("loss") if res.kd_history else None}
        estimates = _estimate_acceptance(target, heldout, {k: (out / v["dir"] if not is_model_spec(str(v["dir"]))
                                                               else v["dir"]) for k, v in drafts.items()},
                                         placed(r, self.name))
        for k, est in estimates.items():
            drafts[k]["offline_acceptance"] = est
        atomic_write_json(out / "drafts.json", drafts)
        return {"drafts": len(drafts), "heldout_examples": len(read_jsonl(heldout))}


def _estimate_acceptance(target_spec: str, heldout: str, drafts: dict[str, Any],
                         placement: ResolvedPlacement) -> dict[str, dict[str, float]]:
    """soaes-distill's offline acceptance estimator (teacher-forced, greedy and top-p 0.7) per draft, the models where
    `placement` puts them; the logits are compared in float32 on the CPU."""
    import torch

    from soaes_core import load_model
    from soaes_distill.acceptance import AcceptanceAccumulator
    from soaes_distill.token_data import load_token_examples
    from soaes_specdec.draft import load_draft

    examples = load_token_examples(heldout)
    target = load_model(target_spec, **placement.load_kwargs()).eval()
    out = {}

    def logits(model: Any, ids: list[int]) -> Any:
        return model(input_ids=torch.tensor([ids], device=input_device(model)), use_cache=False).logits.float().cpu()

    with torch.no_grad():
        t_logits = [logits(target, ex.input_ids) for ex in examples]
        for name, d in drafts.items():
            draft = load_draft(str(d), dtype=placement.dtype, device=placement.device)
            acc = AcceptanceAccumulator(top_p=0.7, block_sizes=(3,))
            for tl, ex in zip(t_logits, examples, strict=True):
                acc.add(tl, logits(draft, ex.input_ids), torch.tensor([ex.labels]))
            out[name] = {k: round(v, 6) for k, v in acc.result().as_metrics().items()}
    return out


# ------------------------------------------------------------------------------------------------- measure


@register
class SpecdecBench(Stage):
    """soaes-specdec's benchmark of the trained target with the distilled draft (every n and mode, plain in both
    dtypes, prompt lookup) and with the undistilled draft (greedy, n=3), plus a token-exactness check."""

    name = "specdec_bench"
    weight = 2.0

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [_target_input(recipe), Input("drafts", "distill_draft", "distill_draft", None),
                Input("prompts", "teacher_data", "teacher_data", None, "heldout_prompts.jsonl")]

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, **placement_extra(recipe, self.name, dtype=False)}  # dtype: the section's own

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        import json

        from soaes_specdec.bench import BenchConfig, run_benchmark

        r, s = ctx.recipe, ctx.recipe.specdec_bench
        target, drafts_dir, prompts = (ctx.spec(i) for i in self.inputs(r))
        drafts = json.loads((Path(drafts_dir) / "drafts.json").read_text(encoding="utf-8"))

        def draft_path(key: str) -> str:
            d = str(drafts[key]["dir"])
            return d if is_model_spec(d) or os.path.isabs(d) else str(Path(drafts_dir) / d)

        common = {"target": target, "prompts": prompts, "max_prompts": s.max_prompts,
                  "max_new_tokens": s.max_new_tokens, "repeats": s.repeats, "warmup": s.warmup, "dtype": s.dtype,
                  "reference_dtype": s.reference_dtype, "seed": r.seed, "sampling_seeds": s.sampling_seeds,
                  "prepack": s.prepack}
        counts: dict[str, Any] = {}
        lookup = {"lookup_tokens": s.lookup_tokens, "lookup_min_ngram": s.lookup_min_ngram,
                  "lookup_extend": s.lookup_extend, "lookup_mix": s.lookup_mix} if s.lookup_tokens else {}
        jobs = [("distilled", BenchConfig(draft=draft_path("distilled"), modes=list(s.modes),
                                          num_speculative_tokens=list(s.num_speculative_tokens),
                                          methods=["plain", "prompt_lookup", "speculative"]
                                          + (["speculative_lookup"] if lookup else []), **lookup, **common)),
                ("undistilled", BenchConfig(draft=draft_path("undistilled"), modes=["greedy"],
                                            num_speculative_tokens=[3], methods=["plain", "speculative"], **common))]
        jobs += [(key, BenchConfig(draft=draft_path(key), modes=["greedy"], num_speculative_tokens=[3],
                                   methods=["plain", "speculative"], **common))
                 for key in drafts if key.startswith("sweep/")]
        for key, cfg in jobs:
            report = run_benchmark(cfg, out / key)
            counts[key] = {"prompts": report["num_prompts"], "results": len(report["results"])}
            ctx.fail_point(self.name, f"after_{key.replace('/', '_')}")
        counts["exactness"] = _exactness(target, draft_path("distilled"), prompts, s, out / "exactness.json",
                                         placed(r, self.name))
        return counts


def _exactness(target_spec: str, draft_spec: str, prompts: str, s: Any, path: Path,
               placement: ResolvedPlacement) -> dict[str, Any]:
    """Greedy speculative output == plain greedy output, token for token, in fp32 (and in the bench dtype), on the
    placement's device."""
    import torch

    from soaes_core import atomic_write_json, load_model, load_tokenizer
    from soaes_specdec import SpeculativeDecoder, autoregressive_generate
    from soaes_specdec.bench import load_prompts
    from soaes_specdec.draft import load_any_draft

    tok = load_tokenizer(target_spec)
    ids = load_prompts(prompts, tok, s.exactness_prompts)
    result: dict[str, Any] = {"prompts": len(ids), "max_new_tokens": s.max_new_tokens, "n": 3}
    for dtype in dict.fromkeys(["float32", s.dtype]):
        target = load_model(target_spec, **{**placement.load_kwargs(), "dtype": dtype}).eval()
        draft = load_any_draft(draft_spec, dtype=dtype, device=placement.device)
        dec = SpeculativeDecoder(target, draft, num_speculative_tokens=3)
        same = 0
        for p in ids:
            p = (p.unsqueeze(0) if p.dim() == 1 else p).to(input_device(target))
            kw = {"max_new_tokens": s.max_new_tokens, "eos_token_id": tok.eos_token_id}
            plain = autoregressive_generate(target, p, **kw).sequences
            same += int(torch.equal(plain, dec.generate(p, **kw).sequences))
        result[dtype] = {"identical": same, "exact": same == len(ids)}
    result["exact"] = result["float32"]["exact"]
    atomic_write_json(path, result)
    return {"prompts": len(ids), "exact_fp32": result["exact"]}


@register
class Export(Stage):
    """The serving hand-off (soaes-specdec `export_for_vllm`): `serve/draft/`, the distilled draft as a full-head HF
    directory with the target's tokenizer, and `serve/vllm_serve.sh` + `serve/README.md` with the exact
    `vllm serve TARGET --speculative-config ...` command for the trained target (absolute paths of this run), and
    `serve/soaes_serve.sh` (`soaes serve`). An engine-layout feature draft is also exported as vLLM's and SGLang's
    EAGLE drafts (`serve/vllm-eagle/`, `serve/sglang-eagle/`, each with its README and serve command)."""

    name = "export"
    SOAES_SERVE_SCRIPT: ClassVar[str] = "soaes_serve.sh"
    weight = 0.5

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [_target_input(recipe), Input("drafts", "distill_draft", "distill_draft", None),
                Input("bench", "specdec_bench", "specdec_bench", None, "distilled/bench.json", required=False)]

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_core.atomic import atomic_write_text
        from soaes_core.errors import ConfigError
        from soaes_specdec.eagle_export import export_eagle
        from soaes_specdec.export import best_num_speculative_tokens, export_for_vllm
        from soaes_specdec.feature_draft import feature_draft_layout

        from ..serve import serve_command

        r, s = ctx.recipe, ctx.recipe.export
        target_in, drafts_in, bench_in = self.inputs(r)
        drafts_dir = ctx.path(drafts_in)
        drafts = json.loads((drafts_dir / "drafts.json").read_text(encoding="utf-8"))
        if s.draft not in drafts:
            raise ConfigError(f"{r.source}: export.draft: no draft {s.draft!r} in {drafts_dir / 'drafts.json'} "
                              f"(drafts: {', '.join(drafts)})")
        d = str(drafts[s.draft]["dir"])
        draft = d if is_model_spec(d) or os.path.isabs(d) else str(drafts_dir / d)
        n, n_from = s.num_speculative_tokens, "export.num_speculative_tokens"
        bench = ctx.resolve(bench_in)
        if n is None and bench is not None and Path(bench).is_file():
            n, n_from = best_num_speculative_tokens(json.loads(Path(bench).read_text(encoding="utf-8"))), "bench"
        if n is None:
            n, n_from = r.specdec_bench.num_speculative_tokens[0], "specdec_bench.num_speculative_tokens[0]"
        served = ctx.stage_dir(self.name).resolve() / "serve"
        res = export_for_vllm(draft, out / "serve", ctx.spec(target_in), n, final_dir=served)
        soaes_serve = serve_command(str(res.target_dir), str(res.draft_dir), num_speculative_tokens=n,
                                    lookup_tokens=r.specdec_bench.lookup_tokens)
        script = f"#!/usr/bin/env bash\nset -euo pipefail\n{soaes_serve}\n"
        atomic_write_text(out / "serve" / self.SOAES_SERVE_SCRIPT, script)
        engines = {}
        if feature_draft_layout(draft) == "engine":  # vLLM and SGLang load only the engine layout as EAGLE
            for fmt in ("vllm-eagle", "sglang-eagle"):
                engines[fmt] = export_eagle(draft, out / "serve" / fmt, ctx.spec(target_in), fmt, n,
                                            final_dir=served / fmt).serve_command()
        return {"draft": s.draft, "kind": res.kind, "num_speculative_tokens": n, "n_from": n_from,
                "target": str(res.target_dir), "restricted_head_tokens": res.restricted_head_tokens,
                "vllm_serve": res.serve_command(), "soaes_serve": soaes_serve, "engines": engines}


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
            entry: dict[str, Any] = {"label": label, "stage": row, "model": model, "kind": "target"}
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
            cfg = EvalRunConfig(tasks=tasks, model=entry["model"], output_dir=str(folder), data_dir=data_dir,
                                limit=s.limit, max_gen_toks=s.max_gen_toks, batch_size=s.batch_size,
                                apply_chat_template=chat, name=label, stage=entry["stage"], seed=r.seed,
                                cache=str(out / ".cache" / f"{label}-{kind}"), device=where.device,
                                dtype=where.dtype)
            run_eval(cfg)
            entry[kind] = f"{label}/{kind}"
            ctx.fail_point(self.name, f"after_{label}_{kind}")
        return entry


@register
class Report(Stage):
    """report.md, CSV and PNG tables shaped like the paper's, from the run's manifests (soaes-eval paper_tables)."""

    name = "report"

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [Input(n, n, "stages", None, required=False) for n in recipe.stages if n != "report"]

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_eval.paper_tables import write_run_report

        written = write_run_report(ctx.run_dir, out, recipe_name=ctx.recipe.name, final_dir=ctx.stage_dir(self.name))
        return {"tables": written["tables"], "files": len(written["files"])}
