"""make_layer_draft keeps the first k layers with a tied head, leaves the target alone, and round-trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from soaes_core import load_model
from soaes_core.errors import InvalidArgumentError
from soaes_specdec.draft import make_layer_draft


def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_keeps_first_layers_and_ties_head(family: str, qwen2_factory: Any, tmp_path: Path) -> None:
    target = tiny_llama() if family == "llama" else qwen2_factory(0, layers=4)
    draft = make_layer_draft(target, 2)
    assert len(draft.model.layers) == 2 and draft.config.num_hidden_layers == 2
    assert len(target.model.layers) == 4 and target.config.num_hidden_layers == 4
    assert draft.lm_head.weight.data_ptr() == draft.model.embed_tokens.weight.data_ptr()
    assert draft.model.embed_tokens.weight.data_ptr() != target.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(draft.model.layers[1].mlp.up_proj.weight, target.model.layers[1].mlp.up_proj.weight)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.inference_mode():
        # With all layers kept the draft is the target.
        torch.testing.assert_close(make_layer_draft(target, 4)(ids).logits, target(ids).logits)
        draft.save_pretrained(tmp_path)
        torch.testing.assert_close(load_model(tmp_path, dtype=torch.float32)(ids).logits, draft(ids).logits)


@pytest.mark.parametrize("k", [0, 5, 2.0, True])
def test_bad_layer_count(k: Any, qwen2_factory: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="num_layers"):
        make_layer_draft(qwen2_factory(0, layers=4), k)


def test_unsupported_model() -> None:
    with pytest.raises(InvalidArgumentError, match=r"model\.model\.layers"):
        make_layer_draft(torch.nn.Linear(2, 2), 1)


def test_load_draft_applies_recorded_restricted_head(qwen2_factory: Any, tmp_path: Path) -> None:
    import json

    from soaes_core.errors import ModelLoadError
    from soaes_specdec.draft import HEAD_IDS_FILE, RestrictedLMHead, load_draft

    target = qwen2_factory(0, layers=2)
    draft = make_layer_draft(target, 1)
    draft.save_pretrained(tmp_path / "d", safe_serialization=True)
    keep = [0, 3, 7, 11, 12]
    (tmp_path / "d" / HEAD_IDS_FILE).write_text(json.dumps({"token_ids": keep}))
    loaded = load_draft(tmp_path / "d", dtype=torch.float32, device="cpu")
    assert isinstance(loaded.get_output_embeddings(), RestrictedLMHead)
    ids = torch.tensor([[1, 2, 3]])
    full, got = draft(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(got[..., keep], full[..., keep], rtol=1e-5, atol=1e-6)
    assert torch.isinf(got[..., [1, 2, 4]]).all()
    assert not isinstance(load_draft(tmp_path / "d", restrict_head=False).get_output_embeddings(), RestrictedLMHead)
    (tmp_path / "d" / HEAD_IDS_FILE).write_text("{")
    with pytest.raises(ModelLoadError, match="unreadable restricted-head token ids"):
        load_draft(tmp_path / "d")
