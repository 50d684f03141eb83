"""Restricted output heads and the HF model of a saved draft directory: what layer drafts (`draft`) and feature drafts
(`feature_draft`) share, in a module of its own so neither imports the other.

A restricted head computes logits only for a subset S of the vocabulary (the rest get -inf) and returns
full-vocabulary logits, so decoding stays exact while the head costs S/V of the full one; it is stored as
`head_token_ids.json` beside a normal HF directory and applied on load.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from soaes_core import load_model
from soaes_core.errors import InvalidArgumentError, ModelLoadError

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
