"""`soaes pipeline` recipes: each bad input is one line naming the recipe file and field; plan and slices."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from soaes.cli import main
from soaes.pipeline import load_pipeline_recipe, plan_pipeline, select_stages
from soaes.pipeline.recipe import RECIPES_DIR
from soaes_core.errors import ConfigError


def _recipe(tmp_path: Path, **fields: object) -> Path:
    data = {"name": "t", **fields}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _cli_error(*args: str) -> str:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_unknown_stage_names_file_and_field(tmp_path: Path) -> None:
    path = _recipe(tmp_path, stages=["curate", "pack", "cptt"])
    line = _cli_error("pipeline", "plan", str(path))
    assert str(path) in line and "stages[2]" in line and "'cptt'" in line and "did you mean 'cpt'" in line


def test_missing_data_path_names_file_and_field(tmp_path: Path) -> None:
    path = _recipe(tmp_path, stages=["curate", "pack"], pack={"sft_stage1": "missing/pool.jsonl"})
    line = _cli_error("pipeline", "run", str(path))
    assert str(path) in line and "pack.sft_stage1" in line and "missing/pool.jsonl" in line


def test_absent_input_stage_names_file_and_field(tmp_path: Path) -> None:
    path = _recipe(tmp_path, stages=["curate", "pack", "sft_stage1"])
    line = _cli_error("pipeline", "plan", str(path))
    assert str(path) in line and "'sft_stage1' needs the output of stage 'cpt'" in line
    assert "sft_stage1.model" in line


def test_input_stage_may_be_given_as_a_path(tmp_path: Path) -> None:
    model = tmp_path / "my-cpt-model"
    model.mkdir()
    path = _recipe(tmp_path, stages=["curate", "pack", "sft_stage1"], sft_stage1={"model": str(model)})
    recipe = load_pipeline_recipe(path)
    assert [p.name for p in plan_pipeline(recipe, tmp_path / "run")] == ["curate", "pack", "sft_stage1"]


def _tokenizer_dir(tmp_path: Path, name: str, extra_tokens: list[str], model_dir: Path) -> Path:
    """A draft-like folder: the embedded model's config and its tokenizer, with `extra_tokens` added."""
    from soaes_core import DEFAULT_MODEL, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL)
    if extra_tokens:
        tok.add_tokens(extra_tokens)
    out = tmp_path / name
    tok.save_pretrained(out)
    shutil.copy(model_dir / "config.json", out / "config.json")
    return out


@pytest.mark.slow
def test_draft_with_other_tokenizer_is_rejected(tmp_path: Path, embedded_model_dir: Path) -> None:
    stages = ["teacher_data", "dump_logits", "distill_draft"]
    other = _tokenizer_dir(tmp_path, "other", ["<domain_token_1>", "<domain_token_2>"], embedded_model_dir)
    path = _recipe(tmp_path, stages=stages, trained_target="embedded:smollm2-135m",
                   distill_draft={"draft": str(other)})
    line = _cli_error("pipeline", "plan", str(path))
    assert str(path) in line and "distill_draft.draft" in line and "tokenizer" in line
    same = _tokenizer_dir(tmp_path, "same", [], embedded_model_dir)  # identical ids (chat template not compared)
    path = _recipe(tmp_path, stages=stages, trained_target="embedded:smollm2-135m",
                   distill_draft={"draft": str(same)})
    assert load_pipeline_recipe(path).distill_draft.draft == str(same)


def test_bad_field_value_names_file_and_field(tmp_path: Path) -> None:
    path = _recipe(tmp_path, teacher_data={"holdout_every": 1})
    with pytest.raises(ConfigError, match=r"recipe\.yaml: teacher_data.*holdout_every must be >= 2"):
        load_pipeline_recipe(path)


def test_unknown_recipe_name_lists_shipped_ones() -> None:
    line = _cli_error("pipeline", "plan", "no-such-recipe")
    assert "no-such-recipe" in line and "demo" in line


def test_shipped_demo_recipe_loads_and_quick_shrinks_budgets() -> None:
    full, quick = load_pipeline_recipe("demo"), load_pipeline_recipe("demo", quick=True)
    assert Path(full.source) == RECIPES_DIR / "demo.yaml"
    assert full.stages == quick.stages and "distill_draft" in full.stages
    assert quick.cpt.train.max_steps < full.cpt.train.max_steps
    assert quick.distill_draft.kind == full.distill_draft.kind == "feature"
    assert quick.distill_draft.feature.steps < full.distill_draft.feature.steps
    assert quick.distill_draft.feature.time_budget_s == 0  # steps-bounded: a rerun gives the same numbers


def test_shipped_smollm2_domain_recipe_loads() -> None:
    r = load_pipeline_recipe("smollm2-domain")
    assert r.stages[0] == "teacher_data" and r.distill_draft.kind == "feature"
    assert r.teacher_data.heldout_prompts == "distill-data:heldout_domain_prompts.jsonl"


def test_plan_on_a_fresh_run_and_slices(tmp_path: Path) -> None:
    recipe = load_pipeline_recipe("demo", quick=True)
    plans = plan_pipeline(recipe, tmp_path / "run")
    assert [p.status for p in plans] == ["will run"] * len(recipe.stages)
    assert plans[0].reason == "no previous output"
    assert "input stage" in plans[2].reason
    sliced = plan_pipeline(recipe, tmp_path / "run", start="cpt", until="sft_stage2")
    selected = [p.name for p in sliced if p.status != "not selected"]
    assert selected == ["cpt", "sft_stage1", "sft_stage2"] == select_stages(recipe, "cpt", "sft_stage2")
    with pytest.raises(ConfigError, match="--from report comes after --until cpt"):
        select_stages(recipe, "report", "cpt")


def test_plan_cli_prints_every_stage(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["pipeline", "plan", "demo", "--quick", "-o", str(tmp_path / "run"),
                                    "--until", "pack"])
    assert res.exit_code == 0, res.output
    assert "01_curate" in res.output and "will run" in res.output and "not selected" in res.output


def test_running_a_slice_needs_its_input_stage(tmp_path: Path) -> None:
    line = _cli_error("pipeline", "run", "demo", "--quick", "-o", str(tmp_path / "run"), "--from", "cpt",
                      "--until", "cpt")
    assert "'cpt' needs the output of stage 'pack'" in line and "--from pack" in line
