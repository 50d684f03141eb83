"""`soaes-distill dump`: run the target over a tokenized dataset and store its top-k (or dense) logits.

Resumable at shard granularity: finished shards are listed (with sha256) in `store.json`, rewritten
atomically after each shard; a rerun with the same settings skips them (re-dumping only those missing, whose
checksum no longer matches or that have none recorded) and a rerun with other settings is refused. Tail
samples (`tail_samples` > 0) are drawn with a generator seeded from (`TAIL_SEED`, example id), so a resumed
dump is byte-identical to a fresh one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soaes_core import (
    DEFAULT_MODEL,
    load_model,
    load_tokenizer,
    progress_bar,
    sha256_file,
    tokenizer_fingerprint,
    write_manifest,
)
from soaes_core.atomic import remove_stale_temps
from soaes_core.errors import IntegrityError, InvalidArgumentError

from .losses import sample_tail_ids
from .store import CaptureSettings, read_state, settings_mismatch, write_shard, write_state
from .token_data import TokenExample, dataset_sha256, load_token_examples

log = logging.getLogger(__name__)
TAIL_SEED = 20250601  # fixed: the tail samples of an example depend only on its id and its logits


@dataclass
class DumpConfig:
    """Settings of a teacher-logit dump (YAML-loadable)."""

    dataset: str = field(default="", metadata={
        "help": "Tokenized JSONL/Parquet (input_ids [, labels, position_ids, id])."})
    output_dir: str = field(default="", metadata={"help": "Store directory (resumed if it exists)."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Teacher model spec."})
    top_k: int = field(default=64, metadata={"help": "Logits kept per position (0 = dense)."})
    dtype: str = field(default="float16", metadata={"help": "Stored value dtype: float16, bfloat16 or float32."})
    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0], metadata={
        "help": "Temperatures τ the log-normalisers are captured at (comma-separated)."})
    compression: str = field(default="none", metadata={"help": "Shard compression: none or zstd."})
    examples_per_shard: int = field(default=256, metadata={"help": "Examples per shard (the unit a kill loses)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per teacher pass."})
    model_dtype: str | None = field(default=None, metadata={
        "help": "Teacher weights' dtype (unset: the checkpoint's own; auto: bfloat16 on a GPU, float32 on the CPU)."})
    device: str | None = field(default=None, metadata={
        "help": "Teacher device: auto or unset (cuda when present, else cpu), cpu, cuda or cuda:N."})
    tail_samples: int = field(default=0, metadata={
        "help": "Tail token ids sampled per position outside the top-k (0 = none: the loss uses a tail bucket)."})
    tail_temperature: float | None = field(default=None, metadata={
        "help": "τ the tail samples are drawn at (one of temperatures; default the largest)."})

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be ≥ 0 (0 = dense), got {self.top_k}")
        if self.tail_samples < 0:
            raise InvalidArgumentError(f"tail_samples must be ≥ 0, got {self.tail_samples}")
        if self.tail_temperature is not None and \
                not any(math.isclose(float(self.tail_temperature), float(t), rel_tol=1e-6) for t in self.temperatures):
            raise InvalidArgumentError(f"tail_temperature {self.tail_temperature} must be one of the captured "
                                       f"temperatures {list(self.temperatures)}")
        if self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be ≥ 1, got {self.batch_size}")


@dataclass
class DumpResult:
    output_dir: Path
    examples: int
    positions: int
    bytes: int
    bytes_per_token: float
    shards_written: int
    shards_skipped: int


def model_fingerprint(model: Any) -> str:
    """A cheap identity of a model's weights: sha256 over config, parameter names, shapes and sums."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.state_dict().items():
        d = p.detach().double()
        h.update(f"{name}:{tuple(p.shape)}:{d.sum().item():.10e}:{d.abs().sum().item():.10e}".encode())
    return h.hexdigest()


