"""Online distillation during speculative decoding (after Liu et al., "Online Speculative Decoding", 2024).

Requests are served with `soaes_specdec.SpeculativeDecoder`. After each request the target's and draft's
logits on the served sequence are compared; positions where the draft's token would be rejected (its argmax
differs from the target's: what a greedy verifier rejects) are buffered with the target's logits there. When
the buffer holds `buffer_threshold` positions the draft takes `update_steps` optimizer steps of
`distillation_loss` on those positions only, and the buffer is cleared. The acceptance of every request is
recorded, so the stream shows whether the draft adapts. (A serving system has the target logits from
verification already; here one teacher-forced pass recomputes the same values, which keeps the decoder untouched.)

`run_online` is the `soaes-distill online` job: prompts from a file, a resumable checkpoint after every update,
and the updated draft saved with `save_pretrained`. Defaults follow the domain-draft paper's online setting
(lr 1e-6, one pass over the prompts, forward KL).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from soaes_core import DEFAULT_MODEL, atomic_dir, atomic_write_json, write_jsonl, write_manifest
from soaes_core.errors import ConfigError, InvalidArgumentError, ModelLoadError
from soaes_core.placement import Placement
from soaes_core.progress import progress_bar
from soaes_specdec.decoding import SpeculativeDecoder

from .losses import distillation_loss
from .trainer import KDConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
_DRAFT_FILE = "draft.safetensors"
_STATE_FILE = "state.pt"
PAPER = "the domain-draft paper's online setting"


@dataclass
class OnlineKDConfig(KDConfig):
    """`KDConfig` with the domain-draft paper's online loss as defaults: the divergence alone (alpha 1) at tau 1."""

    alpha: float = field(default=1.0, metadata={
        "help": f"Weight of the KD term; 1 - alpha weights cross-entropy on the served tokens (1: {PAPER})."})
    temperature: float = field(default=1.0, metadata={"help": f"Softmax temperature tau (1: {PAPER})."})


