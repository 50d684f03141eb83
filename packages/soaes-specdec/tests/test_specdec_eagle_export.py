"""EAGLE export (`export_eagle`, `soaes-specdec export --format vllm-eagle|sglang-eagle`): a reference forward written
from the engines' model code, reading only the exported folder and the target, gives our engine-layout draft's logits
and greedy proposals; the folder's names and config fields are the ones the engines' loaders map; refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from soaes_core import load_model, load_tokenizer
from soaes_core.errors import InvalidArgumentError
from soaes_specdec.cli import main
from soaes_specdec.draft import restrict_output_head
from soaes_specdec.eagle_export import README, RESULT_FILE, TOKEN_MAP_FILE, WEIGHTS_FILE, export_eagle
from soaes_specdec.feature_draft import FeatureDraft

STEPS = 4

# ---- reference forward ------------------------------------------------------------------------------------------
# Written from the engines' EAGLE-1 model code, not from ours:
#   vLLM  vllm/model_executor/models/llama_eagle.py @ 00da92319af4b2ad2cde8525b7b609c779bdc52f (LlamaModel.forward,
#         EagleLlamaForCausalLM.load_weights) and vllm/model_executor/models/llama.py (LlamaDecoderLayer: attention_bias
#         -> qkv and o_proj biases; fused residual add in post_attention_layernorm);
#   SGLang python/sglang/srt/models/llama_eagle.py @ 034b3be819faf3f84c5aae5a4cda27bdf2e12de0 (same, fc with bias;
#         head rows = target lm_head[hot_token_id] with --speculative-token-map, eagle_worker.load_token_map).


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding (vLLM/SGLang get_rope, is_neox_style=True) on [T, heads, d]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos.double()[:, None] * inv[None]
    cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def engine_forward(folder: Path, target: Any, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(draft hidden out [T, H], logits [T, V or hot]) of the exported EAGLE draft over pairs (hidden[p], ids[p]) at
    positions 0..T-1, from `folder` and the target's embeddings/head only."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    w = load_file(str(folder / WEIGHTS_FILE))
    sglang = cfg["architectures"] == ["LlamaForCausalLMEagle"]
    embed = target.get_input_embeddings().weight  # both engines share the target's embed_tokens (PP = 1)
    x = torch.cat([embed[ids], hidden], -1) @ w["fc.weight"].T
    if sglang:
        x = x + w["fc.bias"]
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    t = ids.shape[0]
    pre = "layers.0.self_attn."

    def proj(name: str, h: torch.Tensor) -> torch.Tensor:
        out = h @ w[pre + name + ".weight"].T
        return out + w[pre + name + ".bias"] if cfg["attention_bias"] else out

    residual = x  # layer 0: input_layernorm is an identity
    q = _rope(proj("q_proj", x).view(t, heads, hd), torch.arange(t), cfg["rope_theta"])
    k = _rope(proj("k_proj", x).view(t, kv, hd), torch.arange(t), cfg["rope_theta"])
    v = proj("v_proj", x).view(t, kv, hd)
    k, v = (z.repeat_interleave(heads // kv, dim=1) for z in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) * hd ** -0.5
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, heads * hd)
    residual = proj("o_proj", attn) + residual
    h = _rms(residual, w["layers.0.post_attention_layernorm.weight"], cfg["rms_norm_eps"])
    mlp = (F.silu(h @ w["layers.0.mlp.gate_proj.weight"].T) * (h @ w["layers.0.mlp.up_proj.weight"].T)) \
        @ w["layers.0.mlp.down_proj.weight"].T
    out = mlp + residual  # no final norm: hidden_states + residual goes to the head
    head = target.get_output_embeddings().weight
    if sglang and (folder / TOKEN_MAP_FILE).is_file():
        hot = torch.tensor(torch.load(folder / TOKEN_MAP_FILE, weights_only=True), dtype=torch.int64)
        return out, out @ head[hot].T, hot
    return out, out @ head.T, None


def engine_proposals(folder: Path, target: Any, feats: torch.Tensor, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy chain of `steps` draft tokens as the engines draft (argmax; the draft's output fed back as the hidden
    state of the next position; hot indices mapped back through the token map)."""
    feats, ids, out = feats.clone(), ids.clone(), []
    for _ in range(steps):
        g, logits, hot = engine_forward(folder, target, feats, ids)
        tok = int(logits[-1].argmax()) if hot is None else int(hot[logits[-1].argmax()])
        out.append(tok)
        feats, ids = torch.cat([feats, g[-1:]]), torch.cat([ids, torch.tensor([tok])])
    return out


