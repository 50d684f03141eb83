"""Export an engine-layout feature draft (`FeatureDraft(layout="engine")`) as the EAGLE-1 draft folder vLLM or SGLang
loads as it stands, with the exact serve command in its README.

What the engines run (vLLM vllm/model_executor/models/llama_eagle.py, SGLang python/sglang/srt/models/llama_eagle.py):
`fc(cat(embed(x), h))` (vLLM's fc has no bias, SGLang's has one), one Llama decoder layer whose input norm is an
identity, no final norm, then the *target's* head; `embed_tokens` and `lm_head` come from the target. The folder
holds `config.json` (a 1-layer Llama: `LlamaForCausalLM`, which vLLM renames to `EagleLlamaForCausalLM`, or
SGLang's `LlamaForCausalLMEagle`; the target's sizes; a Qwen2 target's q/k/v biases as `attention_bias: true`,
which both engines' Llama layers read as q/k/v *and* o_proj biases, so a zero `o_proj.bias` is written),
`model.safetensors` under the exact names the engines' `load_weights` map (`fc.weight`, `layers.0.*`,
`embed_tokens.weight`; no `lm_head`, which vLLM's EAGLE loader would reject), for SGLang a zero `fc.bias` (its
Linear would otherwise keep a random init) and, for a restricted head, `token_map.pt` (the kept token ids, which
SGLang's `--speculative-token-map` turns into the head's rows); vLLM's EAGLE-1 always proposes over the full
vocabulary. The export refuses a draft whose embeddings or head rows differ from the target's (the engines would
not use them) and a `soaes`-layout draft (no weight mapping computes the same function).
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soaes_core import atomic_write_json, load_model, load_tokenizer
from soaes_core.atomic import atomic_dir, atomic_write_text
from soaes_core.errors import InvalidArgumentError

from .draft import RestrictedLMHead, check_draft_tokenizer
from .feature_draft import FeatureDraft, check_draft_target, is_feature_draft_dir

FORMATS = ("vllm-eagle", "sglang-eagle")
WEIGHTS_FILE = "model.safetensors"
TOKEN_MAP_FILE = "token_map.pt"
README = "README.md"
RESULT_FILE = "export.json"
ARCHITECTURE = {"vllm-eagle": "LlamaForCausalLM", "sglang-eagle": "LlamaForCausalLMEagle"}
SAMPLE_PROMPT = "什么是国有资本投资公司？"


@dataclass(frozen=True)
class EagleExportResult:
    """What `export_eagle` wrote: the draft folder (absolute, as served), its format, the target it pairs with, the
    draft tokens per step, the size of the restricted head (0 = full vocabulary) and the files written."""

    draft_dir: Path
    format: str
    target_dir: Path
    num_speculative_tokens: int
    head_tokens: int = 0
    files: list[str] = field(default_factory=list)

    def serve_command(self) -> str:
        """The exact command that serves the target with this draft."""
        target, draft, n = shlex.quote(str(self.target_dir)), str(self.draft_dir), self.num_speculative_tokens
        if self.format == "vllm-eagle":
            spec = {"method": "eagle", "model": draft, "num_speculative_tokens": n}
            return f"vllm serve {target} --speculative-config {shlex.quote(json.dumps(spec))}"
        parts = ["python -m sglang.launch_server", f"--model-path {target}", "--speculative-algorithm EAGLE",
                 f"--speculative-draft-model-path {shlex.quote(draft)}", f"--speculative-num-steps {n}",
                 "--speculative-eagle-topk 1", f"--speculative-num-draft-tokens {n + 1}"]
        if self.head_tokens:
            parts.append(f"--speculative-token-map {shlex.quote(str(self.draft_dir / TOKEN_MAP_FILE))}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"draft": str(self.draft_dir), "format": self.format, "target": str(self.target_dir),
                "num_speculative_tokens": self.num_speculative_tokens, "head_tokens": self.head_tokens,
                "serve": self.serve_command(), "files": self.files}


def _rope(cfg: Any) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) of an HF config (transformers 4 attributes or 5's `rope_parameters`)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = float(params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    scaling = params or getattr(cfg, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise InvalidArgumentError(f"rope scaling {scaling!r}: the EAGLE export supports the default rotary "
                                   "embedding only")
    return theta, None  # default rotary: no scaling entry


def _layer_biases(layer: Any) -> tuple[bool, bool]:
    """(attention biases, MLP biases) of the draft's decoder layer; refuses layers the Llama layout cannot hold."""
    attn, mlp = layer.self_attn, layer.mlp
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        raise InvalidArgumentError("the draft layer has q/k norms (Qwen3-style): vLLM's and SGLang's EAGLE-1 Llama "
                                   "layer has none")
    qkv = [getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj")]
    if len(set(qkv)) != 1:
        raise InvalidArgumentError("the draft layer has biases on some of q/k/v only: not a Llama layout")
    mlp_bias = [getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")]
    if len(set(mlp_bias)) != 1:
        raise InvalidArgumentError("the draft layer has biases on some MLP projections only: not a Llama layout")
    return qkv[0] or attn.o_proj.bias is not None, mlp_bias[0]


def eagle_config(draft: FeatureDraft, fmt: str) -> dict[str, Any]:
    """`config.json` of the exported draft: a 1-layer Llama of the target's sizes, in the engine's architecture."""
    cfg = draft.config
    theta, scaling = _rope(cfg)
    attention_bias, mlp_bias = _layer_biases(draft.lm.model.layers[0])
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    dtype = next(draft.parameters()).dtype
    return {
        "architectures": [ARCHITECTURE[fmt]], "model_type": "llama",
        "hidden_size": int(cfg.hidden_size), "intermediate_size": int(cfg.intermediate_size),
        "num_hidden_layers": 1, "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or heads), "head_dim": head_dim,
        "hidden_act": str(getattr(cfg, "hidden_act", "silu")), "rms_norm_eps": float(cfg.rms_norm_eps),
        "max_position_embeddings": int(cfg.max_position_embeddings), "rope_theta": theta, "rope_scaling": scaling,
        "vocab_size": int(cfg.vocab_size),
        # the head is always the target's (set after loading): untied, so SGLang's hot-token head never replaces the
        # embedding matrix it would share with a tied head
        "tie_word_embeddings": False,
        "attention_bias": attention_bias, "mlp_bias": mlp_bias,
        "bos_token_id": getattr(cfg, "bos_token_id", None), "eos_token_id": getattr(cfg, "eos_token_id", None),
        "pad_token_id": getattr(cfg, "pad_token_id", None),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def eagle_state_dict(draft: FeatureDraft, fmt: str) -> dict[str, torch.Tensor]:
    """The exported tensors, named as the engines' `load_weights` map them (see the module docstring)."""
    if fmt not in FORMATS:
        raise InvalidArgumentError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    layer = draft.lm.model.layers[0]
    attention_bias, mlp_bias = _layer_biases(layer)
    out = {"fc.weight": draft.fc.weight, "embed_tokens.weight": draft.lm.get_input_embeddings().weight}
    if fmt == "sglang-eagle":
        out["fc.bias"] = torch.zeros_like(draft.fc.weight[:, 0])  # SGLang's fc has a bias: zero is ours
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        proj = getattr(layer.self_attn, name)
        out[f"layers.0.self_attn.{name}.weight"] = proj.weight
        if attention_bias:  # Llama's attention_bias covers o_proj too: Qwen2 has none there, so it is zero
            out[f"layers.0.self_attn.{name}.bias"] = (proj.bias if proj.bias is not None
                                                      else torch.zeros_like(proj.weight[:, 0]))
    for name in ("gate_proj", "up_proj", "down_proj"):
        proj = getattr(layer.mlp, name)
        out[f"layers.0.mlp.{name}.weight"] = proj.weight
        if mlp_bias:
            out[f"layers.0.mlp.{name}.bias"] = proj.bias
    out["layers.0.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def _check_shared_with_target(draft: FeatureDraft, target: Any, draft_path: Path) -> None:
    """The engines read embeddings and head from the target: the draft's must be the target's."""
    head = draft.lm.get_output_embeddings()
    t_head = target.get_output_embeddings().weight.detach()
    if isinstance(head, RestrictedLMHead):
        same_head = torch.equal(head.sub_weight.detach(), t_head[head.token_ids.to(t_head.device)])
    else:
        same_head = tuple(head.weight.shape) == tuple(t_head.shape) and torch.equal(head.weight.detach(), t_head)
    same_embed = torch.equal(draft.lm.get_input_embeddings().weight.detach(),
                             target.get_input_embeddings().weight.detach())
    if not (same_head and same_embed):
        which = " and ".join(n for n, ok in (("embeddings", same_embed), ("output head", same_head)) if not ok)
        raise InvalidArgumentError(f"draft {draft_path}: its {which} differ from the target's, but vLLM and SGLang "
                                   "run an EAGLE draft with the target's embeddings and head; train it with them "
                                   "frozen (soaes-distill feature-draft does)")


def export_eagle(draft_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 target_dir: str | os.PathLike[str], fmt: str, num_speculative_tokens: int = 3,
                 final_dir: str | os.PathLike[str] | None = None,
                 allow_other_target: bool = False) -> EagleExportResult:
    """Write `out_dir` (atomically): the draft folder of `fmt` (see the module docstring), its `README.md` with the
    serve command, and `export.json`. `final_dir`: where `out_dir` will be served from (absolute paths in the
    command). The draft must be an engine-layout feature draft built for this target."""
    from .export import _has_tokenizer, _model_dir, _target_dir

    if fmt not in FORMATS:
        raise InvalidArgumentError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    n = num_speculative_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InvalidArgumentError(f"num_speculative_tokens must be an int >= 1, got {n!r}")
    draft_path = _model_dir("draft", draft_dir)
    if not is_feature_draft_dir(draft_path):
        raise InvalidArgumentError(f"draft {draft_path} is a layer draft, not a feature (EAGLE) draft: export it "
                                   "with --format vllm (vLLM's draft_model method)")
    target_path = _target_dir(target_dir)
    tokenizer = load_tokenizer(str(target_path))
    if _has_tokenizer(draft_path):
        check_draft_tokenizer(target_path, draft_path, target_tokenizer=tokenizer)
    draft = FeatureDraft.from_pretrained(draft_path, dtype=torch.float32, device="cpu",
                                         allow_other_target=allow_other_target)
    if draft.layout != "engine":
        raise InvalidArgumentError(f"draft {draft_path} has the soaes layout (layer input norm, final norm, fc "
                                   "bias), which vLLM's and SGLang's EAGLE-1 drafts do not have: no renaming computes "
                                   "the same function; train it with layout: engine (soaes-distill feature-draft "
                                   "--set layout=engine)")
    target = load_model(str(target_path), dtype=torch.float32, device="cpu")
    check_draft_target(draft, target)
    _check_shared_with_target(draft, target, draft_path)
    config, tensors = eagle_config(draft, fmt), eagle_state_dict(draft, fmt)
    head = draft.lm.get_output_embeddings()
    hot = head.token_ids.tolist() if isinstance(head, RestrictedLMHead) and fmt == "sglang-eagle" else []

    from safetensors.torch import save_file

    out = Path(out_dir)
    served = Path(final_dir if final_dir is not None else out).resolve()
    files = ["config.json", WEIGHTS_FILE, *([TOKEN_MAP_FILE] if hot else []), README, RESULT_FILE]
    result = EagleExportResult(served, fmt, target_path, n, len(hot), files)
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "config.json", config)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if hot:
            torch.save(hot, tmp / TOKEN_MAP_FILE)  # SGLang: torch.load(weights_only=True) -> the head's token ids
        atomic_write_text(tmp / README, eagle_readme(result, draft))
        atomic_write_json(tmp / RESULT_FILE, result.to_dict())
    return result


def eagle_readme(result: EagleExportResult, draft: FeatureDraft) -> str:
    """README.md of the exported folder: what it is, the exact serve command, and what differs from soaes's decoder."""
    engine = "vLLM" if result.format == "vllm-eagle" else "SGLang"
    head = draft.lm.get_output_embeddings()
    kept = int(head.token_ids.numel()) if isinstance(head, RestrictedLMHead) else 0
    lines = [f"# EAGLE draft for {engine}", "",
             f"- target (serve this model): `{result.target_dir}`",
             f"- draft (this folder, {result.format}): `{result.draft_dir}`",
             f"- draft tokens per step: {result.num_speculative_tokens}", "",
             f"Serve the target with this draft ({engine} in its own environment, on a GPU):", "",
             "```bash", result.serve_command(), "```", "",
             "The folder holds `config.json` (a one-layer Llama), `model.safetensors` (fc, the decoder layer and the "
             "target's embeddings; the engine takes the head from the target)"
             + (f" and `{TOKEN_MAP_FILE}` (the {kept} token ids of the restricted head)" if result.head_tokens else "")
             + ". Try it:", "",
             "```bash",
             "curl -s localhost:" + ("8000" if result.format == "vllm-eagle" else "30000")
             + "/v1/chat/completions -H 'Content-Type: application/json' -d '"
             + json.dumps({"model": str(result.target_dir),
                           "messages": [{"role": "user", "content": SAMPLE_PROMPT}], "max_tokens": 64},
                          ensure_ascii=False) + "'",
             "```"]
    if kept and result.format == "vllm-eagle":
        lines += ["", f"The draft was trained with a restricted head ({kept} tokens); vLLM's EAGLE-1 proposes over the "
                  "full vocabulary through the target's head, so its proposals can differ where a token outside the "
                  "kept set scores highest (docs/benchmarks.md measures the acceptance this costs). Output stays exact "
                  "(the target verifies)."]
    return "\n".join(lines) + "\n"
