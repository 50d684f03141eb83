"""Model specs: clear one-line errors, the embedded GGUF model loads exactly, its cache is checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from soaes_core import models
from soaes_core.errors import ModelLoadError
from soaes_core.models import (
    DEFAULT_MODEL,
    _cache_problem,
    embedded_gguf_path,
    load_model,
    load_tokenizer,
    parse_spec,
    resolve_dtype,
    resolve_model_dir,
)
from soaes_core.testing import make_tiny_qwen2
from soaes_core.testing.killed import killed_atomic_writer


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_missing_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "nope")
    assert "does not exist" in one_line(err)


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path)
    assert "not a model directory (no config.json)" in one_line(err)
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file, not a model directory"):
        parse_spec(tmp_path / "f.bin")


def test_corrupt_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path)
    assert "cannot load model" in one_line(err)


def test_unknown_embedded_name_lists_known() -> None:
    with pytest.raises(ModelLoadError) as err:
        parse_spec("embedded:gpt-5")
    assert "unknown embedded model 'gpt-5'; known: smollm2-135m" in one_line(err)


def test_missing_gguf_and_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"GGUF file .* does not exist"):
        parse_spec(f"gguf:{tmp_path / 'm.gguf'}")
    with pytest.raises(ModelLoadError, match="unknown dtype 'float33'"):
        resolve_dtype("float33")
    assert resolve_dtype("bf16") is torch.bfloat16


def test_tiny_qwen2_is_seeded(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    again = make_tiny_qwen2(tmp_path / "again", seed=0)
    other = make_tiny_qwen2(tmp_path / "other", seed=1)
    a, b, c = (load_model(p, dtype="float32") for p in (tiny_qwen2_dir, again, other))
    assert type(a).__name__ == "Qwen2ForCausalLM"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.vocab_size == len(load_tokenizer(tiny_qwen2_dir)) == 49152


@pytest.mark.slow
def test_embedded_greedy_matches_transformers_gguf(embedded_model, embedded_tokenizer) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path("smollm2-135m")
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    for text in ["国资委负责监管国有资本投资运营公司。", "Hello, world! 123", " mixed 混合所有制改革 text\n"]:
        assert embedded_tokenizer(text)["input_ids"] == ref_tok(text)["input_ids"]
    msgs = [{"role": "user", "content": "What is a state-owned enterprise?"}]
    ids = ref_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")["input_ids"]
    ours_ids = embedded_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True,
                                                      return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ours_ids)
    kw = dict(max_new_tokens=40, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=2)
    with torch.inference_mode():
        expected = ref.generate(ids, **kw)
        got = embedded_model.generate(ids, **kw)
    assert torch.equal(expected, got), (ref_tok.decode(expected[0]), ref_tok.decode(got[0]))
    assert got.shape[1] > ids.shape[1] + 5


@pytest.mark.slow
def test_cache_is_reused_and_corruption_is_rebuilt(embedded_model_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOAES_CACHE", str(tmp_path / "cache"))
    cache_dir = models._gguf_cache_dir(embedded_gguf_path("smollm2-135m"))
    shutil.copytree(embedded_model_dir, cache_dir)
    assert resolve_model_dir(DEFAULT_MODEL) == cache_dir  # reused: no rebuild
    weights = cache_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve_model_dir(DEFAULT_MODEL) == cache_dir and weights.stat().st_mtime_ns == mtime

    meta = json.loads((cache_dir / "soaes-cache.json").read_text())
    size = meta["files"]["model.safetensors"]["size"]
    with open(weights, "r+b") as fh:  # flip one byte in the middle: same size, wrong checksum
        fh.seek(size // 2)
        byte = fh.read(1)
        fh.seek(size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert _cache_problem(cache_dir, verify=True) == "model.safetensors checksum mismatch"
    resolve_model_dir(DEFAULT_MODEL)  # detects and rebuilds
    assert _cache_problem(cache_dir, verify=True) is None

    with open(weights, "r+b") as fh:
        fh.truncate(size - 1000)
    assert _cache_problem(cache_dir, verify=False).startswith("model.safetensors truncated")
    model = load_model(DEFAULT_MODEL)  # rebuilt again, loads
    assert model.config.num_hidden_layers == 30 and _cache_problem(cache_dir, verify=True) is None


def test_model_cache_temps_of_killed_builds_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build killed inside `atomic_dir` leaves `$SOAES_CACHE/models/.NAME.….tmp` (a whole model each): the
    next load removes it, for its own entry and for any other (issue 15, defect 9)."""
    monkeypatch.setenv("SOAES_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF-not-really")
    cache_dir = models._gguf_cache_dir(gguf)
    killed_atomic_writer(cache_dir)
    killed_atomic_writer(cache_dir.with_name("other-model-0123456789ab"))
    root = cache_dir.parent
    assert len([p for p in root.iterdir() if p.name.endswith(".tmp")]) == 2
    cache_dir.mkdir()  # a finished cache entry, so no rebuild is needed
    (cache_dir / models.CACHE_META).write_text(json.dumps({"format": models.CACHE_FORMAT, "files": {}}))
    assert models.ensure_gguf_cache(gguf) == cache_dir
    assert sorted(p.name for p in root.iterdir()) == [cache_dir.name]
