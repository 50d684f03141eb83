"""Draft models: derive one from a target by keeping its first k decoder layers (plus final norm and head),
and load saved drafts, applying a *restricted output head* (`restricted_head`) when one is recorded.

A layer-truncated copy shares the target's tokenizer, embeddings and (tied) output head, so it is a
valid speculative draft out of the box and a good initialisation for distillation. A draft loaded for a target
must share the target's tokenizer (same ids for the same tokens, same special tokens), which `load_draft`
checks by fingerprint when it is told the target: equal vocabulary sizes alone let a foreign tokenizer through.
`load_any_draft` loads either a layer draft or a feature-conditioned one (`feature_draft.FeatureDraft`).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from soaes_core import load_tokenizer, tokenizer_fingerprint
from soaes_core.errors import InvalidArgumentError, ModelLoadError

from .feature_draft import FEATURE_DRAFT_FILE, FeatureDraft, is_feature_draft_dir
from .restricted_head import (
    HEAD_IDS_FILE,
    RestrictedLMHead,
    load_hf_draft,
    restrict_output_head,
    unrestricted_copy,
)

__all__ = [
    "HEAD_IDS_FILE", "DraftTokenizerMismatchError", "RestrictedLMHead", "check_draft_tokenizer", "load_any_draft",
    "load_draft", "load_hf_draft", "make_layer_draft", "restrict_output_head", "unrestricted_copy",
]


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


class DraftTokenizerMismatchError(ModelLoadError):
    """A draft's tokenizer differs from its target's: its proposals would mean other tokens (~0 % accepted)."""


def check_draft_tokenizer(target: str | os.PathLike[str], draft: str | os.PathLike[str],
                          target_tokenizer: Any = None, draft_tokenizer: Any = None) -> None:
    """Refuse (`DraftTokenizerMismatchError`, one line naming both) a draft whose tokenizer is not the target's.

    Compares `tokenizer_fingerprint(..., ids_only=True)`: the token <-> id mapping and the special tokens,
    all a draft shares with its target. Tokenizers are loaded from the specs unless given.
    """
    def load(role: str, spec: str | os.PathLike[str]) -> Any:
        try:
            tok = load_tokenizer(str(spec))
            reason = None
        except ModelLoadError as err:
            reason = str(err)
        if reason is None and len(tok.get_vocab()) <= 1:  # transformers' stand-in for a directory without one
            reason = "no tokenizer files"
        if reason is not None:
            raise DraftTokenizerMismatchError(
                f"cannot check that draft {str(draft)!r} shares target {str(target)!r}'s tokenizer: the {role} has "
                f"no loadable tokenizer ({reason}); save the target's tokenizer beside the draft")
        return tok

    t_tok = target_tokenizer if target_tokenizer is not None else load("target", target)
    d_tok = draft_tokenizer if draft_tokenizer is not None else load("draft", draft)
    if tokenizer_fingerprint(t_tok, ids_only=True) != tokenizer_fingerprint(d_tok, ids_only=True):
        sizes = f"{len(d_tok)} vs {len(t_tok)} tokens"
        raise DraftTokenizerMismatchError(
            f"draft {str(draft)!r} and target {str(target)!r} have different tokenizers (vocabulary or special "
            f"tokens differ; {sizes}): speculative decoding needs the draft to use the target's tokenizer")


def load_draft(spec: str | os.PathLike[str], dtype: Any = None, device: Any = None,
               restrict_head: bool = True, target: str | os.PathLike[str] | None = None,
               target_tokenizer: Any = None) -> Any:
    """Load a draft saved by `save_draft`; applies its restricted head when `head_token_ids.json` exists.

    With `target` (its spec or name) the draft's tokenizer is first checked against the target's
    (`check_draft_tokenizer`; `target_tokenizer` saves reloading it). A feature-draft directory is refused: its
    1-layer model reads the target's hidden states and is no stand-alone draft (`load_any_draft` loads both kinds).
    """
    if is_feature_draft_dir(spec):
        raise ModelLoadError(f"draft {str(spec)!r} is a feature-conditioned draft ({FEATURE_DRAFT_FILE}): it reads the "
                             "target's hidden states and cannot run as a layer draft; load it with "
                             "soaes_specdec.draft.load_any_draft or FeatureDraft.from_pretrained")
    if target is not None:
        check_draft_tokenizer(target, spec, target_tokenizer=target_tokenizer)
    return load_hf_draft(spec, dtype=dtype, device=device, restrict_head=restrict_head)


def load_any_draft(spec: str | os.PathLike[str], dtype: Any = None, device: Any = None,
                   restrict_head: bool = True, target: str | os.PathLike[str] | None = None,
                   target_tokenizer: Any = None, allow_other_target: bool = False) -> Any:
    """A draft of either kind: a `FeatureDraft` when `spec` is a feature-draft directory (`is_feature_draft_dir`),
    else a layer draft (`load_draft`); with `target`, the tokenizer is checked against the target's first. Both
    kinds go straight into `SpeculativeDecoder(target, draft)`, which refuses a feature draft trained for another
    target unless `allow_other_target`."""
    if not is_feature_draft_dir(spec):
        return load_draft(spec, dtype=dtype, device=device, restrict_head=restrict_head, target=target,
                          target_tokenizer=target_tokenizer)
    if target is not None:
        check_draft_tokenizer(target, spec, target_tokenizer=target_tokenizer)
    return FeatureDraft.from_pretrained(spec, dtype=dtype, device=device, restrict_head=restrict_head,
                                        allow_other_target=allow_other_target)