@torch.no_grad()
def teacher_log_probs(model: Any, examples: list[TokenExample], device: torch.device) -> list[torch.Tensor]:
    """Teacher log-softmax at τ=1 per example, each (L, V) fp32; packed rows run alone with their position ids."""
    out: list[torch.Tensor] = []
    plain = [ex for ex in examples if ex.position_ids is None]
    logits_by_id: dict[int, torch.Tensor] = {}
    if plain:
        width = max(len(ex.input_ids) for ex in plain)
        ids = torch.zeros(len(plain), width, dtype=torch.long)
        mask = torch.zeros(len(plain), width, dtype=torch.long)
        for i, ex in enumerate(plain):
            ids[i, :len(ex.input_ids)] = torch.tensor(ex.input_ids)
            mask[i, :len(ex.input_ids)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        for i, ex in enumerate(plain):
            logits_by_id[ex.example_id] = torch.log_softmax(logits[i, :len(ex.input_ids)], -1).cpu()
    for ex in examples:
        if ex.position_ids is not None:  # packed row: position ids restart per sequence (block-diagonal)
            logits = model(input_ids=torch.tensor([ex.input_ids], device=device),
                           position_ids=torch.tensor([ex.position_ids], device=device),
                           use_cache=False).logits.float()
            logits_by_id[ex.example_id] = torch.log_softmax(logits[0], -1).cpu()
        out.append(logits_by_id[ex.example_id])
    return out


def tail_generator(example_id: int) -> torch.Generator:
    """The CPU generator of an example's tail samples, seeded from (`TAIL_SEED`, example id)."""
    digest = hashlib.sha256(f"{TAIL_SEED}:{int(example_id)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def capture_example(log_probs: torch.Tensor, settings: CaptureSettings, example_id: int = 0) -> dict[str, torch.Tensor]:
    """The stored arrays of one example from its (L, V) τ=1 log-probs.

    With `settings.tail_samples` s > 0 also s ids per position drawn at τ_s from the teacher outside its top-k
    (generator seeded from `example_id`) and their τ=1 log-probs.
    """
    lse = torch.stack([torch.logsumexp(log_probs / t, -1) for t in settings.temperatures], -1)
    if settings.dense:
        return {"values": log_probs, "logsumexp": lse}
    values, indices = torch.topk(log_probs, settings.top_k, dim=-1)
    out = {"values": values, "indices": indices.to(torch.int64), "logsumexp": lse}
    if settings.tail_samples:
        tail = sample_tail_ids(log_probs.cpu(), indices.cpu(), settings.tail_samples, settings.tail_temperature,
                               tail_generator(example_id))
        out["tail_indices"] = tail
        out["tail_values"] = log_probs.cpu().gather(-1, tail)
    return out


def _resume_state(out: Path, settings: CaptureSettings) -> dict[str, Any]:
    state = read_state(out)
    if state is None:
        return {}
    problems = settings_mismatch(state["settings"], **dataclasses.asdict(settings))
    if problems:
        raise IntegrityError(f"{out}: existing dump was captured with other settings ({'; '.join(problems)}); "
                             "use another output_dir or delete it")
    done = {}
    for key, entry in state["shards"].items():
        name = entry.get("file") if isinstance(entry, dict) else None
        path = out / str(name or f"shard {key}")
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if name and path.is_file() and isinstance(digest, str) and sha256_file(path) == digest:
            done[key] = entry
        else:
            log.warning("%s is missing, corrupted or has no recorded sha256; dumping it again", path)
    return done


def run_dump(config: DumpConfig, model: Any = None, tokenizer: Any = None,
             on_batch: Callable[[int, int], None] | None = None) -> DumpResult:
    """Dump teacher logits for `config.dataset` into `config.output_dir` (resuming a partial dump).

    `model`/`tokenizer` override `config.model` (already loaded objects); `on_batch(shard, batch)` is called
    after every forward pass (progress hooks, tests).
    """
    if not config.dataset or not config.output_dir:
        raise InvalidArgumentError("dump needs both dataset and output_dir")
    examples = load_token_examples(config.dataset)  # bad data fails fast, before a model is loaded
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # half-written shards of a killed dump (up to a shard each); a live dump's are kept
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model)
    if model is None:
        model = load_model(config.model, dtype=config.model_dtype, device=config.device)
    model.eval()
    device = next(model.parameters()).device
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if config.top_k > vocab:
        raise InvalidArgumentError(f"top-k k={config.top_k} exceeds the teacher's vocabulary size {vocab}")
    bad = [ex.example_id for ex in examples if not 0 <= min(ex.input_ids) <= max(ex.input_ids) < vocab]
    if bad:
        raise InvalidArgumentError(f"{config.dataset}: example {bad[0]} has token ids outside the teacher's "
                                   f"vocabulary [0, {vocab}) (tokenized with another tokenizer?)")
    settings = CaptureSettings(
        model=config.model if isinstance(config.model, str) else str(config.model),
        model_fingerprint=model_fingerprint(model),
        # ids only: the store holds logits over token ids of a pre-tokenized dataset; a student whose tokenizer
        # class re-tokenizes text differently (e.g. a Qwen2 folder of the same vocabulary) still shares them
        tokenizer_sha256=tokenizer_fingerprint(tokenizer, ids_only=True),
        dataset_sha256=dataset_sha256(config.dataset), vocab_size=vocab, top_k=config.top_k, dtype=config.dtype,
        temperatures=list(config.temperatures), compression=config.compression,
        examples_per_shard=config.examples_per_shard, tail_samples=config.tail_samples,
        tail_temperature=config.tail_temperature)
    shards = _resume_state(out, settings)
    per = settings.examples_per_shard
    num_shards = math.ceil(len(examples) / per)
    write_state(out, settings, len(examples), shards)
    total_positions = sum(len(ex.input_ids) for ex in examples)
    bar = progress_bar(total=total_positions, desc="dump teacher logits", unit="tok")
    bar.update(sum(e["positions"] for e in shards.values()))
    written = 0
    start = time.perf_counter()
    try:
        for s in range(num_shards):
            if str(s) in shards:
                continue
            chunk = examples[s * per:(s + 1) * per]
            captured: list[dict[str, torch.Tensor]] = []
            order = sorted(range(len(chunk)), key=lambda i: -len(chunk[i].input_ids))  # less padding
            by_index: dict[int, dict[str, torch.Tensor]] = {}
            for b, lo in enumerate(range(0, len(order), config.batch_size)):
                batch = [chunk[i] for i in order[lo:lo + config.batch_size]]
                logps = teacher_log_probs(model, batch, device)
                for i, lp in zip(order[lo:lo + config.batch_size], logps, strict=True):
                    by_index[i] = capture_example(lp, settings, chunk[i].example_id)
                bar.update(sum(len(ex.input_ids) for ex in batch))
                if on_batch is not None:
                    on_batch(s, b)
            captured = [by_index[i] for i in range(len(chunk))]
            shards[str(s)] = write_shard(out, settings, s, [ex.example_id for ex in chunk], captured)
            write_state(out, settings, len(examples), shards)
            written += 1
    finally:
        bar.close()
    positions = sum(e["positions"] for e in shards.values())
    size = sum(e["bytes"] for e in shards.values())
    result = DumpResult(out, len(examples), positions, size, size / max(positions, 1), written, num_shards - written)
    write_manifest(out, "distill.dump", inputs={"dataset": config.dataset}, config=config,
                   counts={"examples": len(examples), "positions": positions, "shards": num_shards,
                           "shards_written": written, "bytes": size,
                           "bytes_per_token": round(result.bytes_per_token, 3)},
                   timings={"dump": time.perf_counter() - start},
                   extra={"capture": dataclasses.asdict(settings)})
    return result
