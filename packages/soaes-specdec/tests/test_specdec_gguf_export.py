"""GGUF export for llama.cpp (`export_gguf`): tensors, shapes and values survive a GGUFReader round trip (the llama
q/k permutation undone with transformers' inverse), the tokenizer metadata equals the one in the shipped SmolLM2
GGUF, a restricted-head draft is exported full, the F32 export of the embedded model read back by transformers'
GGUF loader gives the same logits, and, where llama-cpp-python is installed, llama.cpp's greedy continuation equals
ours."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from soaes_core import load_model, load_tokenizer
from soaes_core.errors import InvalidArgumentError, ModelLoadError
from soaes_specdec import autoregressive_generate
from soaes_specdec.draft import HEAD_IDS_FILE, make_layer_draft, restrict_output_head, unrestricted_copy
from soaes_specdec.gguf_export import _encode, export_gguf, permute_qk

gguf = pytest.importorskip("gguf")

PROMPTS = ["The capital of France is", "什么是国有资本投资公司？", "def fibonacci(n):"]
NEW_TOKENS = 16
NEAR_TIE = 1e-2  # logit margin below which a greedy divergence between two F32 engines is a tie, not a bug


@functools.cache
def _reader(path: Path) -> Any:
    """One parsed reader per file (parsing ~100k tokenizer strings is the slow part)."""
    return gguf.GGUFReader(path)


def _field(reader: Any, key: str) -> Any:
    return reader.fields[key].contents()


def _tensors(reader: Any) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' `_reverse_permute_weights` (its GGUF loader), written independently of `permute_qk`."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _check_round_trip(src: Path, out: Path, arch: str, permuted: bool) -> None:
    """Every HF tensor is in the GGUF under llama.cpp's name, with its shape and values (q/k un-permuted)."""
    config = json.loads((src / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config["num_hidden_layers"])
    reader = _reader(out)
    assert _field(reader, "general.architecture") == arch
    got = _tensors(reader)
    expected = {}
    for name, value in _hf_state(src).items():
        if config["tie_word_embeddings"] and name == "lm_head.weight":
            continue
        expected[names.get_name(name, try_suffixes=(".weight", ".bias"))] = (name, value)
    assert set(got) == set(expected)
    for gname, (hname, value) in expected.items():
        data = np.asarray(got[gname].data)
        assert data.shape == tuple(value.shape), gname
        if permuted and hname.endswith(("q_proj.weight", "q_proj.bias")):
            data = _unpermute(data, n_head)
        elif permuted and hname.endswith(("k_proj.weight", "k_proj.bias")):
            data = _unpermute(data, n_kv)
        np.testing.assert_array_equal(data, value.float().numpy(), err_msg=gname)
    assert ("output.weight" in got) == (not config["tie_word_embeddings"])


def _check_tokenizer_metadata(reader: Any, src: Path, pre: str) -> None:
    tok = load_tokenizer(str(src))
    vocab = tok.get_vocab()
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == json.loads((src / "config.json").read_text())["vocab_size"]
    assert all(tokens[i] == t for t, i in vocab.items())
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == pre  # a qwen2 dir loads as Qwen2Tokenizer: Qwen2's split
    assert len(_field(reader, "tokenizer.ggml.merges")) > 40_000
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer: Any) -> Path:
    """A seeded tiny random Llama (untied head, grouped-query attention, q/k/v/o biases) with the real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = embedded_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, attention_bias=True, rms_norm_eps=1e-5, initializer_range=0.2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-zero biases, so a wrongly permuted bias shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("tiny-llama") / "tiny-llama"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def restricted_draft_dir(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Any, tiny_qwen2_dir: Path) -> Path:
    """A 1-layer draft of the tiny Qwen2 whose restricted head's kept rows were moved off the embeddings (as by KD)."""
    kept = list(range(0, 49152, 7))
    model = restrict_output_head(make_layer_draft(tiny_qwen2, 1), kept)
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.sub_weight.add_(0.05 * torch.randn(head.sub_weight.shape, generator=torch.Generator().manual_seed(1)))
    out = tmp_path_factory.mktemp("restricted") / "draft"
    unrestricted_copy(model).save_pretrained(out, safe_serialization=True)
    load_tokenizer(str(tiny_qwen2_dir)).save_pretrained(out)
    (out / HEAD_IDS_FILE).write_text(json.dumps({"token_ids": kept}), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def embedded_export(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """The embedded SmolLM2-135M (its cached HF directory) exported to F32."""
    return export_gguf(embedded_model_dir, tmp_path_factory.mktemp("embedded-gguf"))


def test_qwen2_round_trip(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    out = export_gguf(tiny_qwen2_dir, tmp_path)
    assert out == tmp_path / f"{tiny_qwen2_dir.name}.gguf" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    _check_round_trip(tiny_qwen2_dir, out, "qwen2", permuted=False)
    reader = _reader(out)
    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    assert _field(reader, "qwen2.block_count") == config["num_hidden_layers"]
    assert _field(reader, "qwen2.attention.head_count_kv") == config["num_key_value_heads"]
    assert _field(reader, "qwen2.context_length") == config["max_position_embeddings"]
    assert _field(reader, "qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    _check_tokenizer_metadata(reader, tiny_qwen2_dir, "qwen2")


def test_llama_round_trip_undoes_the_qk_permutation(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = export_gguf(tiny_llama_dir, tmp_path)
    _check_round_trip(tiny_llama_dir, out, "llama", permuted=True)
    reader = _reader(out)
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    _check_tokenizer_metadata(reader, tiny_llama_dir, "smollm")
    # the permutation really moves rows (so the round trip above tests its inverse), and undoes as transformers does
    w = torch.arange(4 * 16 * 3, dtype=torch.float32).reshape(64, 3)
    assert not torch.equal(permute_qk(w, 4), w)
    np.testing.assert_array_equal(_unpermute(permute_qk(w, 4).numpy(), 4), w.numpy())


def test_f16_keeps_norms_and_biases_f32_and_bf16_rounds_like_torch(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    out = export_gguf(tiny_qwen2_dir, tmp_path, outtype="f16")
    state = _hf_state(tiny_qwen2_dir)
    got = _tensors(_reader(out))
    assert _field(_reader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    for gname, hname in [("token_embd.weight", "model.embed_tokens.weight"),
                         ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight"),
                         ("output_norm.weight", "model.norm.weight"),
                         ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias")]:
        t, matrix = got[gname], state[hname].ndim == 2
        assert t.tensor_type == (gguf.GGMLQuantizationType.F16 if matrix else gguf.GGMLQuantizationType.F32), gname
        want = state[hname].half().float() if matrix else state[hname]
        np.testing.assert_array_equal(np.asarray(t.data, dtype=np.float32), want.numpy(), err_msg=gname)
    # bf16 (same writer path, its own encoding): gguf's BF16 bytes decode to torch's bfloat16 rounding
    weight = state["model.layers.1.self_attn.q_proj.weight"]
    data, qtype = _encode("blk.1.attn_q.weight", weight, "bf16")
    assert qtype == gguf.GGMLQuantizationType.BF16
    np.testing.assert_array_equal(gguf.quants.dequantize(data, qtype).reshape(weight.shape),
                                  weight.bfloat16().float().numpy())
    assert _encode("output_norm.weight", state["model.norm.weight"], "bf16")[1] == gguf.GGMLQuantizationType.F32


def test_restricted_draft_is_exported_with_its_full_head(restricted_draft_dir: Path, tmp_path: Path) -> None:
    out = export_gguf(restricted_draft_dir, tmp_path)
    _check_round_trip(restricted_draft_dir, out, "qwen2", permuted=False)
    head = np.asarray(_tensors(_reader(out))["output.weight"].data)
    state = _hf_state(restricted_draft_dir)
    kept = json.loads((restricted_draft_dir / HEAD_IDS_FILE).read_text())["token_ids"]
    assert head.shape[0] == 49152 > len(kept)
    np.testing.assert_array_equal(head[kept], state["lm_head.weight"][kept].numpy())  # the trained rows
    assert not np.array_equal(head[kept], state["model.embed_tokens.weight"][kept].numpy())
    others = np.setdiff1d(np.arange(49152), kept)  # the rest as the tied head held them
    np.testing.assert_array_equal(head[others], state["model.embed_tokens.weight"][others].numpy())


def test_embedded_export_matches_the_shipped_gguf(embedded_export: Path) -> None:
    """Tokenizer metadata and hyper-parameters equal those of the GGUF llama.cpp's own converter wrote."""
    from soaes_core.models import embedded_gguf_path

    shipped, ours = _reader(embedded_gguf_path("smollm2-135m")), _reader(embedded_export)
    for key in ["general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
                "llama.rope.dimension_count", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]:
        assert _field(ours, key) == _field(shipped, key), key
    assert set(_tensors(ours)) == set(_tensors(shipped))
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in ours.tensors)


@pytest.mark.slow
def test_embedded_f32_export_read_back_by_transformers(embedded_export: Path, embedded_model: Any,
                                                       embedded_tokenizer: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """soaes_core's `gguf:` loader (transformers' GGUF reader, which un-permutes q/k itself) gives equal logits."""
    monkeypatch.setenv("SOAES_CACHE", str(tmp_path / "cache"))  # its dequantised copy goes away with the test
    back = load_model(f"gguf:{embedded_export}", dtype=torch.float32, device="cpu")
    back_tok = load_tokenizer(f"gguf:{embedded_export}")
    for prompt in PROMPTS:
        ids = embedded_tokenizer(prompt, return_tensors="pt").input_ids
        assert back_tok(prompt, return_tensors="pt").input_ids.tolist() == ids.tolist()
        with torch.no_grad():
            want, got = embedded_model(ids).logits, back(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_bad_input_is_one_clear_error(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model directory"):
        export_gguf(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(InvalidArgumentError, match="outtype must be one of"):
        export_gguf(tiny_qwen2_dir, tmp_path / "out", outtype="q4_0")

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    with pytest.raises(ModelLoadError, match=r"gpt2.*architecture 'gpt2' cannot be exported to GGUF"):
        export_gguf(gpt2, tmp_path / "out")

    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((tiny_qwen2_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match=r"no-tokenizer: no tokenizer.json \(no tokenizer files\)"):
        export_gguf(no_tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


# --- llama.cpp (optional peer: pip install llama-cpp-python, which builds from source) ------------------------------

def _llama_cpp_greedy(llm: Any, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation (argmax of its own logits each step) and those logits [n, V]."""
    llm.reset()
    llm.eval(prompt)
    tokens, rows = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        tokens.append(int(row.argmax()))
        rows.append(row)
        llm.eval([tokens[-1]])
    return tokens, np.stack(rows)


def _compare_greedy(model: Any, path: Path, tokenizer: Any, label: str) -> list[str]:
    """Our greedy tokens == llama.cpp's on every prompt; a divergence passes only at a near-tie (margin reported)."""
    from llama_cpp import Llama

    # one thread: the test checks values, and two spinning llama.cpp threads on a shared 2-core machine run 6x slower;
    # logits_all: since llama-cpp-python 0.3 `scores` holds logits only when every position keeps them
    llm = Llama(model_path=str(path), n_ctx=128, n_batch=64, n_threads=1, logits_all=True, verbose=False)
    reports = []
    for text in PROMPTS:
        ids = tokenizer(text).input_ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, (label, text)
        ours = autoregressive_generate(model, torch.tensor([ids]), max_new_tokens=NEW_TOKENS).sequences[0].tolist()
        with torch.no_grad():
            our_logits = model(torch.tensor([ours])).logits[0, len(ids) - 1:-1].numpy()
        theirs, their_logits = _llama_cpp_greedy(llm, ids, NEW_TOKENS)
        ours = ours[len(ids):]
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), NEW_TOKENS)
        diff = float(np.abs(our_logits[:same + 1] - their_logits[:same + 1]).max())
        if same < NEW_TOKENS:
            a, b = ours[same], theirs[same]
            margin = float(our_logits[same, a] - our_logits[same, b])
            their_margin = float(their_logits[same, b] - their_logits[same, a])
            report = (f"{label} {text!r}: diverges at new token {same} ({a} vs {b}), logit margin ours {margin:.2e}, "
                      f"llama.cpp {their_margin:.2e}; max |logit diff| {diff:.2e}")
            assert margin < NEAR_TIE and their_margin < NEAR_TIE, report
            warnings.warn(report, stacklevel=1)
        else:
            report = f"{label} {text!r}: {NEW_TOKENS}/{NEW_TOKENS} equal, max |logit diff| {diff:.2e}"
        reports.append(report)
    llm.close()
    return reports


@pytest.mark.slow
def test_llama_cpp_greedy_equals_ours(embedded_export: Path, embedded_model: Any, embedded_tokenizer: Any,
                                      tiny_qwen2_dir: Path, tmp_path: Path,
                                      record_property: Any) -> None:
    pytest.importorskip("llama_cpp")
    draft_dir = tmp_path / "draft"
    draft = make_layer_draft(embedded_model, 4)
    draft.save_pretrained(draft_dir, safe_serialization=True)
    embedded_tokenizer.save_pretrained(draft_dir)
    draft_gguf = export_gguf(draft_dir, tmp_path / "gguf")
    peaky = tmp_path / "qwen2-peaky"  # a random Qwen2 with peakier logits (fewer near-ties than init 0.02)
    from soaes_core.testing import make_tiny_qwen2

    make_tiny_qwen2(peaky, seed=1, initializer_range=0.2)
    qwen2_gguf = export_gguf(peaky, tmp_path / "gguf")
    reports = []
    reports += _compare_greedy(embedded_model, embedded_export, embedded_tokenizer, "target (llama)")
    reports += _compare_greedy(draft, draft_gguf, embedded_tokenizer, "draft (llama)")
    reports += _compare_greedy(load_model(peaky, dtype=torch.float32, device="cpu"), qwen2_gguf,
                               load_tokenizer(str(peaky)), "tiny qwen2")
    record_property("llama_cpp_greedy", reports)
