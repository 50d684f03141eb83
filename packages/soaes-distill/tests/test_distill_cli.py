"""The CLI end to end on tiny models: dump → train RECIPE.yaml, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from soaes_core.testing import make_tiny_qwen2
from soaes_distill.cli import main


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen2(tmp_path_factory.mktemp("cli-student"), seed=2, num_hidden_layers=1)


def _recipe(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields), encoding="utf-8")
    return path


def test_dump_then_train(tmp_path, token_dataset, tiny_qwen2_dir, student_dir, monkeypatch) -> None:
    monkeypatch.setenv("SOAES_PROGRESS", "0")
    runner = CliRunner()
    store = tmp_path / "logits"
    res = runner.invoke(main, ["dump", "--model", str(tiny_qwen2_dir), "--dataset", str(token_dataset), "--out",
                               str(store), "--top-k", "16", "--temperature", "2.0", "--compression", "zstd"])
    assert res.exit_code == 0, res.output
    assert "bytes/token" in res.output and (store / "manifest.json").is_file()
    recipe = _recipe(tmp_path / "kd.yaml", student=str(student_dir), train_data=str(token_dataset),
                     teacher_logits=str(store), output_dir=str(tmp_path / "run"),
                     kd={"alpha": 0.5, "temperature": 2.0},
                     train={"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                            "save_steps": 1000, "bf16": False, "verify_packing": False})
    res = runner.invoke(main, ["train", str(recipe)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "kd_history.jsonl").read_text().count("\n") == 2
    # a wrong temperature is refused with one line naming it
    res = runner.invoke(main, ["train", str(recipe), "--set", "kd.temperature=3.0"])
    assert res.exit_code == 2 and "temperature 3.0 was not captured" in res.output
    # logits dumped from another dataset are refused
    other = tmp_path / "other.jsonl"
    other.write_text(token_dataset.read_text().replace('"id": 0,', '"id": 100,'))
    res = runner.invoke(main, ["train", str(recipe), "--set", f"train_data={other}"])
    assert res.exit_code == 2 and "dataset_sha256" in res.output


def test_dump_with_tail_samples(tmp_path, token_dataset, tiny_qwen2_dir, student_dir, monkeypatch) -> None:
    monkeypatch.setenv("SOAES_PROGRESS", "0")
    runner = CliRunner()
    store = tmp_path / "logits"
    args = ["dump", "--model", str(tiny_qwen2_dir), "--dataset", str(token_dataset), "--out", str(store),
            "--top-k", "8", "--temperature", "1.0,2.0", "--tail-samples", "8"]
    res = runner.invoke(main, [*args, "--tail-temperature", "3.0"])
    assert res.exit_code == 2 and "tail_temperature 3.0 must be one of" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, [*args, "--tail-temperature", "2.0"])
    assert res.exit_code == 0, res.output
    settings = json.loads((store / "store.json").read_text())["settings"]
    assert settings["tail_samples"] == 8 and settings["tail_temperature"] == 2.0
    recipe = _recipe(tmp_path / "kd.yaml", student=str(student_dir), train_data=str(token_dataset),
                     teacher_logits=str(store), output_dir=str(tmp_path / "run"),
                     kd={"alpha": 0.5, "temperature": 1.0},  # loss τ ≠ sampling τ_s
                     train={"max_steps": 1, "per_device_train_batch_size": 4, "save_steps": 1000, "bf16": False,
                            "verify_packing": False})
    res = runner.invoke(main, ["train", str(recipe)])
    assert res.exit_code == 0, res.output


def test_bad_recipe_values_are_one_line_errors(tmp_path, token_dataset, student_dir) -> None:
    runner = CliRunner()
    base = {"student": str(student_dir), "train_data": str(token_dataset), "output_dir": str(tmp_path / "r"),
            "teacher": str(student_dir)}
    res = runner.invoke(main, ["train", str(_recipe(tmp_path / "a.yaml", **base, kd={"alpha": 1.5}))])
    assert res.exit_code == 2 and "a.yaml: kd: alpha must be in [0, 1]" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["train", str(_recipe(tmp_path / "t.yaml", **base, kd={"temperature": 0}))])
    assert res.exit_code == 2 and "temperature" in res.output
    res = runner.invoke(main, ["train", str(_recipe(tmp_path / "b.yaml", **base, teacher_logits="x"))])
    assert res.exit_code == 2 and "exactly one of teacher" in res.output
    res = runner.invoke(main, ["dump", "--model", str(student_dir), "--dataset", str(token_dataset), "--out",
                               str(tmp_path / "d"), "--top-k", "1000000"])
    assert res.exit_code == 2 and "exceeds" in res.output


def test_estimate_command(token_dataset, tiny_qwen2_dir, student_dir) -> None:
    res = CliRunner().invoke(main, ["estimate", "--target", str(tiny_qwen2_dir), "--draft", str(tiny_qwen2_dir),
                                    "--data", str(token_dataset)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert metrics["acceptance_greedy"] == 1.0 and metrics["accepted_length_greedy_n3"] > 3.0


def test_negative_token_id_is_a_one_line_error(tmp_path, token_dataset, student_dir) -> None:
    """Issue 15: a negative id used to reach the embedding and end in an IndexError traceback."""
    rows = Path(token_dataset).read_text(encoding="utf-8").splitlines()
    bad = json.loads(rows[2])
    bad["input_ids"][3] = -5
    data = tmp_path / "neg.jsonl"
    data.write_text("\n".join([*rows[:2], json.dumps(bad), *rows[3:]]) + "\n", encoding="utf-8")
    res = CliRunner().invoke(main, ["dump", "--model", str(student_dir), "--dataset", str(data), "--out",
                                    str(tmp_path / "d")])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output
    assert f"{data}:3: field 'input_ids'" in lines[0] and "-5" in lines[0] and "negative" in lines[0]


def test_estimate_refuses_a_draft_with_another_tokenizer(tmp_path, token_dataset, tiny_qwen2_dir,
                                                         student_dir) -> None:
    """Issue 15: a same-size draft with another tokenizer was estimated as if it were compatible."""
    import shutil

    from soaes_specdec.testing import swap_tokenizer_ids

    draft = tmp_path / "foreign"
    shutil.copytree(student_dir, draft)
    swap_tokenizer_ids(draft)
    res = CliRunner().invoke(main, ["estimate", "--target", str(tiny_qwen2_dir), "--draft", str(draft),
                                    "--data", str(token_dataset)])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(draft) in errors[0] and str(tiny_qwen2_dir) in errors[0]


def test_every_option_comes_from_the_commands_config() -> None:
    """Each command's options are generated from its config dataclass (plus --config/--set), and the option names
    users typed before stay."""
    import dataclasses

    import click

    from soaes_distill.cli_configs import (
        BlackboxConfig,
        DomainQueriesJob,
        EstimateConfig,
        FeatureDraftJob,
        MagpieConfig,
    )
    from soaes_distill.draft_init import MakeDraftConfig
    from soaes_distill.dump import DumpConfig
    from soaes_distill.online import OnlineDistillRecipe
    from soaes_distill.recipe import DistillRecipe

    configs = {"dump": DumpConfig, "make-draft": MakeDraftConfig, "train": DistillRecipe,
               "online": OnlineDistillRecipe, "blackbox": BlackboxConfig, "magpie": MagpieConfig,
               "domain-queries": DomainQueriesJob, "estimate": EstimateConfig, "feature-draft": FeatureDraftJob}
    kept = {"dump": ["--model", "--dataset", "--out", "--top-k", "--temperature", "--tail-samples"],
            "make-draft": ["--target", "--out", "--layers", "--head-tokens", "--domain-data", "--small"],
            "blackbox": ["--target", "--prompts", "--out", "--max-new-tokens", "--system"],
            "magpie": ["--num", "--language", "--out", "--rejects", "--seed"],
            "domain-queries": ["--held-out", "--out", "--max-queries", "--num-terms"],
            "estimate": ["--target", "--draft", "--data", "--top-p"],
            "feature-draft": ["--target", "--train", "--dev", "--heldout", "--out", "--steps", "--time-budget-s"],
            "online": ["--draft", "--prompts", "--out", "--learning-rate", "--buffer-threshold"],
            "train": ["--set", "--time-budget-s"]}
    for name, cls in configs.items():
        command = main.commands[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        options = [p for p in command.params if isinstance(p, click.Option)]
        assert {p.name for p in options} - fields <= {"sets", "config_path"}, name
        declared = {d for p in options for d in p.opts + p.secondary_opts}
        assert set(kept[name]) <= declared, (name, set(kept[name]) - declared)
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0 and "(default:" in res.output, name
