"""Feature-conditioned draft head (EAGLE-style, Li et al. 2024): one decoder layer that reads the target's last
hidden states instead of re-deriving them from tokens.

At target position p the draft's input is `fc(cat(embed(x[p+1]), f[p]))`, where f[p] is the target's post-norm
last hidden state at p (what the target's head reads) and x[p+1] the token that followed. One decoder layer of
the target's architecture (with its own KV cache) and the final norm turn it into g[p], a prediction of f[p+1];
the target's (frozen, optionally restricted) head on g[p] proposes x[p+2]. Further draft tokens feed g back as
the feature. Verification is the ordinary target pass, so decoding stays exact; the head only changes what is
proposed, at the cost of one layer plus a (restricted) head per draft token. `SpeculativeDecoder(target, draft)`
decodes with it (`feature_runner.FeatureDraftRunner`): the target's prefill and verify passes return their
hidden states, and after each verify the draft catches up on the accepted rows with the true features.

Saved as a directory: the 1-layer causal LM by `save_pretrained` (an ordinary HF model directory), `fc` in
`feature_fc.safetensors`, and `feature_draft.json` marking the kind; `head_token_ids.json` when the head is
restricted, and the target's tokenizer files (`save_pretrained(..., tokenizer=)`), as for layer drafts.
`feature_draft.json` is written last, so a directory cut short by a crash is not taken for a feature draft.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from soaes_core.errors import InvalidArgumentError, ModelLoadError

FEATURE_DRAFT_FILE = "feature_draft.json"
FC_FILE = "feature_fc.safetensors"
FORMAT = "soaes-feature-draft"
FORMAT_VERSION = 1


def is_feature_draft_dir(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a directory saved by `FeatureDraft.save_pretrained`."""
    return (Path(str(path)) / FEATURE_DRAFT_FILE).is_file()


