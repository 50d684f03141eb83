"""GGUF export for llama.cpp: a trained target or a layer draft (an HF directory) as one `.gguf` file, so CPU users
serve the pair with `llama-server -m target.gguf -md draft.gguf`.

Only the architectures soaes produces are converted: Qwen2 (llama.cpp arch "qwen2") and Llama (arch "llama", which
SmolLM2 is). Tensor names come from gguf's `TensorNameMap`; the metadata keys, the token-type rules, the BPE
pre-tokenizer check and the q/k row permutation of the "llama" arch (llama.cpp's RoPE pairs dimensions (2i, 2i+1),
HF's pairs (i, i + d/2); "qwen2" is stored as is) follow llama.cpp's convert_hf_to_gguf.py at commit
0024aa7417efd50a7c2a79e049dfbbbceb0beaaf (TextModel.set_gguf_parameters, get_vocab_base, get_vocab_base_pre,
_set_vocab_gpt2, LlamaModel.permute / modify_tensors / generate_extra_tensors, prepare_tensors' F32 rules).

A layer draft trained with a restricted head (`head_token_ids.json`) is exported with its full head, as
`soaes_specdec.export` explains: the directory already holds every row (the kept ones as trained), so the kept
tokens' logits are unchanged and the others are no longer -inf. A tied head is not written: llama.cpp reuses
`token_embd` when `output.weight` is absent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from soaes_core.atomic import temp_path
from soaes_core.errors import InvalidArgumentError, ModelLoadError

from .draft import HEAD_IDS_FILE

OUTTYPES = ("f32", "f16", "bf16")

# llama.cpp's get_vocab_base_pre: the pre-tokenizer is identified by hashing the ids of this text (a fixed string,
# copied verbatim); only the tokenizers of the models soaes trains are listed, with llama.cpp's names for them.
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


@dataclass(frozen=True)
class _Arch:
    gguf_arch: Any  # gguf.MODEL_ARCH
    permute_qk: bool  # llama: HF's rotate-half q/k rows reordered to llama.cpp's interleaved RoPE pairs


def _archs() -> dict[str, _Arch]:
    import gguf

    return {"qwen2": _Arch(gguf.MODEL_ARCH.QWEN2, False), "llama": _Arch(gguf.MODEL_ARCH.LLAMA, True)}


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: within each of `n_head` heads, row order (i, i + d/2) -> (2i, 2i + 1).

    Works on a q/k projection weight [n_head * d, hidden] or bias [n_head * d]."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def export_gguf(model: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, outtype: str = "f32") -> Path:
    """Write HF model directory `model` (a Qwen2/Llama target or a layer draft) as `out_dir/<folder name>.gguf`.

    `outtype`: "f32", "f16" or "bf16" for the matrices (norms and other 1-D tensors stay F32, as llama.cpp's
    converter writes them). The file is written atomically; returns its path.
    """
    if outtype not in OUTTYPES:
        raise InvalidArgumentError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    src = _model_dir(model)
    config = _load_config(src)
    arch = _arch_of(src, config)
    _check_supported(src, config)
    tokenizer_file = _tokenizer_file(src)

    import gguf

    # use_temp_file: each tensor is spooled out as it is read, so memory stays about one tensor, not the model
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch.gguf_arch], use_temp_file=True)
    _add_parameters(writer, src, config, arch, outtype)
    _add_tokenizer(writer, src, config, arch, tokenizer_file)
    _add_tensors(writer, src, config, arch, outtype)

    out = Path(out_dir) / f"{src.name}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return out


def _model_dir(model: str | os.PathLike[str]) -> Path:
    p = Path(model).expanduser()
    if not p.is_dir():
        raise ModelLoadError(f"{p}: no such model directory")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p}: not a model directory (no config.json)")
    from .feature_draft import FEATURE_DRAFT_FILE, is_feature_draft_dir

    if is_feature_draft_dir(p):
        raise ModelLoadError(f"{p}: a feature-conditioned draft ({FEATURE_DRAFT_FILE}) reads the target's hidden "
                             "states; llama.cpp has no such draft, so only layer drafts and targets export to GGUF")
    return p.resolve()


def _load_config(src: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(src), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{src / 'config.json'}: unreadable model config ({first})") from None


def _arch_of(src: Path, config: Any) -> _Arch:
    archs = _archs()
    model_type = getattr(config, "model_type", None)
    if model_type not in archs:
        raise ModelLoadError(f"{src}: architecture {model_type!r} cannot be exported to GGUF (supported: "
                             f"{', '.join(sorted(archs))}, i.e. Qwen2ForCausalLM and LlamaForCausalLM)")
    return archs[model_type]


def _rope(config: Any) -> dict[str, Any]:
    """The RoPE settings as one dict (transformers 5 `rope_parameters`, or 4.x `rope_theta` + `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def _check_supported(src: Path, config: Any) -> None:
    """Refuse settings llama.cpp's qwen2/llama graphs would silently compute differently."""
    if getattr(config, "use_sliding_window", False):
        raise ModelLoadError(f"{src}: sliding-window attention (use_sliding_window) is not in llama.cpp's qwen2 "
                             "graph; export a model with full attention")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{src}: hidden_act {config.hidden_act!r} is not llama.cpp's SiLU-gated MLP")
    rope_type = _rope(config)["rope_type"]
    if rope_type not in ("default", "linear", "yarn", "llama3"):
        raise ModelLoadError(f"{src}: RoPE type {rope_type!r} is not supported by the GGUF export "
                             "(default, linear, yarn, llama3)")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_parameters(writer: Any, src: Path, config: Any, arch: _Arch, outtype: str) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(src.name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if arch.permute_qk:
        writer.add_rope_dimension_count(_head_dim(config))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- tokenizer -----------------------------------------------------------------------------------------------------

def _tokenizer_file(src: Path) -> Path:
    path = src / "tokenizer.json"
    if not path.is_file():
        what = ("a SentencePiece tokenizer.model, which this export does not convert"
                if (src / "tokenizer.model").is_file() else "no tokenizer files")
        raise ModelLoadError(f"{src}: no tokenizer.json ({what}); llama.cpp needs the BPE tokenizer inside the GGUF: "
                             "save the target's tokenizer beside the model (tokenizer.save_pretrained)")
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model", {}).get("type")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise ModelLoadError(f"{path}: unreadable tokenizer ({err})") from None
    if model_type != "BPE":
        raise ModelLoadError(f"{path}: tokenizer model {model_type!r} is not a byte-level BPE (GPT-2 style) "
                             "tokenizer, the only kind this export writes")
    return path


# The split regex of Qwen2's tokenizer (transformers' Qwen2Tokenizer applies it to any vocabulary it loads):
# llama.cpp's "qwen2" pre-tokenizer implements the same split.
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                     r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_regexes(tokenizer: Any) -> list[str]:
    """The `Split` regexes of the tokenizer's effective pre-tokenizer (as loaded, not as saved)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = (json.loads(backend.to_str()).get("pre_tokenizer") or {}) if backend is not None else {}
    steps = pre.get("pretokenizers", [pre])
    return [step["pattern"]["Regex"] for step in steps
            if step.get("type") == "Split" and isinstance(step.get("pattern"), dict) and "Regex" in step["pattern"]]


def _pre_tokenizer(tokenizer: Any, src: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: by llama.cpp's own check hash (vocabulary and split
    together), else by the split regex alone (a known vocabulary loaded through Qwen2Tokenizer's split)."""
    digest = sha256(str(tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)).encode()).hexdigest()
    name = KNOWN_PRE_TOKENIZERS.get(digest)
    if name is None and _split_regexes(tokenizer) == [QWEN2_SPLIT_REGEX]:
        name = "qwen2"
    if name is None:
        raise ModelLoadError(f"{src}: unknown BPE pre-tokenizer (llama.cpp check hash {digest[:16]}…); the GGUF export "
                             f"knows {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))} (SmolLM2, Qwen2, Llama 3)")
    return name


def _looks_special(token: str) -> bool:
    """llama.cpp's `does_token_look_special`, for added tokens a tokenizer did not mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def vocab_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (unused ids as `[PAD<i>]`, UNUSED)."""
    import gguf

    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ModelLoadError(f"tokenizer has id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not added_decoder[i].normalized:  # llama.cpp expects control/user tokens pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added_decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _adds_special(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding adds a BOS in front / an EOS at the end (llama.cpp's add_bos/add_eos), as HF does it."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos = tokenizer.bos_token_id is not None and len(full) > len(plain) and full[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    return bos, eos


def _add_tokenizer(writer: Any, src: Path, config: Any, arch: _Arch, tokenizer_file: Path) -> None:
    import gguf

    from soaes_core import load_tokenizer

    tokenizer = load_tokenizer(str(src))
    tokens, types = vocab_tokens(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, src))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=config.vocab_size)
    if not special.merges:
        raise ModelLoadError(f"{tokenizer_file}: the BPE tokenizer has no merges")
    special.add_special_token["bos"], special.add_special_token["eos"] = _adds_special(tokenizer)
    special.add_to_gguf(writer, quiet=True)
    if arch.permute_qk:  # llama.cpp's LlamaModel.set_vocab carries add_prefix_space over
        with contextlib.suppress(OSError, json.JSONDecodeError):
            tok_config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
            if isinstance(tok_config.get("add_prefix_space"), bool):
                writer.add_add_space_prefix(tok_config["add_prefix_space"])


# --- tensors -------------------------------------------------------------------------------------------------------

def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ModelLoadError(f"{index}: unreadable shard index ({err})") from None
        files = [src / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{src}: shard(s) named in {index.name} are missing: {', '.join(missing)}")
        return files
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{src}: no safetensors weights (model.safetensors or a sharded index); save the model "
                         "with save_pretrained(..., safe_serialization=True)")


def _hf_tensors(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    for path in _weight_files(src):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        except SafetensorError as err:
            raise ModelLoadError(f"{path}: unreadable safetensors file ({err})") from None


def _llama3_rope_factors(config: Any, rope: dict[str, Any]) -> torch.Tensor:
    """llama.cpp's `rope_freqs` tensor for Llama 3 RoPE scaling (LlamaModel.generate_extra_tensors)."""
    base = float(rope.get("rope_theta", 10000.0))
    dim = _head_dim(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _encode(name: str, tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, Any]:
    """The tensor's data and GGML type: 1-D tensors and norms stay F32 (llama.cpp's prepare_tensors rule)."""
    import gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if data.ndim <= 1 or name.endswith("_norm.weight") or outtype == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if outtype == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def _add_tensors(writer: Any, src: Path, config: Any, arch: _Arch, outtype: str) -> None:
    import gguf

    names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    rope = _rope(config)
    if rope["rope_type"] == "llama3":
        if not arch.permute_qk:
            raise ModelLoadError(f"{src}: llama3 RoPE scaling is only exported for the llama architecture")
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor(name, _llama3_rope_factors(config, rope).numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    seen: set[str] = set()
    for hf_name, tensor in _hf_tensors(src):
        if hf_name.endswith(".rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the tied head reuses token_embd
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ModelLoadError(f"{src}: tensor {hf_name!r} has no llama.cpp counterpart in arch "
                                 f"{gguf.MODEL_ARCH_NAMES[arch.gguf_arch]!r}")
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_qk(tensor, n_head)
        elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_qk(tensor, n_kv)
        data, qtype = _encode(new_name, tensor, outtype)
        writer.add_tensor(new_name, data, raw_dtype=qtype)
        seen.add(hf_name)
    if not tied and "lm_head.weight" not in seen:
        extra = f" (a restricted-head draft, {HEAD_IDS_FILE}, is saved with its full head)" if (
            src / HEAD_IDS_FILE).is_file() else ""
        raise ModelLoadError(f"{src}: untied model without lm_head.weight{extra}")
