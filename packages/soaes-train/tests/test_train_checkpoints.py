"""Checkpoint manifests (issue 15, defect 10): resume unpickles a checkpoint, so only an unchanged checkpoint
that soaes wrote is loaded; anything else is refused with one line, before a byte of it is unpickled."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from transformers import TrainerCallback

from soaes_core.errors import IntegrityError
from soaes_train.checkpoints import (
    COMPLETE_MARKER,
    checkpoint_problem,
    last_complete_checkpoint,
    resumable_checkpoint,
    write_checkpoint_manifest,
)
from soaes_train.config import DataConfig, DeepSpeedConfig, StageConfig, TrainConfig
from soaes_train.trainer import train_stage


def _fake_checkpoint(root: Path, step: int) -> Path:
    ckpt = root / f"checkpoint-{step}"
    (ckpt / "global_step3").mkdir(parents=True)
    (ckpt / "optimizer.pt").write_bytes(b"optimizer state")
    (ckpt / "global_step3" / "mp_rank_00_model_states.pt").write_bytes(b"shard")
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


def test_manifest_written_by_us_verifies(tmp_path: Path) -> None:
    ckpt = _fake_checkpoint(tmp_path, 3)
    write_checkpoint_manifest(ckpt, 3)
    manifest = json.loads((ckpt / COMPLETE_MARKER).read_text())
    assert manifest["global_step"] == 3
    assert set(manifest["files"]) == {"optimizer.pt", "global_step3/mp_rank_00_model_states.pt", "trainer_state.json"}
    assert checkpoint_problem(ckpt) is None
    assert resumable_checkpoint(tmp_path) == ckpt


@pytest.mark.parametrize(("tamper", "problem"), [
    (lambda c: (c / "optimizer.pt").write_bytes(b"optimizer statf"), "optimizer.pt checksum mismatch"),
    (lambda c: (c / "optimizer.pt").write_bytes(b"x"), "optimizer.pt changed size"),
    (lambda c: (c / "global_step3" / "mp_rank_00_model_states.pt").unlink(), "mp_rank_00_model_states.pt is missing"),
    (lambda c: (c / "global_step3" / "zero_pp_rank_0_optim_states.pt").write_bytes(b"?"),
     "zero_pp_rank_0_optim_states.pt is not in its manifest"),
    (lambda c: (c / COMPLETE_MARKER).write_text("3"), "not a soaes-checkpoint/1 manifest"),  # an old/foreign marker
    (lambda c: (c / COMPLETE_MARKER).write_text("{not json"), "not a soaes checkpoint manifest"),
])
def test_changed_foreign_or_unverifiable_checkpoint_is_refused(tmp_path: Path, tamper, problem: str) -> None:
    ckpt = _fake_checkpoint(tmp_path, 3)
    write_checkpoint_manifest(ckpt, 3)
    tamper(ckpt)
    assert problem in (checkpoint_problem(ckpt) or "")
    with pytest.raises(IntegrityError) as err:
        resumable_checkpoint(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"refusing to resume from {ckpt}: ") and problem in msg


def test_newest_marked_checkpoint_is_the_one_checked(tmp_path: Path) -> None:
    old = _fake_checkpoint(tmp_path, 3)
    write_checkpoint_manifest(old, 3)
    _fake_checkpoint(tmp_path, 6)  # a save that never finished: no marker, never loaded
    assert last_complete_checkpoint(tmp_path) == old and resumable_checkpoint(tmp_path) == old
    assert resumable_checkpoint(tmp_path / "missing") is None


class _Evil:
    """Unpickling this creates a file: what a swapped-in checkpoint could do with arbitrary code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class _StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        raise KeyboardInterrupt


@pytest.mark.parametrize("deepspeed", [False, True], ids=["trainer", "deepspeed"])
def test_train_stage_refuses_a_swapped_in_pickle_before_loading_it(deepspeed: bool, tiny_model_copy: Path,
                                                                   chat_jsonl: Path, tmp_path: Path) -> None:
    """DeepSpeed loads its shards with `weights_only=False`: a swapped-in shard would run its code on resume."""
    stage = StageConfig(name="sft", kind="sft", data=DataConfig(paths=[str(chat_jsonl)], max_length=96),
                        train=TrainConfig(max_steps=4, save_steps=2, per_device_train_batch_size=2, logging_steps=1),
                        deepspeed=DeepSpeedConfig(enabled=deepspeed, stage=2))
    with pytest.raises(KeyboardInterrupt):
        train_stage(stage, str(tiny_model_copy), tmp_path / "run", callbacks=[_StopAfterSave()])
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert checkpoint_problem(ckpt) is None  # the trainer wrote and sealed it
    pwned = tmp_path / "pwned"
    victim = ckpt / "global_step2" / "mp_rank_00_model_states.pt" if deepspeed else next(ckpt.glob("rng_state*.pth"))
    original = victim.read_bytes()
    victim.write_bytes(pickle.dumps(_Evil(str(pwned))))  # a file that is unpickled on resume
    refused = rf"refusing to resume from .*checkpoint-2: (.*/)?{victim.name} (checksum|changed size)"
    with pytest.raises(IntegrityError, match=refused):
        train_stage(stage, str(tiny_model_copy), tmp_path / "run")
    assert not pwned.exists()
    victim.write_bytes(original)  # the checkpoint as written resumes
    res = train_stage(stage, str(tiny_model_copy), tmp_path / "run")
    assert res.resumed_from == str(ckpt) and not pwned.exists()
