"""Derive a draft model from a target by keeping its first k decoder layers (plus final norm and head).

A layer-truncated copy shares the target's tokenizer, embeddings and (tied) output head, so it is a
valid speculative draft out of the box and a good initialisation for distillation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from soaes_core.errors import InvalidArgumentError


def _decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder-layer list of an HF causal LM (Llama/Qwen2/Mistral style: `model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise InvalidArgumentError(
            f"cannot derive a layer draft from {type(model).__name__}: expected `model.model.layers` "
            "(Llama/Qwen2-style decoder)")
    return layers


def make_layer_draft(target: Any, num_layers: int) -> Any:
    """Return a deep copy of `target` keeping only its first `num_layers` decoder layers.

    The final norm, embeddings and output head are kept (a tied head stays tied to the copy's
    embeddings). The config is updated (`num_hidden_layers`, `layer_types`, `max_window_layers`) so the
    result can be saved with `save_pretrained` and reloaded.
    """
    n_total = len(_decoder_layers(target))
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not 1 <= num_layers <= n_total:
        raise InvalidArgumentError(f"num_layers must be an int in [1, {n_total}], got {num_layers!r}")
    draft = copy.deepcopy(target)
    layers = _decoder_layers(draft)
    draft.model.layers = torch.nn.ModuleList(list(layers)[:num_layers])
    cfg = draft.config
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[:num_layers]
    if getattr(cfg, "max_window_layers", None) is not None:
        cfg.max_window_layers = min(cfg.max_window_layers, num_layers)
    if getattr(cfg, "tie_word_embeddings", False):
        draft.tie_weights()
    return draft.eval()
