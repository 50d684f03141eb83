"""KDTrainer: offline KD from stored logits reproduces online-teacher KD step for step (tiny models)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from soaes_core import load_model, tokenizer_fingerprint
from soaes_core.errors import IntegrityError
from soaes_core.testing import make_tiny_qwen2
from soaes_distill.dump import DumpConfig, run_dump
from soaes_distill.store import TeacherLogitStore
from soaes_distill.token_data import dataset_sha256, load_token_examples
from soaes_distill.trainer import KDCollator, KDConfig, KDDataset, KDTrainer


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen2(tmp_path_factory.mktemp("student"), seed=1, num_hidden_layers=1)


def _train(out: Path, student_dir: Path, token_dataset: Path, **teacher) -> KDTrainer:
    student = load_model(student_dir, dtype=torch.float32, device="cpu")
    args = TrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                             lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                             remove_unused_columns=False, seed=0, use_cpu=True, disable_tqdm=True)
    trainer = KDTrainer(model=student, args=args, train_dataset=KDDataset(load_token_examples(token_dataset)),
                        data_collator=KDCollator(pad_token_id=0), kd=KDConfig(alpha=0.5, temperature=2.0),
                        **teacher)
    trainer.train()
    return trainer


def test_offline_kd_matches_online_kd(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer, student_dir) -> None:
    store_dir = tmp_path / "logits"
    run_dump(DumpConfig(dataset=str(token_dataset), output_dir=str(store_dir), top_k=0, dtype="float32",
                        temperatures=[2.0], examples_per_shard=6), model=tiny_qwen2, tokenizer=embedded_tokenizer)
    store = TeacherLogitStore(store_dir)
    online = _train(tmp_path / "on", student_dir, token_dataset, teacher_model=tiny_qwen2)
    offline = _train(tmp_path / "off", student_dir, token_dataset, teacher_store=store,
                     expected_tokenizer_sha256=tokenizer_fingerprint(embedded_tokenizer, ids_only=True),
                     expected_dataset_sha256=dataset_sha256(token_dataset))
    a = [h["loss"] for h in online.kd_history]
    b = [h["loss"] for h in offline.kd_history]
    assert len(a) == len(b) == 4
    assert a[-1] < a[0]  # it learns
    # dense fp32 store holds log-probs (logits up to a shift): equal up to float32 rounding
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    metrics = offline.evaluate(KDDataset(load_token_examples(token_dataset)))
    assert 0.0 <= metrics["eval_acceptance_top_p"] <= 1.0 and metrics["eval_accepted_length_greedy_n3"] >= 1.0
    with pytest.raises(IntegrityError, match="dataset_sha256"):
        _train(tmp_path / "bad", student_dir, token_dataset, teacher_store=store,
               expected_dataset_sha256="0" * 64)


def test_offline_kd_passes_tail_samples_through(tmp_path, token_dataset, tiny_qwen2, embedded_tokenizer,
                                                student_dir) -> None:
    store_dir = tmp_path / "tail"
    run_dump(DumpConfig(dataset=str(token_dataset), output_dir=str(store_dir), top_k=8, temperatures=[1.0, 2.0],
                        tail_samples=4, tail_temperature=1.0, examples_per_shard=6),
             model=tiny_qwen2, tokenizer=embedded_tokenizer)
    store = TeacherLogitStore(store_dir)
    trainer = _train(tmp_path / "t", student_dir, token_dataset, teacher_store=store)
    assert all(math.isfinite(h["loss"]) for h in trainer.kd_history) and len(trainer.kd_history) == 4
    batch = KDCollator()([KDDataset(load_token_examples(token_dataset))[i] for i in (0, 5)])
    got = trainer.teacher_logits(batch, torch.device("cpu"))
    want = store.lookup(batch["teacher_example_ids"], batch["teacher_positions"], temperature=2.0)
    assert got.num_tail_samples == 4 and got.tail_temperature == 1.0
    for name in ("values", "indices", "logsumexp", "tail_indices", "tail_values", "tail_logsumexp"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
