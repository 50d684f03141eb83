"""`soaes-distill train RECIPE.yaml`: KD of a draft from stored logits (offline) or a live teacher (online), or
black-box SFT on the teacher's answers as token data (kd.alpha = 0, no teacher and no logit store).

The recipe reuses soaes-train's `TrainConfig` (optimiser, schedules, precision; defaults here are the domain-draft
paper's offline KD / SFT settings) and `DeepSpeedConfig`, and adds the teacher source and the `KDConfig`. Runs
train to a number of steps or epochs; `time_budget_s` is only a safety cap, and the manifest says when it ended a
run (`stopped_by`). Output: `model/` (save_pretrained + tokenizer), `kd_history.jsonl`, `loss_curve.{json,png}`,
`metrics.json` and `manifest.json`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback

from soaes_core import (
    atomic_write_json,
    load_model,
    load_tokenizer,
    seed_everything,
    tokenizer_fingerprint,
    write_jsonl,
    write_manifest,
)
from soaes_core.errors import ConfigError
from soaes_core.placement import Placement
from soaes_train.checkpoints import resumable_checkpoint
from soaes_train.config import DeepSpeedConfig, TrainConfig
from soaes_train.deepspeed_setup import prepare_deepspeed
from soaes_train.outputs import loss_curve, write_loss_curve
from soaes_train.trainer import ProgressCallback, bf16_supported, build_training_arguments, reset_deepspeed_globals

from .budget import StopInfo, TimeBudgetCallback, stop_info
from .draft_init import HEAD_IDS_FILE, freeze_embeddings
from .store import TeacherLogitStore
from .token_data import dataset_sha256, load_token_examples
from .trainer import KDCollator, KDConfig, KDDataset, KDTrainer

PAPER = "the domain-draft paper's offline KD and SFT setting"
DraftTrainConfig = make_dataclass("DraftTrainConfig", [
    ("learning_rate", float, field(default=2e-5, metadata={"help": f"Peak learning rate (2e-5: {PAPER})."})),
    ("num_train_epochs", float, field(default=3.0, metadata={
        "help": f"Epochs over train_data when max_steps is -1 (3: {PAPER})."})),
    ("per_device_train_batch_size", int, field(default=8, metadata={
        "help": f"Examples per device and step (8: {PAPER})."})),
], bases=(TrainConfig,), namespace={"__module__": __name__})
DraftTrainConfig.__doc__ = """`TrainConfig` with the domain-draft paper's offline KD / SFT defaults (batch 8, 3
epochs, lr 2e-5); the SOAEs paper's 7B draft used lr 3.5e-6 at batch 8: a recipe sets that where it reproduces it."""


@dataclass
class DistillRecipe:
    """A KD run: `student` (draft spec/dir), `train_data` (tokenized JSONL/Parquet), one of `teacher` (online) or
    `teacher_logits` (a dump directory), or neither with kd.alpha = 0 (black-box SFT), and where to write."""

    student: str = field(metadata={"help": "Draft to train: a model spec or directory (e.g. from make-draft)."})
    train_data: str = field(metadata={"help": "Tokenized JSONL/Parquet (input_ids [, labels, position_ids, id])."})
    output_dir: str = field(metadata={"help": "Where model/, kd_history.jsonl, metrics and the manifest go."})
    teacher: str | None = field(default=None, metadata={
        "help": "Online KD: the teacher model spec (with teacher_logits also unset: black-box SFT, kd.alpha 0)."})
    teacher_logits: str | None = field(default=None, metadata={
        "help": "Offline KD: a `soaes-distill dump` store of the teacher's logits on train_data."})
    eval_data: str | None = field(default=None, metadata={
        "help": "Held-out tokenized data (online KD or black-box SFT; offline KD evaluates on stored logits only)."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (needs eval_data)."})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop after N evaluations without improvement (needs eval_data and eval_steps)."})
    early_stopping_metric: str = field(default="acceptance_top_p", metadata={
        "help": "Evaluation metric early stopping and the best checkpoint follow (higher is better)."})
    train_embeddings: bool = field(default=True, metadata={
        "help": "false: freeze the (tied) embeddings/head and train the decoder layers only."})
    time_budget_s: float = field(default=0.0, metadata={
        "help": "Safety cap on training seconds (0 = none). Runs train to train.max_steps (or epochs); when the "
                "cap ends a run early the manifest says stopped_by: time_budget."})
    device: str = field(default="auto", metadata={
        "help": "Device of an online teacher: auto (cuda when present, else cpu), cpu, cuda or cuda:N (the "
                "student goes where the trainer puts it)."})
    kd: KDConfig = field(default_factory=KDConfig)
    train: DraftTrainConfig = field(default_factory=DraftTrainConfig)  # type: ignore[valid-type]
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        if self.teacher is not None and self.teacher_logits is not None:
            raise ValueError("set exactly one of teacher (online KD) or teacher_logits (offline KD), not both")
        if self.teacher is None and self.teacher_logits is None and self.kd.alpha != 0:
            raise ValueError(f"kd.alpha={self.kd.alpha} needs a teacher (online KD) or teacher_logits (offline KD); "
                             "black-box SFT on token data alone needs kd.alpha: 0")
        if self.time_budget_s < 0:
            raise ValueError(f"time_budget_s must be >= 0, got {self.time_budget_s}")
        Placement(device=self.device)  # one ConfigError (a ValueError) for a bad device
        if self.early_stopping_patience is not None and (self.eval_data is None or self.eval_steps is None):
            raise ValueError("early_stopping_patience needs eval_data and eval_steps")


@dataclass
class DistillResult:
    """Where the trained draft went, its evaluation metrics, the loss history, and why training stopped."""

    model_dir: Path
    metrics: dict[str, float]
    kd_history: list[dict[str, float]]
    train_seconds: float
    stop: StopInfo | None = None


