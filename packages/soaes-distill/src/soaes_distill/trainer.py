"""`KDTrainer`: a `transformers.Trainer` that trains a draft (student) with the Eq. 2 loss against a teacher
given either online (a model in eval mode, no grad) or offline (a `TeacherLogitStore`), or with no teacher at all
when alpha = 0 (black-box SFT on the teacher's answers as token data).

Batches carry, per token, the teacher example id and position to look up, so offline logits stay aligned
under shuffling and packing. Evaluation reports the KD/CE losses and the offline acceptance estimate
(greedy and top-p, accepted length for n = 3 and 9), usable with `EarlyStoppingCallback`
(``metric_for_best_model="acceptance_top_p"``). Works with DeepSpeed through the usual `TrainingArguments`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from soaes_core.errors import InvalidArgumentError
from soaes_train.checkpoints import write_checkpoint_manifest
from soaes_train.trainer import FinishedResumeMixin

from .acceptance import AcceptanceAccumulator
from .losses import DIVERGENCES, IGNORE_INDEX, TopKLogits, distillation_loss_terms
from .store import TeacherLogitStore
from .token_data import TokenExample


@dataclass
class KDConfig:
    """Distillation hyper-parameters (defaults: the SOAEs paper's α = 0.5, τ = 2, forward KL, plain Eq. 2)."""

    alpha: float = field(default=0.5, metadata={
        "help": "Weight of the KD term; 1 - alpha weights cross-entropy on the labels (0 = black-box SFT)."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature tau of both distributions."})
    divergence: str = field(default="forward_kl", metadata={
        "help": "forward_kl, reverse_kl, jsd, total_variation or acceptance."})
    jsd_beta: float = field(default=0.5, metadata={"help": "Mixture weight of the jsd divergence."})
    scale_by_temperature_squared: bool = field(default=False, metadata={
        "help": "Multiply the KD term by tau^2 (Hinton); off = the paper's Eq. 2."})
    eval_top_p: float = field(default=0.7, metadata={"help": "Top-p of the evaluation's acceptance estimate."})
    eval_block_sizes: list[int] = field(default_factory=lambda: [3, 9], metadata={
        "help": "Block sizes n whose accepted length evaluation reports."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if not 0.0 < self.eval_top_p <= 1.0:
            raise ValueError(f"eval_top_p must be in (0, 1], got {self.eval_top_p}")


class KDDataset(torch.utils.data.Dataset):
    """Tokenized examples as training items (labels default to input_ids)."""

    def __init__(self, examples: Sequence[TokenExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        item: dict[str, Any] = {"input_ids": ex.input_ids, "labels": ex.labels if ex.labels is not None
                                else list(ex.input_ids), "example_id": ex.example_id}
        if ex.position_ids is not None:
            item["position_ids"] = ex.position_ids
        return item


@dataclass
class KDCollator:
    """Right-pad a list of items into a batch with `teacher_example_ids`/`teacher_positions` per token.

    Plain rows get an attention mask; packed rows (with `position_ids`) get none, so transformers builds the
    block-diagonal mask from the restarting position ids (padding forms its own segment). An item may carry
    `token_example_ids`/`token_positions` to point each token at a different stored example (logits dumped
    unpacked, training packed).
    """

    pad_token_id: int = 0

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        packed = any("position_ids" in it for it in items)
        n = len(items)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        eids = torch.full((n, width), -1, dtype=torch.long)
        tpos = torch.zeros((n, width), dtype=torch.long)
        pos = torch.arange(width).repeat(n, 1)
        for i, it in enumerate(items):
            L = len(it["input_ids"])
            ids[i, :L] = torch.tensor(it["input_ids"])
            labels[i, :L] = torch.tensor(it["labels"])
            mask[i, :L] = 1
            eids[i, :L] = torch.tensor(it["token_example_ids"]) if "token_example_ids" in it else it["example_id"]
            tpos[i, :L] = torch.tensor(it["token_positions"]) if "token_positions" in it else torch.arange(L)
            if "position_ids" in it:
                pos[i, :L] = torch.tensor(it["position_ids"])
            pos[i, L:] = torch.arange(width - L)
        batch = {"input_ids": ids, "labels": labels, "teacher_example_ids": eids, "teacher_positions": tpos}
        if packed:
            batch["position_ids"] = pos
        else:
            batch["attention_mask"] = mask
        return batch


MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


class KDTrainer(FinishedResumeMixin, Trainer):
    """Trainer whose loss is `distillation_loss` (Eq. 2) against an online teacher or stored logits, or plain
    cross-entropy without a teacher when alpha = 0 (resuming from the final checkpoint trains nothing)."""

    def __init__(self, *args: Any, kd: KDConfig | None = None, teacher_model: torch.nn.Module | None = None,
                 teacher_store: TeacherLogitStore | None = None, expected_tokenizer_sha256: str | None = None,
                 expected_dataset_sha256: str | None = None, **kwargs: Any) -> None:
        kd = kd or KDConfig()
        if teacher_model is not None and teacher_store is not None:
            raise InvalidArgumentError("KDTrainer takes one of teacher_model (online) or teacher_store (offline "
                                       "logits), not both")
        if teacher_model is None and teacher_store is None and kd.alpha != 0:
            raise InvalidArgumentError(f"KDTrainer needs teacher_model (online) or teacher_store (offline logits) for "
                                       f"alpha={kd.alpha}; only alpha=0 (black-box SFT) trains without a teacher")
        super().__init__(*args, **kwargs)
        self.kd = kd
        self.teacher_model = teacher_model
        self.teacher_store = teacher_store
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False)
        if teacher_store is not None:
            teacher_store.require(temperature=self.kd.temperature, tokenizer_sha256=expected_tokenizer_sha256,
                                  dataset_sha256=expected_dataset_sha256)
        # our loss is already a mean over positions: let Trainer divide by gradient-accumulation steps
        self.model_accepts_loss_kwargs = False
        self.kd_history: list[dict[str, float]] = []
        self._window: list[tuple[float, float]] = []

    # -- teacher --------------------------------------------------------------------------------------------
    def teacher_logits(self, inputs: dict[str, torch.Tensor], device: torch.device
                       ) -> torch.Tensor | TopKLogits | None:
        """The teacher's logits for a batch: a forward pass (online), a store lookup (offline), or None (no
        teacher: black-box SFT)."""
        if self.teacher_store is not None:
            t = self.teacher_store.lookup(inputs["teacher_example_ids"].cpu(), inputs["teacher_positions"].cpu(),
                                          temperature=self.kd.temperature)
            return t.to(device)  # TopKLogits.to moves every field, tail samples included
        teacher = self.teacher_model
        if teacher is None:
            return None
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        with torch.no_grad():
            return teacher(**{k: inputs[k] for k in MODEL_KEYS if k in inputs}, use_cache=False).logits

    # -- loss -------------------------------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        outputs = model(**{k: inputs[k] for k in MODEL_KEYS if k in inputs}, use_cache=False)
        logits = outputs.logits
        teacher = self.teacher_logits(inputs, logits.device)
        terms = distillation_loss_terms(
            logits, teacher, inputs["labels"], alpha=self.kd.alpha, temperature=self.kd.temperature,
            divergence=self.kd.divergence, beta=self.kd.jsd_beta,
            scale_by_temperature_squared=self.kd.scale_by_temperature_squared)
        if model.training:
            self.kd_history.append({"step": self.state.global_step, "loss": terms.loss.item(),
                                    "kd": terms.kd.item(), "ce": terms.ce.item()})
            self._window.append((terms.kd.item(), terms.ce.item()))
        return (terms.loss, outputs) if return_outputs else terms.loss

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's files are written before they are checksummed
        if self.args.should_save:  # the manifest a resume checks first (resuming unpickles the checkpoint)
            ckpt = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            write_checkpoint_manifest(ckpt, self.state.global_step)
        self.accelerator.wait_for_everyone()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._window and "loss" in logs:
            logs["kd_loss"] = sum(k for k, _ in self._window) / len(self._window)
            logs["ce_loss"] = sum(c for _, c in self._window) / len(self._window)
            self._window = []
        super().log(logs, *args, **kwargs)

    # -- evaluation: losses + offline acceptance estimate ---------------------------------------------------
    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model
        was_training = model.training
        model.eval()
        acc = AcceptanceAccumulator(top_p=self.kd.eval_top_p, block_sizes=tuple(self.kd.eval_block_sizes))
        sums = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0}
        count = 0
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in dataloader:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(**{k: batch[k] for k in MODEL_KEYS if k in batch}, use_cache=False).logits
                teacher = self.teacher_logits(batch, device)
                terms = distillation_loss_terms(
                    logits, teacher, batch["labels"], alpha=self.kd.alpha, temperature=self.kd.temperature,
                    divergence=self.kd.divergence, beta=self.kd.jsd_beta,
                    scale_by_temperature_squared=self.kd.scale_by_temperature_squared)
                n = terms.num_positions
                for key, val in (("loss", terms.loss), ("kd_loss", terms.kd), ("ce_loss", terms.ce)):
                    sums[key] += float(val) * n
                count += n
                # the decoder samples at τ = 1: exact for a dense teacher; top-k renormalises if captured at τ ≠ 1
                if teacher is not None:
                    acc.add(teacher, logits, batch["labels"])
        if was_training:
            model.train()
        metrics = {f"{metric_key_prefix}_{k}": v / max(count, 1) for k, v in sums.items()}
        if count and (self.teacher_model is not None or self.teacher_store is not None):
            metrics.update(acc.result().as_metrics(prefix=f"{metric_key_prefix}_"))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
