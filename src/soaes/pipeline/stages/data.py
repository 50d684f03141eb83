"""Data stages: curate (soaes-data curation), decontaminate (against eval sets) and pack (tokenised, packed windows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soaes_core import read_jsonl, write_jsonl
from soaes_core.errors import ConfigError, SoaesError

from ..recipe import (
    PipelineRecipe,
    package_config,
    resolve_path,
    target_spec,
)
from .base import (
    Input,
    Stage,
    StageContext,
    register,
)


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
        s = recipe.decontaminate
        paths = {f"decontaminate.eval_dirs[{i}]": d for i, d in enumerate(s.eval_dirs)}
        paths.update({f"decontaminate.eval_files[{i}]": f for i, f in enumerate(s.eval_files)})
        return {**paths, "pack.sft_stage1": recipe.pack.sft_stage1, "pack.sft_stage2": recipe.pack.sft_stage2}

    def external_files(self, ctx: StageContext) -> dict[str, Path]:
        r = ctx.recipe
        files = {"sft_stage1": resolve_path(r, r.pack.sft_stage1), "sft_stage2": resolve_path(r, r.pack.sft_stage2)}
        for i, d in enumerate(r.decontaminate.eval_dirs):
            for j, f in enumerate(sorted(resolve_path(r, d).rglob("*.csv"))):
                files[f"eval{i}.{j}"] = f
        files.update({f"eval_file{i}": resolve_path(r, f) for i, f in enumerate(r.decontaminate.eval_files)})
        return files

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_data.decontam import DecontamConfig, NgramIndex, decontaminate_records

        r, s = ctx.recipe, ctx.recipe.decontaminate
        index = NgramIndex.from_config(package_config(s, DecontamConfig, eval_dirs=[
            str(resolve_path(r, d)) for d in s.eval_dirs], eval_files=[str(resolve_path(r, f)) for f in s.eval_files]))
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