@dataclass
class OnlineConfig:
    """Serving and update settings of online distillation (the defaults marked so are the domain-draft paper's)."""

    num_speculative_tokens: int = field(default=3, metadata={"help": "Draft tokens proposed per verify step."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per request."})
    do_sample: bool = field(default=False, metadata={
        "help": "Serve with top-p sampling (true) or greedily; rejected positions are those whose draft argmax "
                "differs from the target's either way."})
    top_p: float = field(default=1.0, metadata={"help": "Top-p of sampled serving."})
    buffer_threshold: int = field(default=64, metadata={
        "help": "Rejected positions buffered before the draft is updated."})
    update_steps: int = field(default=4, metadata={"help": "Optimizer steps per update, each over the whole buffer."})
    learning_rate: float = field(default=1e-6, metadata={"help": f"AdamW learning rate (1e-6: {PAPER})."})
    epochs: int = field(default=1, metadata={"help": f"Passes over the prompts (1: {PAPER})."})
    final_update: bool = field(default=True, metadata={
        "help": "Train on what is left in the buffer when the prompts run out (false: drop it, as a server would)."})
    kd: OnlineKDConfig = field(default_factory=OnlineKDConfig, metadata={
        "help": f"Loss on the rejected positions (alpha 1, tau 1, forward KL: {PAPER})."})
    seed: int = field(default=0, metadata={"help": "Seed of sampled serving."})

    def __post_init__(self) -> None:
        if self.buffer_threshold < 1 or self.update_steps < 1:
            raise ValueError("buffer_threshold and update_steps must be ≥ 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.epochs < 1 or self.num_speculative_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError("epochs, num_speculative_tokens and max_new_tokens must be ≥ 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class OnlineResult:
    """Per-request acceptance over the stream and the updates made."""

    acceptance: list[float]
    proposed: list[int]
    accepted: list[int]
    updates: int
    buffered_positions: int
    trained_positions: int = 0
    dropped_positions: int = 0

    def window_acceptance(self, start: int, end: int | None = None) -> float:
        """Token-weighted acceptance (accepted / proposed) over requests [start, end)."""
        p = sum(self.proposed[start:end])
        return sum(self.accepted[start:end]) / p if p else 0.0


@torch.no_grad()
def rejected_positions(target: Any, draft: Any, sequence: torch.Tensor, first: int) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """Positions t ≥ first-1 (predicting generated tokens) where the draft's argmax ≠ the target's, with the
    target's logits there: (positions (N,), target logits (N, V) in float32 on the CPU)."""
    ids = sequence[None].to(next(target.parameters()).device)
    t_logits = target(input_ids=ids, use_cache=False).logits[0, first - 1:-1].float().cpu()
    d_logits = draft(input_ids=ids.to(next(draft.parameters()).device), use_cache=False).logits[0, first - 1:-1]
    bad = (t_logits.argmax(-1) != d_logits.float().cpu().argmax(-1)).nonzero().squeeze(-1)
    return bad + first - 1, t_logits[bad]


def rejected_loss(draft_logits: torch.Tensor, sequence: torch.Tensor, positions: torch.Tensor,
                  target_logits: torch.Tensor, kd: KDConfig) -> torch.Tensor:
    """The update loss of one served sequence: `distillation_loss` of the draft's logits (T, V) at `positions`
    only (each predicts token t+1) against the target's logits there; every other position gets no gradient."""
    pos = positions.to(draft_logits.device)
    labels = sequence.to(draft_logits.device)[pos + 1]
    return distillation_loss(draft_logits[pos][None], target_logits.to(draft_logits.device)[None], labels[None],
                             alpha=kd.alpha, temperature=kd.temperature, divergence=kd.divergence, beta=kd.jsd_beta,
                             shift_labels=False, scale_by_temperature_squared=kd.scale_by_temperature_squared)


Buffer = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (sequence, rejected positions, target logits)


def _update(draft: Any, optimizer: torch.optim.Optimizer, buffer: Buffer, cfg: OnlineConfig) -> None:
    draft.train()
    device = next(draft.parameters()).device
    total = sum(int(p.numel()) for _, p, _ in buffer)
    for _ in range(cfg.update_steps):
        optimizer.zero_grad()
        for seq, pos, t_logits in buffer:
            logits = draft(input_ids=seq[None].to(device), use_cache=False).logits[0]
            (rejected_loss(logits, seq, pos, t_logits, cfg.kd) * (pos.numel() / total)).backward()
        optimizer.step()
    optimizer.zero_grad()
    draft.eval()


def _prompts_sha256(prompts: Sequence[Sequence[int]]) -> str:
    return hashlib.sha256(json.dumps([list(map(int, p)) for p in prompts]).encode()).hexdigest()


def _settings(cfg: OnlineConfig) -> dict[str, Any]:
    """The serving and update settings a checkpoint must match (a recipe's paths left out)."""
    return {f: v for f, v in asdict(cfg).items() if f in OnlineConfig.__dataclass_fields__}


def _save_checkpoint(ckpt: Path, draft: Any, optimizer: torch.optim.Optimizer, gen: torch.Generator,
                     meta: dict[str, Any]) -> None:
    """Draft weights, optimizer and sampler state and the stream position, written as one directory atomically."""
    from safetensors.torch import save_model

    with atomic_dir(ckpt) as tmp:
        save_model(draft, str(tmp / _DRAFT_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "generator": gen.get_state(), "meta": json.dumps(meta)},
                   tmp / _STATE_FILE)


def _load_checkpoint(ckpt: Path, draft: Any, optimizer: torch.optim.Optimizer, gen: torch.Generator,
                     expect: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_model

    try:
        state = torch.load(ckpt / _STATE_FILE, map_location="cpu", weights_only=True)
        meta = json.loads(state["meta"])
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise ModelLoadError(f"{ckpt}: unreadable checkpoint ({err}); delete it to start over") from None
    for key, value in expect.items():
        if meta.get(key) != value:
            raise ConfigError(f"{ckpt}: the checkpoint was made with other {key.replace('_', ' ')}; use a new "
                              "output directory or delete the checkpoint")
    try:
        load_model(draft, str(ckpt / _DRAFT_FILE), device=str(next(draft.parameters()).device))
    except Exception as err:
        raise ModelLoadError(f"{ckpt}: checkpoint does not fit this draft ({err})") from None
    optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return meta


def online_distill(target: Any, draft: Any, prompts: Sequence[Sequence[int]], config: OnlineConfig | None = None,
                   eos_token_id: int | Sequence[int] | None = None,
                   checkpoint_dir: str | os.PathLike[str] | None = None,
                   on_request: Callable[[int, float], None] | None = None) -> OnlineResult:
    """Serve `prompts` (`epochs` times, in order) with speculative decoding, updating `draft` in place from its
    rejected positions. With `checkpoint_dir` the state is saved after every update and at the end, and a rerun
    resumes from it (the requests served after the last save are served again, with the same draws).
    `on_request(index, acceptance)` is called after each request (progress)."""
    cfg = config or OnlineConfig()
    if not prompts:
        raise InvalidArgumentError("online distillation needs at least one prompt")
    target.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=cfg.learning_rate)
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=cfg.num_speculative_tokens)
    gen = torch.Generator().manual_seed(cfg.seed)
    result = OnlineResult([], [], [], 0, 0)
    start, total = 0, cfg.epochs * len(prompts)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    expect = {"settings": json.loads(json.dumps(_settings(cfg))), "prompts_sha256": _prompts_sha256(prompts)}
    if ckpt is not None and (ckpt / _STATE_FILE).is_file():
        meta = _load_checkpoint(ckpt, draft, optimizer, gen, expect)
        start, result = meta["next_request"], OnlineResult(**meta["result"])
        log.info("online distillation: resuming at request %d of %d", start, total)

    def save(next_request: int) -> None:
        if ckpt is not None:
            _save_checkpoint(ckpt, draft, optimizer, gen, {**expect, "next_request": next_request,
                                                            "result": asdict(result)})

    buffer: Buffer = []
    buffered = 0
    device = next(target.parameters()).device
    draft.eval()
    for k in range(start, total):
        prompt = list(prompts[k % len(prompts)])
        out = decoder.generate(torch.tensor([prompt], device=device), max_new_tokens=cfg.max_new_tokens,
                               do_sample=cfg.do_sample, top_p=cfg.top_p, eos_token_id=eos_token_id, generator=gen)
        s = out.stats
        result.acceptance.append(s.acceptance_rate)
        result.proposed.append(s.proposed)
        result.accepted.append(s.accepted)
        seq = out.sequences[0, :out.sequence_lengths[0]].detach().cpu().clone()
        if seq.numel() > len(prompt):
            pos, t_logits = rejected_positions(target, draft, seq, len(prompt))
            if pos.numel():
                buffer.append((seq, pos, t_logits))
                buffered += int(pos.numel())
                result.buffered_positions += int(pos.numel())
        if buffered >= cfg.buffer_threshold:
            _update(draft, optimizer, buffer, cfg)
            result.updates += 1
            result.trained_positions += buffered
            buffer, buffered = [], 0
            save(k + 1)
        if on_request is not None:
            on_request(k, s.acceptance_rate)
    if buffered and start < total:
        if cfg.final_update:
            _update(draft, optimizer, buffer, cfg)
            result.updates += 1
            result.trained_positions += buffered
        else:
            result.dropped_positions += buffered
    if start < total:
        save(total)
    draft.eval()
    return result


@dataclass(kw_only=True)
class OnlineDistillRecipe(OnlineConfig):
    """A `soaes-distill online` run: serve `prompts` with `target` and `draft`, update the draft on its rejected
    positions, and save it to `output_dir/model`."""

    draft: str = field(metadata={"help": "Draft to update: an HF causal LM directory or spec (e.g. from make-draft)."})
    prompts: str = field(metadata={
        "help": "JSONL of requests: `prompt` (string) or chat `messages`, optional `id`."})
    output_dir: str = field(metadata={
        "help": "Where model/, online_history.jsonl, metrics.json, the manifest and the checkpoint go (a rerun "
                "resumes)."})
    target: str = field(default=DEFAULT_MODEL, metadata={"help": "Target (verifier) model spec."})
    chat: bool = field(default=True, metadata={"help": "Wrap each prompt in the target's chat template."})
    max_prompts: int = field(default=0, metadata={"help": "Serve only the first N prompts (0 = all)."})
    device: str = field(default="auto", metadata={
        "help": "Device of both models: auto (cuda when present, else cpu), cpu, cuda or cuda:N."})
    dtype: str = field(default="auto", metadata={
        "help": "Target dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16, float16 (the "
                "draft trains in float32)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, got {self.max_prompts}")
        Placement(device=self.device, dtype=self.dtype)  # one ConfigError (a ValueError) per bad device or dtype

    def online_config(self) -> OnlineConfig:
        """The serving and update settings alone."""
        return OnlineConfig(**{f: getattr(self, f) for f in OnlineConfig.__dataclass_fields__})

    @classmethod
    def of(cls, config: OnlineConfig, **run: Any) -> OnlineDistillRecipe:
        """A recipe with `config`'s settings and the run fields in `run` (draft, prompts, output_dir, ...)."""
        return cls(**{f: getattr(config, f) for f in OnlineConfig.__dataclass_fields__}, **run)


@dataclass
class OnlineRunResult:
    """Where the updated draft went, the stream's result, and how long it took."""

    model_dir: Path
    result: OnlineResult
    seconds: float
    metrics: dict[str, float]


def _encode_prompts(recipe: OnlineDistillRecipe, tokenizer: Any) -> tuple[list[Any], list[list[int]]]:
    from soaes_core import encode_chat_prompt, read_prompt_records

    records = read_prompt_records(recipe.prompts, limit=recipe.max_prompts)
    ids = [encode_chat_prompt(tokenizer, r.as_messages()) if recipe.chat else tokenizer(r.user_text)["input_ids"]
           for r in records]
    return [r.id for r in records], ids


def stream_metrics(result: OnlineResult, window: int | None = None) -> dict[str, float]:
    """Acceptance over the first and last `window` requests (default a quarter of the stream) and overall."""
    n = len(result.acceptance)
    w = window or max(1, n // 4)
    return {"requests": float(n), "acceptance": result.window_acceptance(0), "acceptance_first":
            result.window_acceptance(0, w), "acceptance_last": result.window_acceptance(max(0, n - w)),
            "updates": float(result.updates), "trained_positions": float(result.trained_positions),
            "dropped_positions": float(result.dropped_positions)}


def run_online(recipe: OnlineDistillRecipe, target_model: Any = None, draft_model: Any = None) -> OnlineRunResult:
    """Run `recipe` (already-loaded models may be passed) and write `output_dir/model` (save_pretrained +
    tokenizer), `online_history.jsonl`, `metrics.json` and a manifest; a killed run resumes from its checkpoint."""
    from soaes_core import load_model, load_tokenizer
    from soaes_specdec.feature_draft import is_feature_draft_dir

    from .draft_init import HEAD_IDS_FILE

    if not Path(recipe.prompts).is_file():
        raise ConfigError(f"prompts: file '{recipe.prompts}' does not exist")
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    where = Placement(device=recipe.device, dtype=recipe.dtype).resolve()
    if is_feature_draft_dir(recipe.draft):
        raise ConfigError(f"draft: {recipe.draft} is a feature-conditioned draft; online distillation updates a "
                          "draft language model (make-draft)")
    tokenizer = load_tokenizer(recipe.target)
    ids, prompts = _encode_prompts(recipe, tokenizer)
    if not prompts:
        raise ConfigError(f"prompts: {recipe.prompts} holds no prompts")
    target = target_model if target_model is not None else load_model(recipe.target, **where.load_kwargs())
    draft = draft_model if draft_model is not None else load_model(recipe.draft, dtype=torch.float32,
                                                                   device=where.device)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ModelLoadError(f"draft {recipe.draft} has {draft.config.vocab_size} tokens, target {recipe.target} "
                             f"{target.config.vocab_size}: they must share the tokenizer")
    cfg = recipe.online_config()
    bar = progress_bar(total=cfg.epochs * len(prompts), desc="online distillation", unit="req")

    def on_request(k: int, acceptance: float) -> None:
        bar.n = k + 1
        bar.set_postfix(acceptance=f"{acceptance:.2f}", refresh=False)
        bar.refresh()

    started = time.perf_counter()
    try:
        res = online_distill(target, draft, prompts, cfg, eos_token_id=tokenizer.eos_token_id,
                             checkpoint_dir=out / CHECKPOINT_DIR, on_request=on_request)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    model_dir = out / "model"
    with atomic_dir(model_dir) as tmp:
        draft.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        head_ids = Path(recipe.draft) / HEAD_IDS_FILE
        if head_ids.is_file():
            (tmp / HEAD_IDS_FILE).write_bytes(head_ids.read_bytes())
    write_jsonl(out / "online_history.jsonl", [
        {"request": k, "epoch": k // len(prompts), "prompt_id": ids[k % len(prompts)], "acceptance": a,
         "proposed": p, "accepted": c}
        for k, (a, p, c) in enumerate(zip(res.acceptance, res.proposed, res.accepted, strict=True))])
    metrics = stream_metrics(res)
    atomic_write_json(out / "metrics.json", metrics)
    write_manifest(out, "distill.online", inputs={"prompts": recipe.prompts}, config=recipe,
                   counts={"prompts": len(prompts), "requests": len(res.acceptance), "updates": res.updates,
                           "trained_positions": res.trained_positions},
                   timings={"serve_and_train": seconds},
                   extra={"metrics": metrics, "method": "online_kd", "placement": where.describe(),
                          "stopped_by": "epochs",
                          "stop_message": f"served all {len(res.acceptance)} requests ({cfg.epochs} epoch(s)); "
                                          f"{res.updates} updates"})
    return OnlineRunResult(model_dir, res, seconds, metrics)
