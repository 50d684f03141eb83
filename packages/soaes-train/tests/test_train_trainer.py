"""One stage on the tiny Qwen2: outputs, resume after a kill gives the same loss curve, and a kill during a
checkpoint save leaves the previous checkpoint usable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from soaes_core import read_manifest, verify_outputs
from soaes_core.errors import SoaesError
from soaes_train.config import DataConfig, StageConfig, TrainConfig
from soaes_train.trainer import SoaesTrainer, last_complete_checkpoint, train_stage


def _stage(chat_jsonl: Path, **train) -> StageConfig:
    params = dict(learning_rate=2e-3, lr_scheduler="cosine_floor", min_lr=1e-4, warmup_ratio=0.1, max_steps=8,
                  per_device_train_batch_size=2, save_steps=3, logging_steps=1, save_total_limit=2)
    params.update(train)
    return StageConfig(name="sft", kind="sft", data=DataConfig(paths=[str(chat_jsonl)], max_length=96),
                       train=TrainConfig(**params))


class _Crash(RuntimeError):
    pass


def _curve(stage_dir: Path) -> list[float]:
    return json.loads((stage_dir / "model" / "loss_curve.json").read_text())["loss"]


def test_sft_stage_outputs_and_exact_resume_after_crash_during_save(tiny_model_copy: Path, chat_jsonl: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _stage(chat_jsonl)
    # uninterrupted reference run
    ref = train_stage(stage, str(tiny_model_copy), tmp_path / "ref")
    ref_curve = _curve(tmp_path / "ref")
    assert len(ref_curve) == 8 and ref_curve[-1] < ref_curve[0]
    assert ref.attn_implementation == "sdpa"
    model_dir = tmp_path / "ref" / "model"
    manifest = read_manifest(model_dir)
    assert manifest["parent_model"]["spec"] == str(tiny_model_copy)
    assert manifest["training"]["attn_implementation"] == "sdpa" and manifest["training"]["packed"] is True
    assert manifest["training"]["packing_logit_gap"] < 1e-5
    assert verify_outputs(model_dir) == []
    assert {"model.safetensors", "tokenizer.json", "loss_curve.json", "loss_curve.png"} <= {
        p.name for p in model_dir.iterdir()}

    # interrupted run: checkpoint-3 is saved, then the process "dies" half-way through saving checkpoint-6
    real = SoaesTrainer._save_rng_state

    def dying_save(self, output_dir):
        if self.state.global_step == 6:
            raise _Crash("killed during save")
        return real(self, output_dir)

    monkeypatch.setattr(SoaesTrainer, "_save_rng_state", dying_save)
    with pytest.raises(_Crash):
        train_stage(stage, str(tiny_model_copy), tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert not (ckpts / "checkpoint-6").exists()  # the half-written one never appears under its real name
    assert last_complete_checkpoint(ckpts) == ckpts / "checkpoint-3"
    assert not (tmp_path / "run" / "model").exists()
    monkeypatch.setattr(SoaesTrainer, "_save_rng_state", real)
    resumed = train_stage(stage, str(tiny_model_copy), tmp_path / "run")
    assert resumed.resumed_from == str(ckpts / "checkpoint-3")
    assert _curve(tmp_path / "run") == pytest.approx(ref_curve, rel=1e-5)
    # the trained model reloads and generates
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    out = model.generate(**tok("state asset", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 2


def test_killed_after_checkpoint_resumes_same_curve_padded(tiny_model_copy: Path, chat_jsonl: Path,
                                                           tmp_path: Path) -> None:
    """Padded SFT (no packing) with gradient accumulation: stop right after checkpoint-4, resume, same curve."""
    stage = _stage(chat_jsonl, max_steps=6, save_steps=4, gradient_accumulation_steps=2)
    stage.data.packing = False
    stage.train.report_to = ["tensorboard"]
    ref = _curve_of(train_stage(stage, str(tiny_model_copy), tmp_path / "ref").model_dir)
    assert list((tmp_path / "ref" / "tensorboard").rglob("events.out.tfevents.*"))

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                raise _Crash("killed")

    with pytest.raises(_Crash):
        train_stage(stage, str(tiny_model_copy), tmp_path / "run", callbacks=[KillAfterSave()])
    res = train_stage(stage, str(tiny_model_copy), tmp_path / "run")
    assert res.resumed_from and res.resumed_from.endswith("checkpoint-4")
    assert _curve_of(res.model_dir) == pytest.approx(ref, rel=1e-5)


def test_resume_at_every_checkpoint_boundary_is_bit_identical(tiny_model_copy: Path, chat_jsonl: Path,
                                                               tmp_path: Path) -> None:
    """Killed right after each checkpoint in turn (the first, a middle one, the final one) and rerun each time, the
    model, loss curve and recorded metrics equal an uninterrupted run's; from the final checkpoint the rerun trains
    nothing (transformers alone would run one step past max_steps)."""
    stage = _stage(chat_jsonl, max_steps=3, save_steps=1, save_total_limit=1, warmup_ratio=0.0, verify_packing=False)
    ref = train_stage(stage, str(tiny_model_copy), tmp_path / "ref")
    ref_training = read_manifest(ref.model_dir)["training"]
    assert ref.metrics["global_step"] == 3 and ref.metrics["epoch"] < 1  # the final checkpoint is mid-epoch
    assert ref_training["metrics"]["train_loss"] == pytest.approx(sum(_curve_of(ref.model_dir)) / 3, rel=1e-12)

    class KillAfterSave(TrainerCallback):
        def __init__(self, step: int) -> None:
            self.step, self.resumed_at = step, None

        def on_train_begin(self, args, state, control, **kw):
            self.resumed_at = state.global_step

        def on_save(self, args, state, control, **kw):
            if state.global_step == self.step:
                raise _Crash(f"killed after checkpoint-{self.step}")

    run = tmp_path / "run"
    for step in (1, 2, 3):
        kill = KillAfterSave(step)
        with pytest.raises(_Crash):
            train_stage(stage, str(tiny_model_copy), run, callbacks=[kill])
        assert kill.resumed_at == step - 1  # each rerun went on from the checkpoint the kill before it left
        assert last_complete_checkpoint(run / "checkpoints") == run / "checkpoints" / f"checkpoint-{step}"
    res = train_stage(stage, str(tiny_model_copy), run)
    assert res.resumed_from == str(run / "checkpoints" / "checkpoint-3") and res.metrics["global_step"] == 3
    assert _curve_of(res.model_dir) == _curve_of(ref.model_dir)
    assert (res.model_dir / "model.safetensors").read_bytes() == (ref.model_dir / "model.safetensors").read_bytes()
    training = read_manifest(res.model_dir)["training"]
    for key in ("global_step", "train_loss", "epoch", "total_flos"):
        assert training["metrics"][key] == ref_training["metrics"][key], key


def _curve_of(model_dir: Path) -> list[float]:
    return json.loads((model_dir / "loss_curve.json").read_text())["loss"]


def test_packing_self_check_refuses_leaky_attention(tiny_model_copy: Path, chat_jsonl: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(SoaesError, match="packed attention leaks across sequences with sdpa"):
        train_stage(_stage(chat_jsonl, max_steps=1), str(tiny_model_copy), tmp_path / "leak")
    assert torch.get_default_dtype() == torch.float32