def soaes_proposals(draft: FeatureDraft, feats: torch.Tensor, ids: torch.Tensor, steps: int) -> list[int]:
    feats, ids, out = feats.clone(), ids.clone(), []
    for _ in range(steps):
        g = draft(feats[None], ids[None])[0]
        tok = int(draft.logits(g[-1:])[0].argmax())
        out.append(tok)
        feats, ids = torch.cat([feats, g[-1:]]), torch.cat([ids, torch.tensor([tok])])
    return out


# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def biased_target_dir(tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 with random q/k/v biases (HF initialises them to zero, which would hide a lost bias)."""
    model = load_model(tiny_qwen2_dir, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                bias = getattr(layer.self_attn, name).bias
                bias.copy_(0.5 * torch.randn(bias.shape, generator=g))
    out = tmp_path_factory.mktemp("biased-qwen2")
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(str(tiny_qwen2_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def target(biased_target_dir: Path) -> Any:
    return load_model(biased_target_dir, dtype=torch.float32, device="cpu")


def engine_draft(target: Any, head_ids: list[int] | None = None) -> FeatureDraft:
    """An engine-layout draft with every trained part perturbed (fc, the layer), optionally a restricted head."""
    draft = FeatureDraft.from_target(target, layout="engine")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    if head_ids is not None:
        restrict_output_head(draft.lm, head_ids)
    return draft.eval()


@pytest.fixture(scope="module")
def saved_drafts(target: Any, biased_target_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, Path]:
    tok = load_tokenizer(str(biased_target_dir))
    root = tmp_path_factory.mktemp("eagle-drafts")
    hot = sorted(set(range(0, len(tok), 7)) | {int(tok.eos_token_id)})
    return {"full": engine_draft(target).save_pretrained(root / "full", tokenizer=tok),
            "restricted": engine_draft(target, hot).save_pretrained(root / "restricted", tokenizer=tok)}


def _inputs(target: Any, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Target features f[0..T-1] of a prompt and the tokens x[1..T] that pair with them."""
    ids = torch.randint(2, 2000, (length + 1,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        feats = target.model(input_ids=ids[None]).last_hidden_state[0]
    return feats[:-1], ids[1:]


# ---- tests ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,kind", [("vllm-eagle", "full"), ("vllm-eagle", "restricted"),
                                      ("sglang-eagle", "full"), ("sglang-eagle", "restricted")])
def test_engine_reference_forward_equals_the_feature_draft(fmt: str, kind: str, target: Any, biased_target_dir: Path,
                                                           saved_drafts: dict[str, Path], tmp_path: Path) -> None:
    res = export_eagle(saved_drafts[kind], tmp_path / fmt, biased_target_dir, fmt, num_speculative_tokens=STEPS)
    folder = tmp_path / fmt
    # vLLM's EAGLE-1 proposes over the full vocabulary: its reference is our draft without the restriction
    ours = FeatureDraft.from_pretrained(saved_drafts[kind], restrict_head=fmt == "sglang-eagle")
    feats, ids = _inputs(target)
    with torch.no_grad():
        g = ours(feats[None], ids[None])[0]
        logits = ours.logits(g)
        ref_g, ref_logits, hot = engine_forward(folder, target, feats, ids)
        if hot is not None:
            assert kind == "restricted" and res.head_tokens == hot.numel()
            logits = logits[:, hot]  # the restricted draft's finite logits, in the token map's order
        else:
            assert res.head_tokens == 0
        assert (ref_g - g).abs().max() <= 1e-5
        assert ref_logits.shape == logits.shape and (ref_logits - logits).abs().max() <= 1e-5
        want = soaes_proposals(ours, feats, ids, STEPS)
        assert engine_proposals(folder, target, feats, ids, STEPS) == want
    assert len(set(want)) > 1  # a real chain, not one repeated token


def test_exported_names_and_config_match_the_engines_loaders(target: Any, biased_target_dir: Path,
                                                             saved_drafts: dict[str, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    hidden = target.config.hidden_size
    layer = {f"layers.0.self_attn.{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")}
    layer |= {f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    layer |= {"layers.0.post_attention_layernorm.weight", "fc.weight", "embed_tokens.weight"}
    for fmt, arch, extra in (("vllm-eagle", "LlamaForCausalLM", set()),
                             ("sglang-eagle", "LlamaForCausalLMEagle", {"fc.bias"})):
        res = export_eagle(saved_drafts["restricted"], tmp_path / fmt, biased_target_dir, fmt, 3)
        cfg = json.loads((tmp_path / fmt / "config.json").read_text(encoding="utf-8"))
        with safe_open(str(tmp_path / fmt / WEIGHTS_FILE), framework="pt") as fh:
            names = set(fh.keys())
            o_bias = fh.get_tensor("layers.0.self_attn.o_proj.bias")
        # vLLM renames LlamaForCausalLM to EagleLlamaForCausalLM (transformers_utils/configs/eagle.py); SGLang loads
        # the class named in config.json; neither maps lm_head.* (vLLM's EAGLE loader would reject it) nor a layer-0
        # input norm (deleted there: it would be skipped silently)
        assert names == layer | extra
        assert cfg["architectures"] == [arch] and cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 1
        assert cfg["attention_bias"] is True and "bias" not in cfg and cfg["mlp_bias"] is False
        assert torch.equal(o_bias, torch.zeros(hidden))  # Qwen2 has no o_proj bias; Llama's attention_bias adds one
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                    "rms_norm_eps", "max_position_embeddings"):
            assert cfg[key] == getattr(target.config, key), key
        assert cfg["tie_word_embeddings"] is False  # SGLang would swap a tied embedding for the hot-token head
        assert (tmp_path / fmt / TOKEN_MAP_FILE).is_file() == (fmt == "sglang-eagle")
        readme = (tmp_path / fmt / README).read_text(encoding="utf-8")
        assert res.serve_command() in readme
        assert json.loads((tmp_path / fmt / RESULT_FILE).read_text(encoding="utf-8"))["serve"] == res.serve_command()
    vllm, sglang = (json.loads((tmp_path / f / RESULT_FILE).read_text(encoding="utf-8"))["serve"]
                    for f in ("vllm-eagle", "sglang-eagle"))
    assert vllm.startswith(f"vllm serve {biased_target_dir.resolve()} --speculative-config '") and \
        json.loads(vllm.split("--speculative-config ")[1].strip("'")) == {
            "method": "eagle", "model": str((tmp_path / "vllm-eagle").resolve()), "num_speculative_tokens": 3}
    assert sglang.startswith("python -m sglang.launch_server --model-path ")
    assert "--speculative-algorithm EAGLE" in sglang
    assert f"--speculative-token-map {(tmp_path / 'sglang-eagle').resolve() / TOKEN_MAP_FILE}" in sglang
    assert "--speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4" in sglang
    from transformers import LlamaConfig  # the config is a valid Llama config for transformers too

    assert LlamaConfig.from_pretrained(tmp_path / "vllm-eagle").attention_bias is True


def test_export_refuses_what_the_engines_cannot_run(target: Any, biased_target_dir: Path, tiny_qwen2_dir: Path,
                                                    tmp_path: Path) -> None:
    tok = load_tokenizer(str(biased_target_dir))
    soaes = FeatureDraft.from_target(target).save_pretrained(tmp_path / "soaes", tokenizer=tok)
    with pytest.raises(InvalidArgumentError, match="soaes layout"):
        export_eagle(soaes, tmp_path / "o", biased_target_dir, "vllm-eagle")
    trained_head = engine_draft(target)
    with torch.no_grad():
        trained_head.lm.get_input_embeddings().weight.add_(0.01)  # embeddings not the target's any more
    moved = trained_head.save_pretrained(tmp_path / "moved", tokenizer=tok)
    with pytest.raises(InvalidArgumentError, match=r"embeddings .*differ from the target's"):
        export_eagle(moved, tmp_path / "o", biased_target_dir, "sglang-eagle")
    engine = engine_draft(target).save_pretrained(tmp_path / "engine", tokenizer=tok)
    with pytest.raises(InvalidArgumentError, match="trained for another target"):
        export_eagle(engine, tmp_path / "o", tiny_qwen2_dir, "vllm-eagle")  # same shapes, other weights
    with pytest.raises(InvalidArgumentError, match="format must be one of"):
        export_eagle(engine, tmp_path / "o", biased_target_dir, "onnx")
    assert not (tmp_path / "o").exists()


def test_cli_export_formats(biased_target_dir: Path, saved_drafts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sg"
    res = CliRunner().invoke(main, ["export", str(saved_drafts["restricted"]), "--format", "sglang-eagle",
                                    "--target", str(biased_target_dir), "-n", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "sglang.launch_server" in res.output and (out / TOKEN_MAP_FILE).is_file()
    bad = CliRunner().invoke(main, ["export", str(saved_drafts["full"]), "--format", "vllm-eagle",
                                    "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--target" in bad.output
