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

Two layouts: `soaes` (the layer keeps its input norm, a final norm follows it, `fc` has a bias) and `engine`, the
EAGLE-1 layout vLLM and SGLang run (layer 0's input norm and the final norm are identities, `fc` has no bias), which
`soaes_specdec.eagle_export` writes out for those engines without changing what it computes. The draft records a
fingerprint of the target it was built for (`target_fingerprint`), and `check_draft_target` refuses to pair it with
another (shape-compatible) target unless told to.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from soaes_core.errors import InvalidArgumentError, ModelLoadError

from .restricted_head import HEAD_IDS_FILE, RestrictedLMHead, load_hf_draft, unrestricted_copy

FEATURE_DRAFT_FILE = "feature_draft.json"
FC_FILE = "feature_fc.safetensors"
FORMAT = "soaes-feature-draft"
FORMAT_VERSION = 1  # the `soaes` layout; the `engine` layout is written as version 2, which older readers refuse
ENGINE_FORMAT_VERSION = 2
LAYOUTS = ("soaes", "engine")
FINGERPRINT_SAMPLES = 4  # values read per parameter tensor
FINGERPRINT_RTOL = 2.0 ** -7  # above bfloat16/float16 rounding: the same weights loaded in another dtype still match

logger = logging.getLogger(__name__)


class DraftTargetMismatchError(InvalidArgumentError):
    """A feature draft paired with a target other than the one it was trained for (its features mean other things)."""


def target_fingerprint(model: Any) -> dict[str, Any]:
    """Identity of a target's weights: a hash of its parameter names and shapes, and `FINGERPRINT_SAMPLES` evenly
    spaced values of every parameter (rounded to bfloat16, so the same weights in fp32 or bf16 give the same
    record). Cheap (no full pass over the weights), yet any fine-tune moves most sampled values."""
    names = hashlib.sha256()
    values: list[float] = []
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        names.update(f"{name}:{tuple(p.shape)};".encode())
        flat = p.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        k, n = min(FINGERPRINT_SAMPLES, flat.numel()), flat.numel()
        idx = torch.arange(k, dtype=torch.long) * (n - 1) // max(1, k - 1)  # integer spacing: exact for any size
        values += flat[idx.to(flat.device)].float().cpu().to(torch.bfloat16).float().tolist()
    digest = hashlib.sha256(torch.tensor(values, dtype=torch.float32).numpy().tobytes()).hexdigest()
    return {"structure_sha256": names.hexdigest(), "values_sha256": digest, "values": values}


def same_target(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """True when two `target_fingerprint`s are of the same weights (equal structure; every sampled value equal up to
    `FINGERPRINT_RTOL`, which absorbs dtype rounding)."""
    if recorded.get("structure_sha256") != current.get("structure_sha256"):
        return False
    if recorded.get("values_sha256") == current.get("values_sha256"):
        return True
    a = torch.tensor(recorded.get("values") or [], dtype=torch.float64)
    b = torch.tensor(current.get("values") or [], dtype=torch.float64)
    if a.shape != b.shape:
        return False
    return bool(((a - b).abs() <= FINGERPRINT_RTOL * torch.maximum(a.abs(), b.abs()) + 1e-6).all())


def check_draft_target(draft: FeatureDraft, target: Any, allow_other_target: bool | None = None) -> None:
    """Refuse (`DraftTargetMismatchError`, one line) to pair `draft` with a `target` other than the one it was built
    for; a draft saved without the record (older soaes) passes with a one-line warning. `allow_other_target`
    (default: the draft's own `allow_other_target`) skips the check."""
    allow = draft.allow_other_target if allow_other_target is None else allow_other_target
    if allow:
        return
    recorded = draft.target_identity
    if recorded is None:
        if not draft._warned_no_identity:
            logger.warning("this feature draft has no record of the target it was trained for (saved by an older "
                           "soaes): it cannot be checked against this target")
            draft._warned_no_identity = True
        return
    current = target_fingerprint(target)
    if not same_target(recorded, current):
        what = ("a differently shaped model" if recorded.get("structure_sha256") != current["structure_sha256"]
                else "other weights")
        raise DraftTargetMismatchError(
            f"this feature draft was trained for another target (recorded target weights "
            f"{str(recorded.get('values_sha256'))[:12]}, this target {current['values_sha256'][:12]}: {what}): it "
            "reads the target's hidden states, which mean other things here; pair it with its own target, or pass "
            "allow_other_target=True (--allow-other-target) if that is really meant")


def is_feature_draft_dir(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a directory saved by `FeatureDraft.save_pretrained`."""
    return (Path(str(path)) / FEATURE_DRAFT_FILE).is_file()


def feature_draft_layout(path: str | os.PathLike[str]) -> str | None:
    """The layout (`soaes` | `engine`) of a saved feature draft, None when `path` is not one (or is unreadable)."""
    try:
        meta = json.loads((Path(str(path)) / FEATURE_DRAFT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return str(meta.get("layout", "soaes")) if isinstance(meta, dict) else None


class FeatureDraft(torch.nn.Module):
    """`fc` (2H -> H) + `lm`, a 1-layer causal LM of the target's class whose embeddings and head are the
    target's (frozen by default). `lm.model.norm` is the draft's own final norm."""

    def __init__(self, lm: Any, fc: torch.nn.Linear, layout: str = "soaes",
                 target_identity: dict[str, Any] | None = None) -> None:
        super().__init__()
        hidden = lm.config.hidden_size
        if tuple(fc.weight.shape) != (hidden, 2 * hidden):
            raise InvalidArgumentError(f"feature draft fc must map {2 * hidden} -> {hidden} features, "
                                       f"got weight {tuple(fc.weight.shape)}")
        if layout not in LAYOUTS:
            raise InvalidArgumentError(f"feature draft layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if (fc.bias is None) != (layout == "engine"):
            raise InvalidArgumentError(f"the {layout} layout's fc {'has no' if layout == 'engine' else 'has a'} bias")
        self.lm = lm
        self.fc = fc
        self.layout = layout
        self.target_identity = target_identity  # `target_fingerprint` of the target it was built for (None: unknown)
        self.allow_other_target = False  # skip `check_draft_target` (set by loaders told so)
        self._warned_no_identity = False
        if layout == "engine":
            _strip_engine_norms(lm)

    @property
    def config(self) -> Any:
        return self.lm.config

    @property
    def hidden_size(self) -> int:
        return int(self.lm.config.hidden_size)

    @classmethod
    def from_target(cls, target: Any, layer: int | None = None, freeze_embeddings: bool = True,
                    layout: str = "soaes") -> FeatureDraft:
        """A fresh draft for `target`: its decoder layer `layer` (default: the last) and final norm copied as the
        starting point, `fc` initialised to pass the feature through (`[0 | I]`), embeddings and head shared
        copies of the target's, frozen when `freeze_embeddings`. `layout="engine"` drops layer 0's input norm, the
        final norm and fc's bias (what vLLM/SGLang run); the target's fingerprint is recorded either way."""
        if layout not in LAYOUTS:
            raise InvalidArgumentError(f"feature draft layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
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
        fc = torch.nn.Linear(2 * hidden, hidden, bias=layout == "soaes", device=param.device, dtype=param.dtype)
        with torch.no_grad():
            fc.weight.zero_()
            fc.weight[:, hidden:] = torch.eye(hidden, dtype=param.dtype, device=param.device)
            if fc.bias is not None:
                fc.bias.zero_()
        draft = cls(lm, fc, layout=layout, target_identity=target_fingerprint(target))
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
        `head_token_ids.json`, as layer drafts are saved. `tokenizer` (the target's) is saved
        beside it when given: `load_any_draft(..., target=)` checks it against the target's."""
        from safetensors.torch import save_file

        from soaes_core.atomic import atomic_write_json, temp_path

        out = Path(str(out_dir))
        out.mkdir(parents=True, exist_ok=True)
        (out / FEATURE_DRAFT_FILE).unlink(missing_ok=True)  # marker last: a cut-short save is no feature draft
        head = self.lm.get_output_embeddings()
        with _hf_savable(self.lm, self.layout):
            unrestricted_copy(self.lm).save_pretrained(out, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        if isinstance(head, RestrictedLMHead):
            atomic_write_json(out / HEAD_IDS_FILE, {"token_ids": head.token_ids.tolist()})
        else:
            (out / HEAD_IDS_FILE).unlink(missing_ok=True)  # a stale restriction from an earlier save
        tmp = temp_path(out / FC_FILE)
        tensors = {"weight": self.fc.weight.detach().contiguous()}
        if self.fc.bias is not None:
            tensors["bias"] = self.fc.bias.detach().contiguous()
        save_file(tensors, str(tmp))
        os.replace(tmp, out / FC_FILE)
        version = ENGINE_FORMAT_VERSION if self.layout == "engine" else FORMAT_VERSION
        meta = {"format": FORMAT, "version": version, "hidden_size": self.hidden_size, "fc_file": FC_FILE,
                "layout": self.layout, "target": self.target_identity}
        atomic_write_json(out / FEATURE_DRAFT_FILE, meta)
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], dtype: Any = None, device: Any = None,
                        restrict_head: bool = True, allow_other_target: bool = False) -> FeatureDraft:
        """Load a directory written by `save_pretrained` (restricted head applied when recorded); with
        `allow_other_target` the draft skips the check against its recorded target when paired."""
        from safetensors.torch import load_file

        root = Path(str(path))
        meta_file = root / FEATURE_DRAFT_FILE
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"{meta_file}: not a readable feature-draft file ({err})") from None
        if meta.get("format") != FORMAT or meta.get("version") not in (FORMAT_VERSION, ENGINE_FORMAT_VERSION):
            raise ModelLoadError(f"{meta_file}: unsupported feature-draft format {meta.get('format')!r} version "
                                 f"{meta.get('version')!r} (this soaes-specdec reads {FORMAT} v{FORMAT_VERSION} and "
                                 f"v{ENGINE_FORMAT_VERSION})")
        layout = meta.get("layout", "soaes")
        if layout not in LAYOUTS or (layout == "engine") != (meta["version"] == ENGINE_FORMAT_VERSION):
            raise ModelLoadError(f"{meta_file}: layout {layout!r} does not match format version {meta['version']}")
        identity = meta.get("target")
        if identity is not None and not isinstance(identity, dict):
            raise ModelLoadError(f"{meta_file}: field 'target' must be an object (the target's fingerprint)")
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
        expected = {"weight": (hidden, 2 * hidden), **({"bias": (hidden,)} if layout == "soaes" else {})}
        if shapes != expected:
            raise ModelLoadError(f"{fc_path}: expected fc tensors {expected} for the {layout} layout, got {shapes}")
        param = next(lm.parameters())
        fc = torch.nn.Linear(2 * hidden, hidden, bias=layout == "soaes", device=param.device, dtype=param.dtype)
        with torch.no_grad():
            fc.weight.copy_(tensors["weight"])
            if fc.bias is not None:
                fc.bias.copy_(tensors["bias"])
        draft = cls(lm, fc, layout=layout, target_identity=identity)
        draft.allow_other_target = allow_other_target
        return draft.eval()


def _strip_engine_norms(lm: Any) -> None:
    """The engine layout in place: layer 0's input norm and the final norm become identities."""
    lm.model.layers[0].input_layernorm = torch.nn.Identity()
    lm.model.norm = torch.nn.Identity()


@contextlib.contextmanager
def _hf_savable(lm: Any, layout: str) -> Iterator[None]:
    """While saving an engine-layout draft, unit-weight norms stand in for its identities, so the HF directory is
    complete (no "newly initialised weights" on load); `from_pretrained` strips them again."""
    if layout != "engine":
        yield
        return
    layer = lm.model.layers[0]
    ref = layer.post_attention_layernorm
    eps = getattr(ref, "variance_epsilon", getattr(ref, "eps", 1e-6))

    def unit() -> Any:
        norm = copy.deepcopy(ref)
        with torch.no_grad():
            norm.weight.fill_(1.0)
        norm.variance_epsilon = eps
        return norm

    saved = (layer.input_layernorm, lm.model.norm)
    layer.input_layernorm, lm.model.norm = unit(), unit()
    try:
        yield
    finally:
        layer.input_layernorm, lm.model.norm = saved
