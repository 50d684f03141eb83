"""TrainConfig: every TrainingArguments field settable from a recipe with no per-field code; errors name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import transformers
import yaml

from soaes_core import to_dict
from soaes_core.config import from_dict, load_config
from soaes_core.errors import ConfigError
from soaes_train import config as train_config
from soaes_train.config import RUN_OWNED_ARGS, StageConfig, TrainConfig, training_arguments_fields
from soaes_train.trainer import build_training_arguments


def test_every_training_argument_is_a_field_or_set_by_the_run() -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(transformers.TrainingArguments):
        if f.init:
            assert (f.name in names) != (f.name in RUN_OWNED_ARGS), f.name
    help_text = {f.name: f.metadata.get("help") for f in dataclasses.fields(TrainConfig)}
    assert help_text["label_smoothing_factor"] and help_text["learning_rate"]


def test_recipe_values_reach_training_arguments(tmp_path: Path) -> None:
    p = tmp_path / "stage.yaml"
    p.write_text(yaml.safe_dump({"name": "s", "kind": "sft", "train": {
        "max_steps": 4, "save_steps": 2, "label_smoothing_factor": 0.1, "optim": "adamw_torch",
        "neftune_noise_alpha": 5, "report_to": ["tensorboard"], "learning_rate": 2e-5}}), encoding="utf-8")
    stage = load_config(p, StageConfig)
    args = build_training_arguments(stage.train, tmp_path / "out")
    assert (args.max_steps, args.save_steps, args.label_smoothing_factor, args.neftune_noise_alpha) == (4, 2, 0.1, 5)
    assert args.optim == "adamw_torch" and args.report_to == ["tensorboard"] and args.learning_rate == 2e-5
    assert args.adam_beta2 == 0.95 and args.per_device_train_batch_size == 1  # soaes defaults
    assert args.output_dir == str(tmp_path / "out") and args.remove_unused_columns is False  # set by the run
    assert set(training_arguments_fields(stage.train)) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_a_new_transformers_argument_needs_no_code_change() -> None:
    @dataclasses.dataclass
    class NewerTrainingArguments(transformers.TrainingArguments):
        brand_new_knob: int = dataclasses.field(default=7, metadata={"help": "Added by a future transformers."})

    fields = {name: spec for name, _, spec in train_config._training_argument_fields(NewerTrainingArguments)}
    assert fields["brand_new_knob"].default == 7
    assert fields["brand_new_knob"].metadata["help"] == "Added by a future transformers."
    assert not RUN_OWNED_ARGS & set(fields)


def test_unknown_and_run_owned_keys_name_file_and_field() -> None:
    with pytest.raises(ConfigError, match=r"^r.yaml: train.save_stepz: unknown key \(did you mean 'save_steps'\?\)"):
        from_dict(StageConfig, {"name": "s", "kind": "sft", "train": {"save_stepz": 1}}, source="r.yaml")
    with pytest.raises(ConfigError, match=r"^r.yaml: train.output_dir: unknown key"):
        from_dict(StageConfig, {"name": "s", "kind": "sft", "train": {"output_dir": "x"}}, source="r.yaml")
    with pytest.raises(ConfigError, match=r"^r.yaml: train.label_smoothing_factor: expected float, got str 'lots'"):
        from_dict(StageConfig, {"name": "s", "kind": "sft", "train": {"label_smoothing_factor": "lots"}},
                  source="r.yaml")


def test_transformers_cross_field_error_is_a_config_error(tmp_path: Path) -> None:
    train = TrainConfig(load_best_model_at_end=True, eval_strategy="no", save_strategy="steps")
    with pytest.raises(ConfigError, match=r"^train: "):
        build_training_arguments(train, tmp_path)


def test_dump_lists_only_chosen_training_arguments() -> None:
    """Manifests and stage fingerprints hold what a recipe chose, not every default of the installed transformers."""
    train = TrainConfig(max_steps=3, label_smoothing_factor=0.1)
    dumped = to_dict(train)
    assert dumped["max_steps"] == 3 and dumped["label_smoothing_factor"] == 0.1
    assert "fp16" not in dumped and "adam_beta2" not in dumped and dumped["learning_rate"] == 1e-5
    assert from_dict(TrainConfig, dumped) == train