def _last_checkpoint(path: Path) -> str | None:
    """The newest complete checkpoint under `path` that KDTrainer wrote, verified against its manifest (resuming
    unpickles it), to resume a killed run (None: start fresh)."""
    ckpt = resumable_checkpoint(path)
    return str(ckpt) if ckpt is not None else None


def run_distill(recipe: DistillRecipe, student_model: Any = None, teacher_model: Any = None,
                store: TeacherLogitStore | None = None) -> DistillResult:
    """Train the draft as `recipe` says; already-loaded models/stores may be passed to skip loading.

    With `deepspeed.enabled` the run initialises the process group (gloo on CPU, nccl on CUDA; a launcher's
    RANK/WORLD_SIZE are honoured), builds the ZeRO config before the student is loaded (so ZeRO-3 partitions
    it at load time) and clears DeepSpeed's process-wide state afterwards.
    """
    try:
        return _run_distill(recipe, student_model, teacher_model, store)
    finally:
        if recipe.deepspeed.enabled:
            reset_deepspeed_globals()


def _run_distill(recipe: DistillRecipe, student_model: Any, teacher_model: Any,
                 store: TeacherLogitStore | None) -> DistillResult:
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(recipe.train.seed)
    tokenizer = load_tokenizer(recipe.student)
    bf16 = bf16_supported() if recipe.train.bf16 is None else recipe.train.bf16
    ds = prepare_deepspeed(recipe.deepspeed, recipe.train, bf16) if recipe.deepspeed.enabled else None
    train_examples = load_token_examples(recipe.train_data)
    eval_examples = load_token_examples(recipe.eval_data) if recipe.eval_data else None
    if recipe.teacher_logits is not None:
        store = store or TeacherLogitStore(recipe.teacher_logits)
        store.require(tokenizer_sha256=tokenizer_fingerprint(tokenizer, ids_only=True),
                      dataset_sha256=dataset_sha256(recipe.train_data), temperature=recipe.kd.temperature)
        if eval_examples is not None:
            raise ConfigError("offline KD evaluates against stored logits of train_data only; "
                              "drop eval_data or use an online teacher for evaluation")
    elif teacher_model is None and recipe.teacher is not None:
        teacher_model = load_model(recipe.teacher, dtype=torch.float32,
                                   device=Placement(device=recipe.device).resolve().device)
    overrides: dict[str, Any] = {}
    if eval_examples is not None and recipe.eval_steps:
        overrides.update(eval_strategy="steps", eval_steps=recipe.eval_steps)
        if recipe.early_stopping_patience is not None:
            overrides.update(metric_for_best_model=recipe.early_stopping_metric, greater_is_better=True,
                             save_strategy="steps", save_steps=recipe.eval_steps, load_best_model_at_end=True)
    # TrainingArguments first: with a ZeRO-3 config alive, from_pretrained partitions the student (zero.Init)
    args = build_training_arguments(recipe.train, out / "checkpoints", ds, **overrides)
    if student_model is None:
        student_model = load_model(recipe.student, dtype=torch.float32)
    budget = TimeBudgetCallback(recipe.time_budget_s)
    callbacks: list[Any] = [ProgressCallback("distill draft"), budget]
    if recipe.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.early_stopping_patience))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if not recipe.train_embeddings:
        freeze_embeddings(student_model)
    trainer = KDTrainer(model=student_model, args=args, train_dataset=KDDataset(train_examples),
                        eval_dataset=KDDataset(eval_examples) if eval_examples else None,
                        data_collator=KDCollator(pad_token_id=pad), kd=recipe.kd, teacher_model=teacher_model,
                        teacher_store=store, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=_last_checkpoint(out / "checkpoints"))
    seconds = time.perf_counter() - start
    stop = _stop_reason(recipe, trainer.state, budget, seconds)
    metrics = trainer.evaluate() if eval_examples is not None else {}
    model_dir = out / "model"
    trainer.save_model(str(model_dir))
    tokenizer.save_pretrained(model_dir)
    head_ids = Path(recipe.student) / HEAD_IDS_FILE
    if head_ids.is_file():
        (model_dir / HEAD_IDS_FILE).write_bytes(head_ids.read_bytes())
    write_jsonl(out / "kd_history.jsonl", trainer.kd_history)
    write_loss_curve(out, loss_curve(trainer.state.log_history), "KD of the draft")
    atomic_write_json(out / "metrics.json", metrics)
    inputs = {"train_data": recipe.train_data}
    if recipe.teacher_logits:
        inputs["teacher_logits"] = recipe.teacher_logits
    method = "offline_kd" if recipe.teacher_logits else "online_kd" if recipe.teacher else "blackbox_sft"
    write_manifest(out, "distill.train", inputs=inputs, config=recipe,
                   counts={"train_examples": len(train_examples), "steps": trainer.state.global_step},
                   timings={"train": seconds}, extra={"metrics": metrics, "method": method, **stop.as_dict()})
    return DistillResult(model_dir, metrics, trainer.kd_history, seconds, stop)


def _stop_reason(recipe: DistillRecipe, state: Any, budget: TimeBudgetCallback, seconds: float) -> StopInfo:
    """Why the trainer stopped: the time cap, early stopping (fewer steps than planned), or the plan itself."""
    planned = int(state.max_steps) if state.max_steps and state.max_steps > 0 else None
    if budget.hit:
        reason = "time_budget"
    elif planned is not None and state.global_step < planned:
        reason = "early_stopping"
    else:
        reason = "max_steps" if recipe.train.max_steps > 0 else "epochs"
    return stop_info(reason, int(state.global_step), planned, seconds, recipe.time_budget_s)
