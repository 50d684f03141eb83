"""Train an EAGLE-style feature-conditioned draft head (`soaes_specdec.feature_draft.FeatureDraft`) on the
target's own last hidden states, and estimate its acceptance offline.

Indexing (one token example x[0..T-1], f[p] = the target's post-norm last hidden state at p, which its head
reads to predict x[p+1]): the draft's input at p is (f[p], x[p+1]); its output g[p] should be f[p+1], and
head(g[p]) the target's distribution of x[p+2]. Positions count where x[p+2] is an answer token (labels ≠ -100).
The loss per position is EAGLE's: SmoothL1(g[p], f[p+1]) + w · KL(softmax(head(f[p+1])) ‖ softmax(head(g[p])))
over the (restricted) head's tokens, with uniform noise on the input features. An optional second term trains
the fed-back step that decoding takes for draft tokens 2+: the input at p is (g[p-1], x[p+1]) while earlier
positions keep the true features, done for all p in one pass with a 4-D attention mask (`two_step_hidden`).

Target features are extracted once (no grad, fp32, batched), stored as safetensors shards (bf16 by default)
under `out_dir/features` (atomic, resumable, sha256-checked before use); the loop checkpoints atomically and
resumes after a kill; the best checkpoint by the dev-split estimate is kept and saved as `out_dir/draft`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from soaes_core import atomic_dir, atomic_write_json, write_jsonl, write_manifest
from soaes_core.atomic import remove_stale_temps, temp_path
from soaes_core.errors import ConfigError, DataError, InvalidArgumentError, ModelLoadError
from soaes_core.hashing import sha256_file
from soaes_specdec.draft import RestrictedLMHead, restrict_output_head
from soaes_specdec.feature_draft import LAYOUTS, FeatureDraft
from soaes_specdec.sampling import SamplingParams, nucleus_size, top_p_limit, warp_probs

from .acceptance import acceptance_probabilities, block_walk
from .budget import stop_info
from .draft_init import frequent_tokens
from .losses import IGNORE_INDEX
from .token_data import TokenExample

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
SHARDS_FILE = "shards.json"  # in FEATURES_DIR: sha256 and size of every feature shard, recorded as it is written
SHARDS_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.safetensors"
METRICS_FILE = "metrics.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_AUTOCAST = {"auto": None, "off": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The dtype the training forward autocasts to on `device` (None = full fp32): `auto` is bfloat16 on CUDA."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return _AUTOCAST[setting]


@dataclass
class FeatureKDConfig:
    """Settings of `train_feature_draft` (YAML-loadable; every field settable with `--set`)."""

    steps: int = field(default=1000, metadata={"help": "optimizer steps to train (the LR schedule's length)"})
    time_budget_s: float = field(default=0.0, metadata={"help": "safety cap on training seconds (0 = none); the "
                                                                "schedule follows steps only, and a run the cap "
                                                                "ends early reports stopped_by: time_budget"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    max_length: int = field(default=512, metadata={"help": "examples are truncated to this many tokens"})
    learning_rate: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps, then cosine decay"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to this fraction of the peak"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (0 = off)"})
    feature_weight: float = field(default=1.0, metadata={"help": "weight of SmoothL1(g[p], f[p+1])"})
    kl_weight: float = field(default=1.0, metadata={"help": "weight of KL(target ‖ draft) over the head's tokens"})
    unroll_weight: float = field(default=0.0, metadata={"help": "weight of the 2-step (fed-back feature) loss; "
                                                                "0 = off (halves the step cost)"})
    feature_noise: float = field(default=0.1, metadata={"help": "U(-a, a) noise added to input features in training"})
    head_tokens: int = field(default=4096, metadata={"help": "restricted head size: most frequent answer tokens "
                                                             "(0 = full vocabulary)"})
    layer: int | None = field(default=None, metadata={"help": "target layer the draft layer starts from "
                                                              "(default: the last)"})
    layout: str = field(default="soaes", metadata={"help": "draft layout: soaes (input norm, final norm, fc bias) or "
                                                           "engine (vLLM/SGLang EAGLE-1: none of the three; "
                                                           "exportable with soaes-specdec export)"})
    seed: int = field(default=0, metadata={"help": "seed of batches, noise and the dev split"})
    checkpoint_every: int = field(default=100, metadata={"help": "checkpoint (and dev-evaluate) every N steps"})
    dev_fraction: float = field(default=0.05, metadata={"help": "fraction of training examples held for "
                                                               "checkpoint selection"})
    dev_max_examples: int = field(default=64, metadata={"help": "cap on the dev split's size"})
    select_metric: str = field(default="acceptance_top_p", metadata={"help": "dev metric that picks the best "
                                                                           "checkpoint (higher is better)"})
    feature_dtype: str = field(default="bfloat16", metadata={"help": "stored feature dtype: bfloat16, float16, "
                                                                     "float32"})
    extract_batch_size: int = field(default=8, metadata={"help": "examples per target pass when extracting"})
    examples_per_shard: int = field(default=64, metadata={"help": "examples per feature shard (the unit a killed "
                                                                  "extraction loses)"})
    top_p: float = field(default=0.7, metadata={"help": "top-p of the sampled acceptance estimate"})
    temperature: float = field(default=1.0, metadata={"help": "temperature of the sampled acceptance estimate"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads (0 = leave as is)"})
    autocast: str = field(default="auto", metadata={"help": "mixed precision of the training forward: auto "
                                                            "(bfloat16 on a GPU, off on the CPU), bfloat16, "
                                                            "float16 or off; weights and optimizer stay fp32"})

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "max_length": self.max_length,
                    "checkpoint_every": self.checkpoint_every, "extract_batch_size": self.extract_batch_size,
                    "examples_per_shard": self.examples_per_shard}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {value}")
        if self.steps < 1:
            raise ConfigError(f"steps must be ≥ 1, got {self.steps}")
        if self.max_length < 3:
            raise ConfigError(f"max_length must be ≥ 3, got {self.max_length}")
        if min(self.feature_weight, self.kl_weight, self.unroll_weight, self.feature_noise, self.time_budget_s,
               self.warmup_steps, self.head_tokens, self.grad_clip, self.weight_decay) < 0:
            raise ConfigError("weights, noise, budgets, warmup, head_tokens, grad_clip must be ≥ 0")
        if self.feature_weight == 0 and self.kl_weight == 0:
            raise ConfigError("feature_weight and kl_weight are both 0: nothing to train")
        if not 0.0 < self.dev_fraction < 1.0:
            raise ConfigError(f"dev_fraction must be in (0, 1), got {self.dev_fraction}")
        if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0:
            raise ConfigError(f"top_p must be in (0, 1] and temperature > 0, got {self.top_p}, {self.temperature}")
        if self.feature_dtype not in _DTYPES:
            raise ConfigError(f"feature_dtype must be one of {sorted(_DTYPES)}, got {self.feature_dtype!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.autocast not in _AUTOCAST:
            raise ConfigError(f"autocast must be one of {sorted(_AUTOCAST)}, got {self.autocast!r}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")


@dataclass
class FeatureKDResult:
    """Where the draft went and how it did: best dev metrics, held-out metrics (when given), timings."""

    draft_dir: Path
    steps: int
    best_step: int
    dev_metrics: dict[str, float]
    heldout_metrics: dict[str, float] | None
    extract_seconds: float
    train_seconds: float
    head_tokens: int
    counts: dict[str, int]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_by: str = "max_steps"
    stop_message: str = ""


# ---- data ----------------------------------------------------------------------------------------------


def counted_positions(example: TokenExample, length: int) -> torch.Tensor:
    """Bool (length-1,) over draft positions p: True where x[p+2] exists and is an answer token."""
    mask = torch.zeros(length - 1, dtype=torch.bool)
    if length < 3:
        return mask
    if example.labels is None:
        mask[: length - 2] = True
    else:
        labels = torch.tensor(example.labels[:length])
        mask[: length - 2] = labels[2:] != IGNORE_INDEX
    return mask


def usable_examples(examples: Sequence[TokenExample], max_length: int, source: str
                    ) -> tuple[list[TokenExample], list[dict[str, Any]]]:
    """(examples truncated to `max_length`, rejects): an example without a counted position (shorter than 3
    tokens, or no answer token from its third token on) is rejected with the reason."""
    kept: list[TokenExample] = []
    rejects: list[dict[str, Any]] = []
    for ex in examples:
        if ex.position_ids is not None:
            rejects.append({"source": source, "id": ex.example_id, "reason": "packed rows are not supported"})
            continue
        n = min(len(ex.input_ids), max_length)
        if n < 3:
            rejects.append({"source": source, "id": ex.example_id, "reason": f"{n} tokens (< 3)"})
            continue
        ex = TokenExample(ex.example_id, list(ex.input_ids[:n]), None if ex.labels is None else list(ex.labels[:n]))
        if not counted_positions(ex, n).any():
            rejects.append({"source": source, "id": ex.example_id, "reason": "no answer token after position 1"})
            continue
        kept.append(ex)
    return kept, rejects


def split_dev(examples: Sequence[TokenExample], fraction: float, max_examples: int, seed: int
              ) -> tuple[list[TokenExample], list[TokenExample]]:
    """(train, dev): a seeded random `fraction` (≤ `max_examples`, ≥ 1) of `examples` goes to dev."""
    if len(examples) < 2:
        raise DataError(f"need at least 2 usable training examples to carve a dev split, got {len(examples)}")
    n_dev = max(1, min(max_examples, round(len(examples) * fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    dev_idx = set(order[:n_dev])
    train = [e for i, e in enumerate(examples) if i not in dev_idx]
    return train, [e for i, e in enumerate(examples) if i in dev_idx]


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def extract_features(target: Any, examples: Sequence[TokenExample], batch_size: int = 8,
                     dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The target's post-norm last hidden states [T, H] per example (fp32 passes, right-padded batches sorted
    by length; causal attention keeps padding out of real positions), cast to `dtype` for storage."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: list[torch.Tensor | None] = [None] * len(examples)
    device = next(target.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids = _pad([examples[i].input_ids for i in idx], 0).to(device)
        mask = _pad([[1] * len(examples[i].input_ids) for i in idx], 0).to(device)
        hidden = target.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
        for row, i in enumerate(idx):
            out[i] = hidden[row, : len(examples[i].input_ids)].to(dtype).cpu().clone()
    return [t for t in out if t is not None]


def _model_fingerprint(target: Any, dtype: str) -> str:
    h = hashlib.sha256()
    cfg = target.config.to_dict()
    h.update(json.dumps({k: cfg.get(k) for k in sorted(cfg) if not k.startswith("_")}, sort_keys=True,
                        default=str).encode())
    for p in (target.model.norm.weight, target.model.layers[-1].mlp.down_proj.weight):
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes()[:65536])
    h.update(dtype.encode())
    return h.hexdigest()


def example_key(input_ids: Sequence[int]) -> str:
    """Content key of an example's features: identical token ids have identical (deterministic) features."""
    return "k" + hashlib.sha1(torch.tensor(list(input_ids), dtype=torch.int64).numpy().tobytes()).hexdigest()[:24]