class FeatureDraft(torch.nn.Module):
    """`fc` (2H -> H) + `lm`, a 1-layer causal LM of the target's class whose embeddings and head are the
    target's (frozen by default). `lm.model.norm` is the draft's own final norm."""

    def __init__(self, lm: Any, fc: torch.nn.Linear) -> None:
        super().__init__()
        hidden = lm.config.hidden_size
        if tuple(fc.weight.shape) != (hidden, 2 * hidden):
            raise InvalidArgumentError(f"feature draft fc must map {2 * hidden} -> {hidden} features, "
                                       f"got weight {tuple(fc.weight.shape)}")
        self.lm = lm
        self.fc = fc

    @property
    def config(self) -> Any:
        return self.lm.config

    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    @classmethod
    def from_target(cls, target: Any, layer: int | None = None, freeze_embeddings: bool = True) -> FeatureDraft:
        """A fresh draft for `target`: its decoder layer `layer` (default: the last) and final norm copied as the
        starting point, `fc` initialised to pass the feature through (`[0 | I]`), embeddings and head shared
        copies of the target's, frozen when `freeze_embeddings`."""
        layers = getattr(getattr(target, "model", None), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not hasattr(target.model, "norm"):
            raise InvalidArgumentError(f"a feature draft needs a Llama/Qwen2-style target (`model.layers`), "
                                       f"got {type(target).__name__}")
        idx = len(layers) - 1 if layer is None else layer
        if not 0 <= idx < len(layers):
            raise InvalidArgumentError(f"layer must be in [0, {len(layers)}), got {layer!r}")
        lm = copy.deepcopy(target)
        lm.model.layers = torch.nn.ModuleList([lm.model.layers[idx]])
        cfg = lm.config
        cfg.num_hidden_layers = 1
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [list(cfg.layer_types)[idx]]
        if getattr(cfg, "max_window_layers", None) is not None:
            cfg.max_window_layers = min(cfg.max_window_layers, 1)
        lm.model.layers[0].self_attn.layer_idx = 0
        if getattr(cfg, "tie_word_embeddings", False):
            lm.tie_weights()
        hidden = cfg.hidden_size
        param = next(target.parameters())
        fc = torch.nn.Linear(2 * hidden, hidden, bias=True, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            fc.weight.zero_()
            fc.weight[:, hidden:] = torch.eye(hidden, dtype=param.dtype, device=param.device)
            fc.bias.zero_()
        draft = cls(lm, fc)
        if freeze_embeddings:
            draft.freeze_embeddings()
        return draft.eval()

    def freeze_embeddings(self) -> None:
        """Freeze the (target's) input embeddings and output head: only fc, the layer and the norm train."""
        for module in (self.lm.get_input_embeddings(), self.lm.get_output_embeddings()):
            for p in module.parameters():
                p.requires_grad_(False)

    def input_embeds(self, features: torch.Tensor, input_ids: torch.Tensor,
                     linear: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """The layer input [B, T, H]: fc(cat(embed(input_ids), features)); features [B, T, H] are the target's
        post-norm hidden states at the positions *before* input_ids. `linear(x, weight, bias)` computes fc when
        given (the decoder passes the runner's `stream_linear`); default `fc`'s own forward."""
        emb = self.lm.get_input_embeddings()(input_ids)
        x = torch.cat([emb, features.to(emb.dtype)], dim=-1)
        return self.fc(x) if linear is None else linear(x, self.fc.weight, self.fc.bias)

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Training/reference forward over whole sequences (HF attention, causal): predicted next features
        [B, T, H] (post-norm, what `logits` reads). `attention_mask` [B, T] marks real tokens (1) vs padding."""
        out = self.lm.model(inputs_embeds=self.input_embeds(features, input_ids), attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of predicted features through the (possibly restricted) head."""
        return self.lm.get_output_embeddings()(hidden)

    def save_pretrained(self, out_dir: str | os.PathLike[str], tokenizer: Any = None) -> Path:
        """Write the draft directory (see the module docstring); a restricted head is saved as a full head plus
        `head_token_ids.json`, as `soaes_specdec.draft` does for layer drafts. `tokenizer` (the target's) is saved
        beside it when given: `load_any_draft(..., target=)` checks it against the target's."""
        from safetensors.torch import save_file

        from soaes_core.atomic import atomic_write_json, temp_path

        from .draft import HEAD_IDS_FILE, RestrictedLMHead, unrestricted_copy

        out = Path(str(out_dir))
        out.mkdir(parents=True, exist_ok=True)
        (out / FEATURE_DRAFT_FILE).unlink(missing_ok=True)  # marker last: a cut-short save is no feature draft
        head = self.lm.get_output_embeddings()
        unrestricted_copy(self.lm).save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        if isinstance(head, RestrictedLMHead):
            atomic_write_json(out / HEAD_IDS_FILE, {"token_ids": head.token_ids.tolist()})
        else:
            (out / HEAD_IDS_FILE).unlink(missing_ok=True)  # a stale restriction from an earlier save
        tmp = temp_path(out / FC_FILE)
        save_file({"weight": self.fc.weight.detach().contiguous(), "bias": self.fc.bias.detach().contiguous()},
                  str(tmp))
        os.replace(tmp, out / FC_FILE)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "hidden_size": self.hidden_size, "fc_file": FC_FILE}
        atomic_write_json(out / FEATURE_DRAFT_FILE, meta)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], dtype: Any = None, device: Any = None,
                        restrict_head: bool = True) -> FeatureDraft:
        """Load a directory written by `save_pretrained` (restricted head applied when recorded)."""
        from safetensors.torch import load_file

        from .draft import load_hf_draft

        root = Path(str(path))
        meta_file = root / FEATURE_DRAFT_FILE
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"{meta_file}: not a readable feature-draft file ({err})") from None
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ModelLoadError(f"{meta_file}: unsupported feature-draft format {meta.get('format')!r} version "
                                 f"{meta.get('version')!r} (this soaes-specdec reads {FORMAT} v{FORMAT_VERSION})")
        lm = load_hf_draft(root, dtype=dtype, device=device, restrict_head=restrict_head)
        hidden = int(lm.config.hidden_size)
        if meta.get("hidden_size") != hidden:
            raise ModelLoadError(f"{meta_file}: hidden_size {meta.get('hidden_size')!r} but the draft model's config "
                                 f"says {hidden}")
        fc_path = root / str(meta.get("fc_file", FC_FILE))
        try:
            tensors = load_file(str(fc_path))
        except Exception as err:  # OSError, or safetensors' own error types
            raise ModelLoadError(f"{fc_path}: cannot read the feature draft's fc weights ({err})") from None
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if shapes != {"weight": (hidden, 2 * hidden), "bias": (hidden,)}:
            raise ModelLoadError(f"{fc_path}: expected fc tensors weight {(hidden, 2 * hidden)} and bias {(hidden,)}, "
                                 f"got {shapes}")
        param = next(lm.parameters())
        fc = torch.nn.Linear(2 * hidden, hidden, bias=True, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            fc.weight.copy_(tensors["weight"])
            fc.bias.copy_(tensors["bias"])
        return cls(lm, fc).eval()
