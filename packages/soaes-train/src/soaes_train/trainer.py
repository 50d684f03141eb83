"""CPT and SFT training of one stage on `transformers.Trainer` (+ DeepSpeed), with exact packed attention,
atomic checkpoints, resume, and a `save_pretrained` output with manifest and loss curve.

`SoaesTrainer` overrides only what packing and crash-safety need; `train_stage` wires a `StageConfig` into
it. Other packages reuse the pieces: soaes-distill's `KDTrainer` (a `transformers.Trainer` subclass of its own)
takes its `TrainingArguments` from `build_training_arguments` and the checkpoint manifest from `checkpoints`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from soaes_core import Timer, load_tokenizer, seed_everything, write_manifest
from soaes_core.atomic import replace_dir
from soaes_core.errors import ConfigError, ModelLoadError, SoaesError
from soaes_core.progress import progress_bar, progress_enabled

from .attention import choose_attn_implementation, packed_layout_for, packed_logits_gap
from .checkpoints import COMPLETE_MARKER as COMPLETE_MARKER  # re-exported: part of this module's API before
from .checkpoints import last_complete_checkpoint as last_complete_checkpoint
from .checkpoints import resumable_checkpoint, write_checkpoint_manifest
from .collator import PackedCollator, PaddedCollator
from .config import StageConfig, TrainConfig, training_arguments_fields
from .data import PreparedData, RowDataset, data_inputs, prepare_data
from .deepspeed_setup import count_params, estimate_zero_memory, prepare_deepspeed
from .outputs import loss_curve, mean_logged_loss, write_loss_curve
from .recipes import resolve_training_model
from .schedules import hf_scheduler_args

log = logging.getLogger(__name__)

STAGING_DIR = ".staging"
MODEL_DIRNAME = "model"
CHECKPOINT_DIRNAME = "checkpoints"
# leftovers of a DeepSpeed engine checkpoint that do not belong in an exported model directory
_DS_LEFTOVERS = ("latest", "zero_to_fp32.py", "zero_to_torch.py", "training_args.bin")


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class FinishedResumeMixin:
    """`transformers.Trainer` mixin: resuming from the final checkpoint (global step ≥ max_steps) trains nothing.

    transformers checks `max_steps` only after an optimiser step, so a resumed epoch that is not yet exhausted
    would otherwise run one step past the end (a different model from an uninterrupted run).
    """

    state: Any
    control: Any

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)  # type: ignore[misc]


class SoaesTrainer(FinishedResumeMixin, Trainer):
    """`transformers.Trainer` with packed-attention safety and crash-safe checkpoints.

    * Forward passes run with `use_cache=False`: a KV cache makes transformers skip packed-sequence
      detection, so packed sequences would silently attend to each other.
    * A checkpoint is written into `<output_dir>/.staging/` and renamed into place only when complete, so a
      kill during a save leaves the previous checkpoint intact and `last_complete_checkpoint` never returns
      a half-written one. Old checkpoints are rotated only after the new one is in place.
    * The completion marker is a manifest of every file's sha256, checked before resuming (which unpickles).
    * Resuming from the final checkpoint trains nothing (`FinishedResumeMixin`).
    """

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = {**inputs, "use_cache": False}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = run_dir / STAGING_DIR
        if self.args.should_save:
            shutil.rmtree(staging_root / name, ignore_errors=True)
            staging_root.mkdir(parents=True, exist_ok=True)
        _barrier()
        # the parent writes (and rotates) inside the staging root, which only ever holds this checkpoint
        self._get_output_dir = lambda trial=None: str(staging_root)  # type: ignore[method-assign]
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        _barrier()
        if self.args.should_save:
            staged = staging_root / name
            write_checkpoint_manifest(staged, self.state.global_step)
            final = run_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
            _fsync_dir(run_dir)
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staging_root:
                self.state.best_model_checkpoint = str(final)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        _barrier()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class ProgressCallback(TrainerCallback):
    """A `soaes_core.progress` bar over optimiser steps (instead of the Trainer's own tqdm); without a bar, an INFO
    line per logged step."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and progress_enabled():
            self.bar = progress_bar(total=state.max_steps, desc=self.desc)
            self.bar.update(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
        elif state.is_world_process_zero:  # no bar (a log file, SOAES_PROGRESS=0): one line per logged step
            log.info("%s: step %d/%d loss %.4f", self.desc, state.global_step, state.max_steps, logs["loss"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def bf16_supported() -> bool:
    """bf16 mixed precision only where the hardware has it (CUDA with bf16); CPU training stays fp32."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _cpu_distributed() -> bool:
    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return not torch.cuda.is_available() and (launched or (dist.is_available() and dist.is_initialized()))


def build_training_arguments(train: TrainConfig, output_dir: str | os.PathLike[str],
                             deepspeed_config: dict[str, Any] | None = None, **overrides: Any) -> TrainingArguments:
    """`TrainingArguments` for `train` writing to `output_dir`: every `TrainingArguments` field of `train` passed
    through as is, plus what the run decides (schedule, precision, device, DeepSpeed); `overrides` win."""
    bf16 = bf16_supported() if train.bf16 is None else train.bf16
    kwargs = training_arguments_fields(train)
    kwargs.update(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        bf16=bf16,
        gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        report_to=train.report_to or "none",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        # CPU multi-process: accelerate must build its state on gloo to see the launcher's world size
        ddp_backend="gloo" if _cpu_distributed() else None,
        disable_tqdm=True,  # ProgressCallback draws the bar (honours SOAES_PROGRESS)
        deepspeed=deepspeed_config,
        **hf_scheduler_args(train),
    )
    kwargs.update(overrides)
    try:
        return TrainingArguments(**kwargs)
    except ValueError as err:  # transformers' own cross-field checks (e.g. eval_strategy without eval_steps)
        raise ConfigError(f"train: {err}".splitlines()[0]) from None


def load_stage_model(spec: str | os.PathLike[str], attn_implementation: str, dtype: torch.dtype = torch.float32) -> Any:
    """Load a causal LM for training (fp32 master weights; mixed precision comes from the Trainer/DeepSpeed).

    Loaded with `from_pretrained` directly so that, under ZeRO-3, transformers' `zero.Init` partitions it.
    """
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_training_model(str(spec)), dtype=dtype,
                                                     attn_implementation=attn_implementation, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{spec}: cannot load model: {err}".splitlines()[0]) from None
    model.config.use_cache = False
    return model


def meta_param_counts(model_dir: str | os.PathLike[str]) -> tuple[int, int]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return count_params(meta)


@dataclass
class StageResult:
    """What one stage produced (or found already finished)."""

    name: str
    model_dir: Path
    skipped: bool = False
    resumed_from: str | None = None
    attn_implementation: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is not None:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def export_model(trainer: Trainer, tokenizer: Any, stage_dir: Path) -> Path:
    """Save the trained model (`save_pretrained`: safetensors + config + tokenizer) into `stage_dir/model`,
    atomically: written beside it and renamed into place. Every rank must call it (ZeRO-3 gathers weights);
    returns the model dir. The manifest and loss curve are added by the caller before `finalise_export`."""
    tmp = stage_dir / ".model.tmp"
    if trainer.args.should_save and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    trainer.save_model(str(tmp))
    _barrier()
    if trainer.args.should_save:
        tokenizer.save_pretrained(str(tmp))
        for name in _DS_LEFTOVERS:
            with contextlib.suppress(FileNotFoundError):
                (tmp / name).unlink()
        for p in tmp.glob("global_step*"):
            shutil.rmtree(p, ignore_errors=True)
    return tmp


def finalise_export(tmp: Path, model_dir: Path) -> None:
    """Swap the finished export directory into place (old output moved aside, then deleted)."""
    replace_dir(tmp, model_dir)


def train_stage(stage: StageConfig, model_spec: str, stage_dir: str | os.PathLike[str], *,
                parent: dict[str, Any] | None = None, resume: bool = True,
                callbacks: list[TrainerCallback] | None = None) -> StageResult:
    """Train one CPT/SFT stage from `model_spec` and write `stage_dir/model` (+ manifest, loss curve).

    Checkpoints go to `stage_dir/checkpoints`; with `resume` the last complete one is continued.
    `parent` (recorded in the manifest) describes where `model_spec` came from.
    """
    try:
        return _train_stage(stage, model_spec, stage_dir, parent=parent, resume=resume, callbacks=callbacks)
    finally:
        if stage.deepspeed.enabled:
            reset_deepspeed_globals()


def reset_deepspeed_globals() -> None:
    """Forget the process-wide DeepSpeed state a Trainer leaves behind, so that later `from_pretrained` calls
    are not partitioned by `zero.Init` and a later non-DeepSpeed stage gets a plain accelerate state."""
    import gc

    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # left set by accelerate's DeepSpeed plugin
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()


def _train_stage(stage: StageConfig, model_spec: str, stage_dir: str | os.PathLike[str], *,
                 parent: dict[str, Any] | None, resume: bool, callbacks: list[TrainerCallback] | None) -> StageResult:
    timer = Timer()
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    train = stage.train
    seed_everything(train.seed)
    warnings: list[str] = []
    ds_config = None
    mem_estimate = None
    if stage.deepspeed.enabled:
        ds_config = prepare_deepspeed(stage.deepspeed, train, bf16_supported() if train.bf16 is None else train.bf16)
    impl = choose_attn_implementation(train.attn_implementation)
    with timer("load"):
        model_dir = resolve_training_model(str(model_spec))
        tokenizer = load_tokenizer(model_dir if Path(model_dir).is_dir() else f"hf:{model_dir}")
        if stage.deepspeed.enabled and stage.deepspeed.memory_check:
            total, largest = meta_param_counts(model_dir)
            mem_estimate = estimate_zero_memory(total, largest, stage.deepspeed)
            for w in mem_estimate.warnings:
                log.warning("%s: %s", stage.name, w)
            warnings += mem_estimate.warnings
        # TrainingArguments first: with a ZeRO-3 config alive, from_pretrained partitions the model (zero.Init)
        args = build_training_arguments(train, stage_dir / CHECKPOINT_DIRNAME, ds_config)
        model = load_stage_model(model_dir, impl)
    with timer("data"):
        data: PreparedData = prepare_data(stage.data, stage.kind, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layout = packed_layout_for(impl)
    collator: Any = PackedCollator(pad_token_id=pad_id, layout=layout) if data.packed else PaddedCollator(pad_id)
    gap = None
    zero3 = stage.deepspeed.enabled and stage.deepspeed.stage == 3
    if data.packed and train.verify_packing and not zero3:
        seqs = _first_sequences(data, 3)
        if len(seqs) >= 2:
            was_training = model.training
            model.eval()
            gap = packed_logits_gap(model, seqs, layout=layout, pad_token_id=pad_id)
            model.train(was_training)
            tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
            if gap > tol:
                raise SoaesError(f"{stage.name}: packed attention leaks across sequences with {impl} "
                                 f"(relative logit gap {gap:.2e} > {tol:g}); check position_ids / attention mask")
    log.info("%s: attention=%s packed=%s layout=%s rows=%d", stage.name, impl, data.packed,
             layout if data.packed else "padded", len(data.rows))
    ckpt_dir = stage_dir / CHECKPOINT_DIRNAME
    resume_from = resumable_checkpoint(ckpt_dir) if resume else None  # verified: resuming unpickles it
    tb_dir = str(stage_dir / "tensorboard") if "tensorboard" in train.report_to else None
    with _env(TENSORBOARD_LOGGING_DIR=tb_dir):  # read when the Trainer builds its TensorBoard callback
        trainer = SoaesTrainer(model=model, args=args, train_dataset=RowDataset(data.rows), data_collator=collator,
                               processing_class=tokenizer,
                               callbacks=[ProgressCallback(stage.name), *(callbacks or [])])
        trainer.remove_callback(PrinterCallback)  # library code does not print; the loss goes to the curve/bar
        with timer("train"):
            out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    with timer("save"):
        tmp = export_model(trainer, tokenizer, stage_dir)
    model_out = stage_dir / MODEL_DIRNAME
    curve = loss_curve(trainer.state.log_history)
    metrics = {k: v for k, v in out.metrics.items() if isinstance(v, (int, float))}
    metrics["global_step"] = trainer.state.global_step
    whole_run_loss = mean_logged_loss(curve, trainer.state.global_step)
    if whole_run_loss is not None:  # the Trainer's own train_loss covers only the steps since a resume
        metrics["train_loss"] = whole_run_loss
    if trainer.args.should_save:
        write_loss_curve(tmp, curve, title=f"{stage.name} ({stage.kind})")
        if data.rejects:
            from soaes_core import write_jsonl

            write_jsonl(tmp / "rejects.jsonl", data.rejects)
        inputs = {"parent_model": str(model_dir), **data_inputs(data.paths)}
        write_manifest(tmp, f"train:{stage.kind}", inputs=inputs, config=stage, counts=data.counts,
                       timings=timer.timings,
                       extra={"parent_model": {"spec": str(model_spec), "path": str(model_dir), **(parent or {})},
                              "training": {"attn_implementation": impl, "packed": data.packed,
                                           "packed_layout": layout if data.packed else "padded",
                                           "packing_logit_gap": gap, "deepspeed": ds_config,
                                           "memory_estimate": mem_estimate.as_dict() if mem_estimate else None,
                                           "resumed_from": str(resume_from) if resume_from else None,
                                           "world_size": trainer.args.world_size, "metrics": metrics,
                                           "final_loss": curve["loss"][-1] if curve["loss"] else None},
                              "warnings": warnings})
        finalise_export(tmp, model_out)
    _barrier()
    return StageResult(name=stage.name, model_dir=model_out, resumed_from=str(resume_from) if resume_from else None,
                       attn_implementation=impl, metrics=metrics, counts=data.counts, warnings=warnings)


def _first_sequences(data: PreparedData, k: int, max_tokens: int = 64) -> list[list[int]]:
    """Up to `k` short sequences cut from the data's first row (for the packing self-check)."""
    seqs: list[list[int]] = []
    for row in data.rows:
        pos = row.get("position_ids") or list(range(len(row["input_ids"])))
        start = 0
        for i in range(1, len(pos) + 1):
            if i == len(pos) or pos[i] == 0:
                seqs.append(list(row["input_ids"][start:i][:max_tokens]))
                start = i
                if len(seqs) >= k:
                    return seqs
    return seqs
