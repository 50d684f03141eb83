"""Table 2's training variants beside the paper's own CPT → SFT-1 → SFT-2 chain, and Table 3's general draft.

Each variant is soaes-train's stage run (`TrainStage`) with another parent or other data: stage-1 or stage-2 SFT
straight from the base target, and CPT followed by one SFT stage on the two pools mixed (`sft_joint_data` writes
and packs the mixed pool). `general_draft` is the layer draft cut from the base target with no training: the
paper's general small model of the same family (Qwen2.5-7B-Instruct beside the 72B).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from soaes_core import read_jsonl, write_jsonl

from ..recipe import PipelineRecipe, target_spec
from .base import MODEL_DIR, Input, Stage, StageContext, placed, register
from .train import TrainStage

JOINT_DIR = "sft_joint"  # the packed mixed pool in sft_joint_data's folder


@register
class BaseSftStage1(TrainStage):
    """Table 2's "base + stage-1 SFT": the dialog pool's SFT straight from the base target."""

    name, kind, data_key, parent = "base_sft_stage1", "sft", "sft_stage1", None


@register
class BaseSftStage2(TrainStage):
    """Table 2's "base + stage-2 SFT" (and, the embedded base being an instruct model, "Instruct + stage-2 SFT")."""

    name, kind, data_key, parent = "base_sft_stage2", "sft", "sft_stage2", None


@register
class SftJointData(Stage):
    """The stage-1 and stage-2 SFT pools (decontaminated when that stage runs) as one mixed pool, packed with the
    target's tokenizer (soaes-data `pack_sft_file`)."""

    name = "sft_joint_data"

    def _pool(self, recipe: PipelineRecipe, key: str) -> Input:
        if "decontaminate" in recipe.stages:
            return Input(key, "decontaminate", f"pack.{key}", None, f"{key}.jsonl")
        return Input(key, None, f"pack.{key}", getattr(recipe.pack, key))

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [self._pool(recipe, "sft_stage1"), self._pool(recipe, "sft_stage2")]

    def data_paths(self, recipe: PipelineRecipe) -> dict[str, str | None]:
        return {"pack.sft_stage1": recipe.pack.sft_stage1, "pack.sft_stage2": recipe.pack.sft_stage2}

    def external_files(self, ctx: StageContext) -> dict[str, Path]:
        return {i.name: ctx.path(i) for i in self.inputs(ctx.recipe) if i.stage is None}

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"seed": recipe.seed, "target": recipe.target, "max_length": recipe.pack.max_length}

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_core import load_tokenizer
        from soaes_data.tokenize_pack import pack_sft_file

        from .data import _packed_rows

        r = ctx.recipe
        pools = [read_jsonl(ctx.path(i)) for i in self.inputs(r)]
        mixed = mix_pools(pools, r.seed if r.sft_joint_data.shuffle else None)
        write_jsonl(out / "joint.jsonl", mixed)
        target = target_spec(r)
        pack_sft_file(out / "joint.jsonl", out / JOINT_DIR, load_tokenizer(target), r.pack.max_length,
                      tokenizer_spec=target, on_error="skip")
        return {"conversations": {"sft_stage1": len(pools[0]), "sft_stage2": len(pools[1]), "joint": len(mixed)},
                "packed": _packed_rows(out / JOINT_DIR)}


def mix_pools(pools: list[list[dict[str, Any]]], seed: int | None) -> list[dict[str, Any]]:
    """The pools' records as one list: shuffled with `seed`, or in order when `seed` is None."""
    mixed = [rec for pool in pools for rec in pool]
    if seed is not None:
        random.Random(seed).shuffle(mixed)
    return mixed


@register
class SftJoint(TrainStage):
    """Table 2's "CPT + stage-1&2 joint SFT": one SFT stage after CPT on the mixed pool."""

    name, kind, data_key, parent = "sft_joint", "sft", JOINT_DIR, "cpt"

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        ins = super().inputs(recipe)
        ins[0] = Input("data", "sft_joint_data", "sft_joint.data", recipe.sft_joint.data, JOINT_DIR)
        return ins


@register
class GeneralDraft(Stage):
    """The layer draft cut from the base target (soaes-distill `make_draft`, `distill_draft.draft_layers`), never
    trained: Table 3's and Table 4's general undistilled draft."""

    name = "general_draft"
    weight = 0.2

    def inputs(self, recipe: PipelineRecipe) -> list[Input]:
        return [Input("base", None, "target", recipe.target)]

    def fingerprint_extra(self, recipe: PipelineRecipe) -> dict[str, Any]:
        return {"target": recipe.target, "draft_layers": recipe.distill_draft.draft_layers}

    def run(self, ctx: StageContext, out: Path) -> dict[str, Any]:
        from soaes_distill.draft_init import make_draft

        layers = ctx.recipe.distill_draft.draft_layers
        make_draft(target_spec(ctx.recipe), out / MODEL_DIR, num_layers=layers,
                   device=placed(ctx.recipe, self.name).device)
        return {"model": MODEL_DIR, "draft_layers": layers}
