"""Draft initialisation: layer draft saves/reloads; a restricted head maps back to the full vocabulary
exactly and still decodes exactly with soaes_specdec (greedy output = target's)."""

from __future__ import annotations

import copy
import json

import torch

from soaes_core import load_model
from soaes_distill.draft_init import frequent_tokens, load_draft, make_small_draft, restrict_output_head, save_draft
from soaes_specdec.decoding import SpeculativeDecoder, autoregressive_generate
from soaes_specdec.draft import make_layer_draft


def test_restricted_head_is_exact_on_its_tokens(tiny_qwen2) -> None:
    model = copy.deepcopy(tiny_qwen2)
    ids = torch.tensor([[1, 5, 77, 300, 9]])
    full = model(input_ids=ids).logits
    keep = frequent_tokens([[5, 5, 77, 9], [77, 123]], size=3, always=[0])
    assert keep == [0, 5, 9, 77]
    restrict_output_head(model, keep)
    got = model(input_ids=ids).logits
    torch.testing.assert_close(got[..., keep], full[..., keep], rtol=1e-5, atol=1e-6)  # GEMM order only
    others = torch.ones(full.shape[-1], dtype=torch.bool)
    others[keep] = False
    assert torch.isinf(got[..., others]).all()
    assert model.get_output_embeddings().weight.shape == (*full.shape[-1:], 64)


def test_layer_draft_round_trip_and_exact_spec_decoding(tmp_path, tiny_qwen2, embedded_tokenizer) -> None:
    draft = make_layer_draft(tiny_qwen2, 1)
    ids = frequent_tokens([embedded_tokenizer("the state assets of the company")["input_ids"]], 2000,
                          always=embedded_tokenizer.all_special_ids)
    out = save_draft(draft, embedded_tokenizer, tmp_path / "draft", ids, {"kind": "first-layers"})
    assert json.loads((out / "manifest.json").read_text())["counts"]["head_tokens"] == len(ids)
    reloaded = load_draft(out, dtype=torch.float32, device="cpu")
    assert reloaded.config.num_hidden_layers == 1
    prompt = torch.tensor([embedded_tokenizer("the state assets")["input_ids"]])
    ref = autoregressive_generate(tiny_qwen2, prompt, max_new_tokens=12)
    spec = SpeculativeDecoder(tiny_qwen2, reloaded, num_speculative_tokens=3).generate(prompt, max_new_tokens=12)
    assert torch.equal(spec.sequences, ref.sequences)
    plain = load_model(out, dtype=torch.float32, device="cpu")  # full head still loadable as a normal HF dir
    assert plain.get_output_embeddings().weight.shape[0] == 49152


def test_small_config_draft(tiny_qwen2) -> None:
    small = make_small_draft(tiny_qwen2, num_layers=1, hidden_size=32, intermediate_size=64,
                             num_attention_heads=2, num_key_value_heads=1)
    assert small.config.vocab_size == tiny_qwen2.config.vocab_size and small.config.hidden_size == 32
    assert small(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 49152)


def test_saving_an_already_restricted_draft_round_trips(tmp_path, tiny_qwen2, embedded_tokenizer) -> None:
    draft = restrict_output_head(make_layer_draft(tiny_qwen2, 1), [0, 5, 9, 77, 300])
    with torch.no_grad():
        draft.get_output_embeddings().sub_weight.mul_(1.5)  # trained after the restriction
    out = save_draft(draft, embedded_tokenizer, tmp_path / "r", None, {"kind": "restricted"})
    assert json.loads((out / "head_token_ids.json").read_text())["token_ids"] == [0, 5, 9, 77, 300]
    reloaded = load_draft(out, dtype=torch.float32, device="cpu")
    ids = torch.tensor([[1, 5, 77, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, draft(input_ids=ids).logits)
    assert not torch.equal(load_model(out, dtype=torch.float32).get_output_embeddings().weight[5],
                           tiny_qwen2.get_output_embeddings().weight[5])  # the trained row was saved
