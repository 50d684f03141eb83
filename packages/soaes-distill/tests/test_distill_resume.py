"""Resuming KD training (issue 15, defect 10): KDTrainer seals each checkpoint with soaes-train's manifest and
`train` resumes only from a checkpoint that still matches it (resuming unpickles it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainingArguments

from soaes_core import load_model
from soaes_core.errors import IntegrityError
from soaes_core.testing import make_tiny_qwen2
from soaes_distill.recipe import _last_checkpoint
from soaes_distill.token_data import load_token_examples
from soaes_distill.trainer import KDCollator, KDConfig, KDDataset, KDTrainer
from soaes_train.checkpoints import COMPLETE_MARKER, checkpoint_problem


def test_kd_checkpoints_are_sealed_and_a_changed_one_is_refused(tmp_path: Path, token_dataset: Path,
                                                                tiny_qwen2) -> None:
    student = load_model(make_tiny_qwen2(tmp_path / "student", seed=1, num_hidden_layers=1), dtype=torch.float32,
                         device="cpu")
    out = tmp_path / "checkpoints"
    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                             save_strategy="steps", save_steps=1, save_total_limit=2, report_to=[],
                             remove_unused_columns=False, seed=0, use_cpu=True, disable_tqdm=True)
    KDTrainer(model=student, args=args, train_dataset=KDDataset(load_token_examples(token_dataset)),
              data_collator=KDCollator(pad_token_id=0), kd=KDConfig(alpha=0.5, temperature=2.0),
              teacher_model=tiny_qwen2).train()
    for step in (1, 2):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / COMPLETE_MARKER).is_file() and checkpoint_problem(ckpt) is None
    assert _last_checkpoint(out) == str(out / "checkpoint-2")
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    optimizer.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"refusing to resume from .*checkpoint-2: optimizer.pt checksum"):
        _last_checkpoint(out)
    assert _last_checkpoint(tmp_path / "none") is None


def test_kd_resume_from_the_final_checkpoint_trains_no_extra_step(tmp_path: Path, token_dataset: Path,
                                                                  tiny_qwen2) -> None:
    """A KD run killed right after its final checkpoint resumes to the same weights and global_step, not one more
    optimiser step (transformers checks max_steps only after a step)."""
    examples = load_token_examples(token_dataset)

    def run(out: Path, resume: str | None = None) -> tuple[Any, int]:
        student = load_model(make_tiny_qwen2(tmp_path / "student", seed=1, num_hidden_layers=1),
                             dtype=torch.float32, device="cpu")
        args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-3, lr_scheduler_type="constant", save_strategy="steps",
                                 save_steps=1, report_to=[], remove_unused_columns=False, seed=0, use_cpu=True,
                                 disable_tqdm=True)
        trainer = KDTrainer(model=student, args=args, train_dataset=KDDataset(examples),
                            data_collator=KDCollator(pad_token_id=0), kd=KDConfig(alpha=0.5, temperature=2.0),
                            teacher_model=tiny_qwen2)
        trainer.train(resume_from_checkpoint=resume)
        return trainer.model, trainer.state.global_step

    assert len(examples) > 4  # max_steps falls mid-epoch, where the extra step used to happen
    whole, steps = run(tmp_path / "whole")
    assert steps == 2
    resumed, steps = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert steps == 2
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
