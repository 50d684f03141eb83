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
from soaes_core.testing.cli import one_error_line


def _recipe(tmp_path: Path, **fields: object) -> Path:
    data = {"name": "t", **fields}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _cli_error(*args: str) -> str:
    return one_error_line(main, *args)


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


@pytest.mark.parametrize(("override", "where", "what"), [
    ("threads=-1", "threads", "must be >= 1"),
    ("specdec_bench.num_speculative_tokens=[0]", "specdec_bench", "num_speculative_tokens"),
    ("specdec_bench.max_new_tokens=0", "specdec_bench", "max_new_tokens"),  # soaes-specdec BenchConfig's check
    ("eval.limit=-1", "eval", "limit must be >= 1"),
    ("specdec_bench.dtype=float99", "specdec_bench", "dtype must be one of float32, bfloat16, float16"),
    ("specdec_bench.reference_dtype=half99", "specdec_bench", "reference_dtype must be one of"),
    ("eval.general_tasks=[soaes_nosuch]", "eval.general_tasks[0]", "unknown task 'soaes_nosuch'"),
    ("eval.domain_task=soaes_domain_qaa", "eval.domain_task", "did you mean 'soaes_domain_qa'"),
    ("export.draft=nosuch", "export.draft", "no draft 'nosuch'; distill_draft makes: undistilled, distilled"),
    ("pack.max_length=-1", "pack", "max_length must be >= 2"),
    ("teacher_data.max_new_tokens=0", "teacher_data", "max_new_tokens must be >= 1"),
    ("cpt.max_length=1", "cpt", "max_length must be >= 2"),
    ("dump_logits.top_k=0", "dump_logits", "top_k must be >= 1"),
    ("distill_draft.sweep=[{alpha: 2, temperature: 1}]", "distill_draft.sweep[0]", "0 <= alpha <= 1"),
    ("stages=[pack,curate]", "stages[0]", "'pack' reads the output of stage 'curate', which is listed after it"),
    ("stages=[curate,pack,sft_stage1,cpt]", "stages[2]", "'sft_stage1' reads the output of stage 'cpt'"),
    ("stages=[]", "stages", "no stages"),
    ("target=no/such/model", "target", "no such model file or directory"),
])
@pytest.mark.parametrize("command", ["plan", "run"])
def test_every_bad_value_is_one_line_before_any_work(tmp_path: Path, override: str, where: str, what: str,
                                                     command: str) -> None:
    """plan and run share one validation of the whole recipe: each bad value is one line naming the recipe file
    and the field, and a run refused for it creates nothing."""
    path = _recipe(tmp_path, stages=["curate", "pack"])
    run = tmp_path / "run"
    line = _cli_error("pipeline", command, str(path), "-o", str(run), "--set", override)
    assert line.startswith(f"error: {path}: {where}: ") and what in line, line
    assert not run.exists()


def test_relative_target_resolves_against_the_recipe_folder(tmp_path: Path, tiny_qwen2_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from soaes.pipeline.recipe import target_spec

    folder = tmp_path / "recipes"
    folder.mkdir()
    shutil.copytree(tiny_qwen2_dir, folder / "models" / "tiny")
    path = _recipe(folder, target="models/tiny", stages=["curate", "pack", "cpt"])
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    recipe = load_pipeline_recipe(path)
    assert target_spec(recipe) == str(folder / "models" / "tiny")
    cpt = {p.name: p for p in plan_pipeline(recipe, tmp_path / "run")}["cpt"]
    assert cpt.fingerprint["inputs"]["model"]["path"] == str(folder / "models" / "tiny")
    assert cpt.fingerprint["inputs"]["model"]["sha256"].startswith("tree:")