def _read_shard_records(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """The recorded shards of a feature cache ({} when there is no readable record, as in caches of older soaes)."""
    try:
        data = json.loads((cache_dir / SHARDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    shards = data.get("shards") if isinstance(data, dict) and data.get("format") == SHARDS_FORMAT else None
    return {n: e for n, e in shards.items() if isinstance(e, dict)} if isinstance(shards, dict) else {}


def _write_shard_records(cache_dir: Path, records: dict[str, dict[str, Any]]) -> None:
    atomic_write_json(cache_dir / SHARDS_FILE, {"format": SHARDS_FORMAT, "shards": dict(sorted(records.items()))})


def _shard_problem(path: Path, record: dict[str, Any]) -> str | None:
    """Why feature shard `path` differs from its record (None when its size and sha256 match)."""
    if path.stat().st_size != record.get("bytes"):
        return f"size {path.stat().st_size} bytes, {record.get('bytes')} recorded"
    if sha256_file(path) != record.get("sha256"):
        return f"sha256 does not match {SHARDS_FILE}"
    return None


def _verified_shards(cache_dir: Path) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Map each feature key to the shard holding it, over the shards whose bytes match their record, and the
    records of those shards. A shard that fails its check is deleted with one warning line naming it; shards with
    no record (written by an older soaes) are deleted with one line in all: the cache is derived from the target
    alone, so their examples are simply extracted again."""
    from safetensors import SafetensorError, safe_open

    records = _read_shard_records(cache_dir)
    verified: dict[str, dict[str, Any]] = {}
    index: dict[str, Path] = {}
    unrecorded: list[Path] = []
    for shard in sorted(cache_dir.glob("shard-*.safetensors")):
        record = records.get(shard.name)
        if record is None:
            unrecorded.append(shard)
            continue
        problem = _shard_problem(shard, record)
        if problem is None:
            try:
                with safe_open(str(shard), framework="pt") as fh:
                    keys = list(fh.keys())
            except (OSError, SafetensorError) as err:
                problem = f"unreadable ({err})"
        if problem is not None:
            log.warning("feature shard %s is corrupted (%s); re-extracting its examples", shard, problem)
            shard.unlink()
            continue
        verified[shard.name] = record
        index.update({k: shard for k in keys})
    if unrecorded:
        log.warning("%d feature shards in %s have no recorded sha256 (written by an older soaes); re-extracting "
                    "their examples once", len(unrecorded), cache_dir)
        for shard in unrecorded:
            shard.unlink()
    if verified != records:
        _write_shard_records(cache_dir, verified)
    return index, verified


def cached_features(target: Any, examples: Sequence[TokenExample], cache_dir: Path, cfg: FeatureKDConfig
                    ) -> list[torch.Tensor]:
    """Features of `examples` from the content-addressed shard cache in `cache_dir` (tensors keyed by a hash of
    the token ids), extracting the missing ones into new atomically written shards: a killed extraction resumes,
    and a grown dataset only extracts its new examples. A cache made for another target is refused. Every shard's
    sha256 is recorded in `SHARDS_FILE` as it is written and checked before use; a shard that fails the check (or
    has no record) is re-extracted with a warning, since the cache is derived from the target alone."""
    from safetensors.torch import load_file, save_file

    hidden = int(target.config.hidden_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(cache_dir)  # half-written shards of a killed extraction
    meta_path = cache_dir / "meta.json"
    meta = {"hidden_size": hidden, "model": _model_fingerprint(target, cfg.feature_dtype), "dtype": cfg.feature_dtype}
    if meta_path.exists():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        if old.get("hidden_size") != hidden:
            raise DataError(f"features have hidden size {old.get('hidden_size')}, the target has {hidden}; "
                            "they were extracted from another model (use a new output directory)",
                            path=str(meta_path), field="hidden_size")
        if old != meta:
            raise DataError("features were extracted from another target or in another dtype (use a new output "
                            "directory or delete this one)", path=str(meta_path), field="model")
    else:
        atomic_write_json(meta_path, meta)
    index, records = _verified_shards(cache_dir)
    keys = [example_key(e.input_ids) for e in examples]
    missing: dict[str, TokenExample] = {}
    for k, ex in zip(keys, examples, strict=True):
        if k not in index:
            missing.setdefault(k, ex)
    todo = list(missing.items())
    dtype = _DTYPES[cfg.feature_dtype]
    for s in range(0, len(todo), cfg.examples_per_shard):
        part = todo[s:s + cfg.examples_per_shard]
        tensors = extract_features(target, [ex for _, ex in part], cfg.extract_batch_size, dtype)
        name = hashlib.sha1("".join(k for k, _ in part).encode()).hexdigest()[:16]
        path = cache_dir / f"shard-{name}.safetensors"
        tmp = temp_path(path)
        save_file({k: t.contiguous() for (k, _), t in zip(part, tensors, strict=True)}, str(tmp))
        # recorded before the shard appears: a kill in between leaves a record without its file, dropped next run
        records[path.name] = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size, "examples": len(part)}
        _write_shard_records(cache_dir, records)
        os.replace(tmp, path)
        index.update({k: path for k, _ in part})
    loaded: dict[Path, dict[str, torch.Tensor]] = {}
    feats: list[torch.Tensor] = []
    for k, ex in zip(keys, examples, strict=True):
        path = index[k]
        if path not in loaded:
            loaded[path] = load_file(str(path))
        t = loaded[path][k]
        if tuple(t.shape) != (len(ex.input_ids), hidden):
            raise DataError(f"feature {k} has shape {tuple(t.shape)}, expected {(len(ex.input_ids), hidden)}",
                            path=str(path), field=k)
        feats.append(t)
    return feats


# ---- model pieces ----------------------------------------------------------------------------------------


def head_weight(draft: FeatureDraft) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight rows the head computes, their token ids or None for the full vocabulary)."""
    head = draft.lm.get_output_embeddings()
    if isinstance(head, RestrictedLMHead):
        return head.sub_weight, head.token_ids
    return head.weight, None


def _batch(examples: Sequence[TokenExample], feats: Sequence[torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input features f[0..T-2], input ids x[1..T-1], target features f[1..T-1], counted mask), padded."""
    width = max(len(e.input_ids) for e in examples)
    hidden = feats[0].shape[-1]
    f = torch.zeros(len(examples), width, hidden)
    mask = torch.zeros(len(examples), width - 1, dtype=torch.bool)
    for b, (ex, t) in enumerate(zip(examples, feats, strict=True)):
        f[b, : t.shape[0]] = t.float()
        mask[b, : t.shape[0] - 1] = counted_positions(ex, t.shape[0])
    ids = _pad([e.input_ids for e in examples], 0)
    return f[:, :-1], ids[:, 1:], f[:, 1:], mask


def two_step_mask(length: int) -> torch.Tensor:
    """Bool [2L, 2L] attention (True = attend): rows 0..L-1 causal over the first half (step 1); row L+i sees
    first-half keys j < i (true-feature context) and itself only (its fed-back input)."""
    allow = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    allow[:length, :length] = torch.tril(torch.ones(length, length, dtype=torch.bool))
    idx = torch.arange(length)
    allow[length:, :length] = idx[None, :] < idx[:, None]
    allow[length + idx, length + idx] = True
    return allow


def two_step_hidden(draft: FeatureDraft, features: torch.Tensor, input_ids: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g1, g2) [B, L, H]: g1 the teacher-forced step (input f[p]); g2[p] the fed-back step of decoding, input
    (g1[p-1], x[p+1]) over a context of true features (g2[0] has no fed-back input and is meaningless)."""
    b, length, _ = features.shape
    first = draft.input_embeds(features, input_ids)
    g1 = draft.lm.model(inputs_embeds=first, use_cache=False).last_hidden_state
    fed = torch.cat([torch.zeros_like(g1[:, :1]), g1[:, :-1]], dim=1)
    second = draft.input_embeds(fed, input_ids)
    pos = torch.arange(length, device=features.device)
    mask = two_step_mask(length).to(features.device)[None, None].expand(b, 1, -1, -1)
    out = draft.lm.model(inputs_embeds=torch.cat([first, second], 1), attention_mask=mask,
                         position_ids=torch.cat([pos, pos])[None].expand(b, -1), use_cache=False).last_hidden_state
    return out[:, :length], out[:, length:]


def feature_kd_loss(g: torch.Tensor, f_next: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                    feature_weight: float, kl_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """EAGLE's loss over counted positions: feature_weight·SmoothL1(g, f_next) + kl_weight·KL(p_T ‖ p_D), with
    p = softmax(x @ weightᵀ) over the head's rows (the restricted set, renormalised)."""
    g, f_next = g[mask], f_next[mask]
    reg = F.smooth_l1_loss(g, f_next)
    t_logp = F.log_softmax(f_next @ weight.t(), -1)
    d_logp = F.log_softmax(g @ weight.t(), -1)
    kl = (t_logp.exp() * (t_logp - d_logp)).sum(-1).mean()
    loss = feature_weight * reg + kl_weight * kl
    return loss, {"smooth_l1": float(reg.detach()), "kl": float(kl.detach())}


# ---- evaluation ------------------------------------------------------------------------------------------


def sampled_acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor, head_ids: torch.Tensor | None,
                       top_p: float, temperature: float, k: int = 1024) -> torch.Tensor:
    """Σ_x min(p_T(x), p_D(x)) per row (N,) under temperature/top-p, as `acceptance_probabilities` computes it,
    without sorting the full vocabulary: the target's nucleus is found in its top-k (exact whenever the top-k
    holds it; otherwise the full computation is used) and the draft is warped over its head's tokens only."""
    params = SamplingParams(do_sample=True, temperature=temperature, top_p=top_p)
    k = min(k, target_logits.shape[-1])
    probs = torch.softmax(target_logits.float() / temperature, -1)
    vals, idx = torch.topk(probs, k, dim=-1)
    limit = top_p_limit(top_p) if top_p < 1.0 else math.inf
    kept = nucleus_size(vals, limit).clamp(min=1)
    threshold = vals.gather(-1, kept - 1)
    inside = (kept < k).all() and bool((vals[..., -1:] < threshold).all())
    if not inside or head_ids is None:
        return acceptance_probabilities(target_logits, draft_logits, temperature=temperature, top_p=top_p)
    p = vals * (vals >= threshold)
    p = p / p.sum(-1, keepdim=True)
    q_sub = warp_probs(draft_logits[..., head_ids], params)
    lookup = torch.full((target_logits.shape[-1],), -1, dtype=torch.long)
    lookup[head_ids] = torch.arange(head_ids.numel())
    pos = lookup[idx]
    q = torch.where(pos >= 0, q_sub.gather(-1, pos.clamp(min=0)), torch.zeros_like(p))
    return torch.minimum(p, q).sum(-1)


def _summary(greedy: list[torch.Tensor], sampled: list[torch.Tensor], block_sizes: Sequence[int],
             prefix: str = "") -> dict[str, float]:
    g, s = torch.cat(greedy).double(), torch.cat(sampled).double()
    out = {f"{prefix}acceptance_greedy": float(g.mean()), f"{prefix}acceptance_top_p": float(s.mean())}
    for name, parts in (("greedy", greedy), ("sampled", sampled)):
        for n in block_sizes:  # decoder-walk acceptance rate and tokens per target call (see `block_walk`)
            walks = [block_walk(a, n) for a in parts]
            acc, prop, calls = (sum(w[i] for w in walks) for i in range(3))
            out[f"{prefix}acceptance_rate_{name}_n{n}"] = acc / prop if prop else 0.0
            out[f"{prefix}accepted_length_{name}_n{n}"] = (acc + calls) / calls if calls else 1.0
    return out


@torch.no_grad()
def estimate_feature_acceptance(target: Any, draft: FeatureDraft, examples: Sequence[TokenExample],
                                features: Sequence[torch.Tensor], top_p: float = 0.7, temperature: float = 1.0,
                                block_sizes: tuple[int, ...] = (3,)) -> dict[str, float]:
    """Teacher-forced acceptance of `draft` on `examples` (features from the target): step 1 (input f[p]) and
    step 2 (fed-back g), greedy agreement with the target's argmax and Σ min(p, q) at `top_p`/`temperature`;
    the target's distribution is its full head on f[p+1], the draft's its (restricted) head on g[p]. The
    block-walk numbers (`acceptance_rate_*`, `accepted_length_*`) assume step-1 acceptance at every step."""
    head = target.get_output_embeddings()
    _, head_ids = head_weight(draft)
    head_ids = None if head_ids is None else head_ids.cpu()
    was_training = draft.training
    draft.eval()
    acc: dict[str, list[torch.Tensor]] = {"g1": [], "s1": [], "g2": [], "s2": []}
    device = next(draft.parameters()).device
    for ex, f in zip(examples, features, strict=True):
        f_in, ids, f_next, mask = (t.to(device) for t in _batch([ex], [f]))
        g1, g2 = two_step_hidden(draft, f_in, ids)
        m = mask[0]
        t_logits = head(f_next[0][m]).float().cpu()
        later = m.nonzero()[:, 0].cpu() >= 1  # step 2 needs a step-1 output before it
        for step, g, rows in (("1", g1[0][m], torch.ones_like(later)), ("2", g2[0][m], later)):
            if not rows.any():
                continue
            d_logits = draft.logits(g).float().cpu()[rows]
            t = t_logits[rows]
            acc["g" + step].append((t.argmax(-1) == d_logits.argmax(-1)).float())
            acc["s" + step].append(sampled_acceptance(t, d_logits, head_ids, top_p, temperature))
    draft.train(was_training)
    if not acc["g1"]:
        raise InvalidArgumentError("no counted positions to estimate acceptance from")
    out = _summary(acc["g1"], acc["s1"], block_sizes)
    if acc["g2"]:
        out.update({k: v for k, v in _summary(acc["g2"], acc["s2"], (), "step2_").items()})
    out["positions"] = float(sum(a.numel() for a in acc["g1"]))
    return out


# ---- training loop ---------------------------------------------------------------------------------------


def lr_factor(step: int, cfg: FeatureKDConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from 1 to `min_lr_ratio` over the remaining `steps` (the
    time budget is a cap, not part of the schedule: the same steps give the same draft on any machine)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def trainable_parameters(draft: FeatureDraft) -> dict[str, torch.nn.Parameter]:
    """fc, the decoder layer and the final norm (embeddings and head stay frozen)."""
    return {n: p for n, p in draft.named_parameters() if p.requires_grad}


def build_draft(target: Any, train_examples: Sequence[TokenExample], cfg: FeatureKDConfig,
                special_ids: Sequence[int] = ()) -> FeatureDraft:
    """A fresh `FeatureDraft` of `target` with the head restricted to the `head_tokens` most frequent answer
    tokens of `train_examples` (+ `special_ids`), embeddings and head frozen."""
    draft = FeatureDraft.from_target(target, layer=cfg.layer, freeze_embeddings=True, layout=cfg.layout)
    for module in (draft.fc, draft.lm.model.layers, draft.lm.model.norm):  # trainable even if the target is frozen
        module.requires_grad_(True)
    if cfg.head_tokens:
        answers = [[t for t, lab in zip(e.input_ids, e.labels or e.input_ids, strict=True) if lab != IGNORE_INDEX]
                   for e in train_examples]
        ids = frequent_tokens(answers, cfg.head_tokens, always=special_ids)
        restrict_output_head(draft.lm, ids)
        draft.freeze_embeddings()
    return draft


def _step_batch(rng: torch.Generator, n: int, batch_size: int) -> list[int]:
    return torch.randint(0, n, (batch_size,), generator=rng).tolist()


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise ModelLoadError(f"{path}: unreadable checkpoint ({err}); delete it to start over") from None


def train_feature_draft(target: Any, train_examples: Sequence[TokenExample],
                        dev_examples: Sequence[TokenExample] | None, config: FeatureKDConfig,
                        out_dir: str | os.PathLike[str], heldout_examples: Sequence[TokenExample] | None = None,
                        tokenizer: Any = None) -> FeatureKDResult:
    """Train a feature draft for `target` and write `out_dir/draft` (+ `tokenizer` files when given),
    `out_dir/metrics.json` and a manifest. Without `dev_examples` a dev split is carved from `train_examples`
    (`dev_fraction`). Rerunning with the same arguments resumes from `out_dir`'s checkpoint."""
    from safetensors.torch import load_file, save_file

    cfg = config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = target.float().eval()  # features in float32 (converts a half-precision target in place)
    if not hasattr(target, "model") or not hasattr(target.model, "layers"):
        raise InvalidArgumentError(f"a feature draft needs a Llama/Qwen2-style target, got {type(target).__name__}")
    train, rejects = usable_examples(train_examples, cfg.max_length, "train")
    if not train:
        raise DataError(f"no usable training examples: all {len(rejects)} are shorter than 3 tokens or have no "
                        "answer token after position 1")
    if dev_examples is None:
        train, dev = split_dev(train, cfg.dev_fraction, cfg.dev_max_examples, cfg.seed)
    else:
        dev, dev_rej = usable_examples(dev_examples, cfg.max_length, "dev")
        rejects += dev_rej
    held, held_rej = usable_examples(heldout_examples or [], cfg.max_length, "heldout")
    rejects += held_rej
    if not train or not dev:
        raise DataError(f"no usable {'training' if not train else 'dev'} examples: every one is shorter than 3 "
                        f"tokens or has no answer token after position 1 ({len(rejects)} rejected)")
    if heldout_examples and not held:
        raise DataError("no usable held-out examples (all shorter than 3 tokens or without answer tokens)")
    write_jsonl(out / "rejects.jsonl", rejects)

    t0 = time.perf_counter()
    train_feats = cached_features(target, train, out / FEATURES_DIR, cfg)
    dev_feats = extract_features(target, dev, cfg.extract_batch_size)
    extract_s = time.perf_counter() - t0

    special = list(getattr(tokenizer, "all_special_ids", None) or [])
    if not special and target.config.eos_token_id is not None:
        eos = target.config.eos_token_id
        special = list(eos) if isinstance(eos, list) else [eos]
    torch.manual_seed(cfg.seed)
    draft = build_draft(target, train, cfg, special)
    params = trainable_parameters(draft)
    weight, head_ids = head_weight(draft)
    device = next(draft.parameters()).device
    amp = autocast_dtype(cfg.autocast, device)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    step, elapsed, best_step, best_metric = 0, 0.0, -1, -math.inf
    best_metrics: dict[str, float] = {}
    history: list[dict[str, float]] = []
    ckpt = out / CHECKPOINT_FILE
    if ckpt.exists():
        state = _load_checkpoint(ckpt)
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        saved = {n: tuple(t.shape) for n, t in state["params"].items()}
        if saved != shapes:
            raise ModelLoadError(f"{ckpt}: checkpoint parameters {len(saved)} do not match this draft's "
                                 f"({len(shapes)}; hidden size {draft.hidden_size}); use a new output directory")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        meta = json.loads(state["meta"])
        step, elapsed, best_step, best_metric = meta["step"], meta["elapsed"], meta["best_step"], meta["best_metric"]
        best_metrics, history = meta["best_metrics"], meta["history"]

    def evaluate_and_checkpoint() -> None:
        nonlocal best_step, best_metric, best_metrics
        metrics = estimate_feature_acceptance(target, draft, dev, dev_feats, cfg.top_p, cfg.temperature)
        history.append({"step": step, **{f"dev_{k}": v for k, v in metrics.items()}})
        if cfg.select_metric not in metrics:
            raise ConfigError(f"select_metric {cfg.select_metric!r} is not one of {sorted(metrics)}")
        if metrics[cfg.select_metric] > best_metric:
            best_step, best_metric, best_metrics = step, metrics[cfg.select_metric], metrics
            tmp = temp_path(out / BEST_FILE)
            save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, str(tmp))
            os.replace(tmp, out / BEST_FILE)
        meta = {"step": step, "elapsed": elapsed, "best_step": best_step, "best_metric": best_metric,
                "best_metrics": best_metrics, "history": history}
        tmp = temp_path(ckpt)
        torch.save({"params": {n: p.detach().cpu().clone() for n, p in params.items()},
                    "optimizer": opt.state_dict(), "meta": json.dumps(meta)}, tmp)
        os.replace(tmp, ckpt)

    draft.train()
    running: dict[str, float] = {}
    while step < cfg.steps and not (cfg.time_budget_s and elapsed >= cfg.time_budget_s):
        start = time.perf_counter()
        rng = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = _step_batch(rng, len(train), cfg.batch_size)
        f_in, ids, f_next, mask = _batch([train[i] for i in idx], [train_feats[i] for i in idx])
        if cfg.feature_noise:  # drawn on the CPU: the same noise whatever the device
            f_in = f_in + (torch.rand(f_in.shape, generator=rng) * 2 - 1) * cfg.feature_noise
        f_in, ids, f_next, mask = (t.to(device, non_blocking=True) for t in (f_in, ids, f_next, mask))
        for g in opt.param_groups:
            g["lr"] = cfg.learning_rate * lr_factor(step, cfg)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            if cfg.unroll_weight:
                g1, g2 = two_step_hidden(draft, f_in, ids)
            else:
                g1, g2 = draft(f_in, ids), None
        # the loss in fp32: log-softmax over thousands of head rows and SmoothL1 on features
        loss, parts = feature_kd_loss(g1.float(), f_next, mask, weight, cfg.feature_weight, cfg.kl_weight)
        if g2 is not None:
            mask2 = mask.clone()
            mask2[:, 0] = False
            if mask2.any():
                loss2, parts2 = feature_kd_loss(g2.float(), f_next, mask2, weight, cfg.feature_weight, cfg.kl_weight)
                loss = loss + cfg.unroll_weight * loss2
                parts.update({f"step2_{k}": v for k, v in parts2.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        step += 1
        elapsed += time.perf_counter() - start
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            running[k] = running.get(k, 0.0) + v
        running["n"] = running.get("n", 0.0) + 1
        if step % cfg.checkpoint_every == 0 or step >= cfg.steps or \
                (cfg.time_budget_s and elapsed >= cfg.time_budget_s):
            n = running.pop("n")
            history.append({"step": step, "elapsed_s": elapsed, **{k: v / n for k, v in running.items()}})
            running = {}
            evaluate_and_checkpoint()
    draft.eval()

    best = load_file(str(out / BEST_FILE))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best[n])
    heldout_metrics = None
    if held:
        heldout_metrics = estimate_feature_acceptance(target, draft, held, extract_features(target, held),
                                                      cfg.top_p, cfg.temperature)
    with atomic_dir(out / "draft") as tmp_dir:
        draft.save_pretrained(tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
    counts = {"train_examples": len(train), "dev_examples": len(dev), "heldout_examples": len(held),
              "rejected": len(rejects), "train_positions": int(sum(counted_positions(e, len(e.input_ids)).sum()
                                                                    for e in train))}
    stop = stop_info("max_steps" if step >= cfg.steps else "time_budget", step, cfg.steps, elapsed, cfg.time_budget_s)
    if stop.stopped_by == "time_budget":
        log.warning("feature draft: %s", stop.stop_message)
    result = FeatureKDResult(out / "draft", step, best_step, best_metrics, heldout_metrics, extract_s, elapsed,
                             0 if head_ids is None else int(head_ids.numel()), counts, history, stop.stopped_by,
                             stop.stop_message)
    atomic_write_json(out / METRICS_FILE, {**{k: v for k, v in asdict(result).items() if k != "history"},
                                           "draft_dir": str(result.draft_dir), "config": asdict(cfg),
                                           "history": history})
    write_manifest(out / "draft", "distill.feature_draft", config=cfg, counts=counts,
                   timings={"extract": extract_s, "train": elapsed},
                   extra={"dev_metrics": best_metrics, "heldout_metrics": heldout_metrics, "best_step": best_step,
                          **stop.as_dict()})
    return result
