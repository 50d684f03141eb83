"""Draft initialisation: a layer-truncated copy of the target (`soaes_specdec.draft.make_layer_draft`) or a
smaller model of the same family sharing the tokenizer, plus an optional *restricted output head*.

A restricted head computes logits only for the S most frequent domain tokens (the rest get -inf) and maps
them back to the full vocabulary exactly: the draft is still a distribution over all V ids, with zero
probability outside S, so speculative decoding stays exact while the draft's head costs S/V of the full
one. The restriction is stored as `head_token_ids.json` beside a normal HF directory (full head kept), and
applied at load time by `load_draft`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soaes_core import DEFAULT_MODEL, atomic_write_json, load_model, load_tokenizer, write_manifest
from soaes_core.errors import InvalidArgumentError
from soaes_core.placement import Placement
from soaes_specdec.draft import (  # noqa: F401  (re-exported: the restricted head lives in soaes_specdec)
    HEAD_IDS_FILE,
    RestrictedLMHead,
    load_draft,
    make_layer_draft,
    restrict_output_head,
    unrestricted_copy,
)


def frequent_tokens(sequences: Iterable[Sequence[int]], size: int, always: Iterable[int] = ()) -> list[int]:
    """The `size` most frequent token ids in `sequences` (ties by id), plus every id in `always` (specials)."""
    if size < 1:
        raise InvalidArgumentError(f"head size must be ≥ 1, got {size}")
    counts: Counter[int] = Counter()
    for seq in sequences:
        counts.update(int(t) for t in seq)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    chosen = {t for t, _ in ranked[:size]}
    return sorted(chosen | {int(t) for t in always})


def freeze_embeddings(model: Any) -> None:
    """Stop gradients to the input embeddings and output head (tied in most drafts): cheaper steps on CPU."""
    model.get_input_embeddings().weight.requires_grad_(False)
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and head.weight.device.type != "meta":
        head.weight.requires_grad_(False)


def make_small_draft(target: Any, num_layers: int, hidden_size: int, intermediate_size: int,
                     num_attention_heads: int, num_key_value_heads: int, seed: int = 0) -> Any:
    """A randomly initialised model of the target's architecture and vocabulary, but smaller."""
    params = {**target.config.to_dict(), "num_hidden_layers": num_layers, "hidden_size": hidden_size,
              "intermediate_size": intermediate_size, "num_attention_heads": num_attention_heads,
              "num_key_value_heads": num_key_value_heads}
    for derived in ("head_dim", "layer_types", "max_window_layers"):
        params.pop(derived, None)
    cfg = target.config.__class__(**params)
    torch.manual_seed(seed)
    return type(target)(cfg).eval()


def save_draft(draft: Any, tokenizer: Any, out_dir: str | os.PathLike[str], head_token_ids: Sequence[int] | None,
               info: dict[str, Any]) -> Path:
    """`save_pretrained` the draft + tokenizer (+ `head_token_ids.json`) and a manifest.

    A draft whose head is already restricted is saved with a full head (`unrestricted_copy`) and its token ids,
    so the directory stays a normal HF model and `load_draft` rebuilds the same restricted draft.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = draft.get_output_embeddings()
    if isinstance(head, RestrictedLMHead):
        head_token_ids = head.token_ids.tolist() if head_token_ids is None else head_token_ids
        draft = unrestricted_copy(draft)
    draft.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if head_token_ids is not None:
        atomic_write_json(out / HEAD_IDS_FILE, {"token_ids": [int(t) for t in head_token_ids]})
    write_manifest(out, "distill.make_draft", counts={"parameters": sum(p.numel() for p in draft.parameters()),
                                                      "head_tokens": len(head_token_ids or [])}, extra=info)
    return out


SMALL_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


@dataclass
class MakeDraftConfig:
    """What `soaes-distill make-draft` builds: the target's first layers, or a smaller random model of its family."""

    output_dir: str = field(metadata={"help": "Output HF directory."})
    target: str = field(default=DEFAULT_MODEL, metadata={"help": "Target model spec."})
    num_layers: int = field(default=4, metadata={"help": "Decoder layers to keep (or to build, with small)."})
    head_tokens: int = field(default=0, metadata={
        "help": "Restrict the output head to this many frequent domain tokens (0 = full head)."})
    domain_data: str | None = field(default=None, metadata={
        "help": "Tokenized JSONL/Parquet whose token frequencies choose the head tokens."})
    small: list[int] | None = field(default=None, metadata={
        "help": "Instead of truncating, a random model with hidden size, intermediate size, heads, KV heads "
                "(four integers, e.g. 256,768,4,2)."})
    device: str = field(default="auto", metadata={
        "help": "Device the target is loaded on: auto (cuda when present, else cpu), cpu, cuda or cuda:N."})

    def __post_init__(self) -> None:
        if self.small is not None and len(self.small) != len(SMALL_KEYS):
            raise ValueError(f"small: expected four integers H,I,HEADS,KV, got {self.small}")
        if self.head_tokens < 0:
            raise ValueError(f"head_tokens must be >= 0, got {self.head_tokens}")
        Placement(device=self.device)  # one ConfigError (a ValueError) for a bad device


def make_draft(target_spec: str, out_dir: str | os.PathLike[str], num_layers: int = 4,
               head_tokens: int = 0, domain_sequences: Iterable[Sequence[int]] | None = None,
               small: dict[str, int] | None = None, dtype: Any = torch.float32, device: str = "auto") -> Path:
    """`soaes-distill make-draft`: derive a draft from `target_spec` and save it to `out_dir`.

    `small` (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads) builds a smaller random
    model instead of truncating layers. `head_tokens` > 0 restricts the head to that many frequent tokens of
    `domain_sequences` (plus the tokenizer's special tokens). `device` is a `Placement` device (`auto`: a GPU
    when present).
    """
    target = load_model(target_spec, dtype=dtype, device=Placement(device=device).resolve().device)
    tokenizer = load_tokenizer(target_spec)
    if small:
        draft = make_small_draft(target, num_layers, **small)
        kind = "small-config"
    else:
        draft = make_layer_draft(target, num_layers)
        kind = "first-layers"
    ids = None
    if head_tokens:
        if domain_sequences is None:
            raise InvalidArgumentError("a restricted head needs domain data to count token frequencies")
        ids = frequent_tokens(domain_sequences, head_tokens, always=tokenizer.all_special_ids)
    info = {"target": target_spec, "kind": kind, "num_layers": num_layers, "head_tokens": head_tokens}
    return save_draft(draft, tokenizer, out_dir, ids, info)
