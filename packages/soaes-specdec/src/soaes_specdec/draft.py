"""Draft models: derive one from a target by keeping its first k decoder layers (plus final norm and head),
and load saved drafts, applying a *restricted output head* when one is recorded.

A layer-truncated copy shares the target's tokenizer, embeddings and (tied) output head, so it is a
valid speculative draft out of the box and a good initialisation for distillation. A restricted head
computes logits only for a subset S of the vocabulary (the rest get -inf) and returns full-vocabulary
logits, so decoding stays exact while the draft's head costs S/V of the full one; it is stored as
`head_token_ids.json` beside a normal HF directory and applied by `load_draft`. A draft loaded for a target
must share the target's tokenizer (same ids for the same tokens, same special tokens), which `load_draft`
checks by fingerprint when it is told the target: equal vocabulary sizes alone let a foreign tokenizer through.
`load_any_draft` loads either a layer draft or a feature-conditioned one (`feature_draft.FeatureDraft`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from soaes_core import load_model, load_tokenizer, tokenizer_fingerprint
from soaes_core.errors import InvalidArgumentError, ModelLoadError


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


HEAD_IDS_FILE = "head_token_ids.json"


class RestrictedLMHead(torch.nn.Module):
    """Output head over a token subset `token_ids`, returning full-vocabulary logits (-inf elsewhere)."""

    def __init__(self, full_weight: torch.Tensor, token_ids: Sequence[int]) -> None:
        super().__init__()
        ids = torch.tensor(sorted(set(int(t) for t in token_ids)), dtype=torch.long)
        vocab, hidden = full_weight.shape
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise InvalidArgumentError(f"restricted head token ids must be non-empty and in [0, {vocab})")
        self.sub_weight = torch.nn.Parameter(full_weight.detach()[ids].clone())
        self.register_buffer("token_ids", ids.to(full_weight.device), persistent=False)
        self.vocab_size = vocab
        # shape stand-in (meta tensor, no memory) so code that reads `head.weight.shape` sees (V, hidden)
        self._shape = torch.empty((vocab, hidden), device="meta")

    @property
    def weight(self) -> torch.Tensor:
        return self._shape

    def forward(self, hidden: torch.Tensor, linear: Callable[..., torch.Tensor] = torch.nn.functional.linear,
                ) -> torch.Tensor:
        """Full-vocabulary logits; `linear(x, weight)` computes the kept rows (the runner passes `stream_linear`)."""
        sub = linear(hidden, self.sub_weight)
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.token_ids, sub)


def restrict_output_head(model: Any, token_ids: Sequence[int]) -> Any:
    """Replace `model`'s output head (in place) by a `RestrictedLMHead` over `token_ids`; returns `model`."""
    full = model.get_output_embeddings().weight
    head = RestrictedLMHead(full, token_ids)
    model.config.tie_word_embeddings = False  # the head is no longer the embedding matrix
    model.set_output_embeddings(head)
    return model


def unrestricted_copy(model: Any) -> Any:
    """A copy of `model` whose `RestrictedLMHead` is replaced by a full linear head, for `save_pretrained`.

    The kept tokens' rows come from the restricted head (they may have been trained after the restriction);
    the other rows from the input embeddings (what the tied head held), or zeros when the shapes differ. Saved
    with `head_token_ids.json`, `load_draft` restores exactly the restricted draft; without it the directory is
    an ordinary untied HF model.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, RestrictedLMHead):
        return model
    embed = model.get_input_embeddings().weight
    vocab, hidden = head.weight.shape
    full = embed.detach().clone() if tuple(embed.shape) == (vocab, hidden) else head.sub_weight.new_zeros(vocab, hidden)
    full[head.token_ids] = head.sub_weight.detach()
    out = copy.deepcopy(model)
    linear = torch.nn.Linear(hidden, vocab, bias=False, device=full.device, dtype=full.dtype)
    linear.weight = torch.nn.Parameter(full)
    out.set_output_embeddings(linear)
    out.config.tie_word_embeddings = False
    return out


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
    from .feature_draft import FEATURE_DRAFT_FILE, is_feature_draft_dir

    if is_feature_draft_dir(spec):
        raise ModelLoadError(f"draft {str(spec)!r} is a feature-conditioned draft ({FEATURE_DRAFT_FILE}): it reads the "
                             "target's hidden states and cannot run as a layer draft; load it with "
                             "soaes_specdec.draft.load_any_draft or FeatureDraft.from_pretrained")
    if target is not None:
        check_draft_tokenizer(target, spec, target_tokenizer=target_tokenizer)
    return load_hf_draft(spec, dtype=dtype, device=device, restrict_head=restrict_head)


def load_hf_draft(spec: str | os.PathLike[str], dtype: Any = None, device: Any = None,
                  restrict_head: bool = True) -> Any:
    """The HF causal LM of a draft directory (restricted head applied when recorded), with no kind or tokenizer
    check: `load_draft` for layer drafts, `FeatureDraft.from_pretrained` for a feature draft's 1-layer model."""
    model = load_model(str(spec), dtype=dtype, device=device)
    ids_file = Path(str(spec)) / HEAD_IDS_FILE
    if restrict_head and ids_file.is_file():
        try:
            ids = json.loads(ids_file.read_text(encoding="utf-8"))["token_ids"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ModelLoadError(f"{ids_file}: unreadable restricted-head token ids ({err})") from None
        restrict_output_head(model, ids)
    return model.eval()


def load_any_draft(spec: str | os.PathLike[str], dtype: Any = None, device: Any = None,
                   restrict_head: bool = True, target: str | os.PathLike[str] | None = None,
                   target_tokenizer: Any = None, allow_other_target: bool = False) -> Any:
    """A draft of either kind: a `FeatureDraft` when `spec` is a feature-draft directory (`is_feature_draft_dir`),
    else a layer draft (`load_draft`); with `target`, the tokenizer is checked against the target's first. Both
    kinds go straight into `SpeculativeDecoder(target, draft)`, which refuses a feature draft trained for another
    target unless `allow_other_target`."""
    from .feature_draft import FeatureDraft, is_feature_draft_dir

    if not is_feature_draft_dir(spec):
        return load_draft(spec, dtype=dtype, device=device, restrict_head=restrict_head, target=target,
                          target_tokenizer=target_tokenizer)
    if target is not None:
        check_draft_tokenizer(target, spec, target_tokenizer=target_tokenizer)
    return FeatureDraft.from_pretrained(spec, dtype=dtype, device=device, restrict_head=restrict_head,
                                        allow_other_target=allow_other_target)
