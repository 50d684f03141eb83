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


# --- the draft's tokenizer must be the target's (issue 15: equal vocabulary sizes alone were accepted) ---------


@pytest.fixture(scope="module")
def own_draft_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """A one-layer tiny Qwen2 saved with the target's (embedded SmolLM2) tokenizer."""
    from soaes_core.testing import make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("own-draft"), seed=1, num_hidden_layers=1)


@pytest.fixture(scope="module")
def foreign_draft_dir(tmp_path_factory: pytest.TempPathFactory, own_draft_dir: Path) -> Path:
    """The same draft with a tokenizer of the same size in which two tokens trade ids."""
    import shutil

    from soaes_specdec.testing import swap_tokenizer_ids

    out = tmp_path_factory.mktemp("foreign-draft") / "draft"
    shutil.copytree(own_draft_dir, out)
    swap_tokenizer_ids(out, 1000, 1001)
    return out


def test_same_size_foreign_tokenizer_is_refused(tiny_qwen2_dir: Path, foreign_draft_dir: Path) -> None:
    from soaes_core import load_tokenizer
    from soaes_core.errors import SoaesError
    from soaes_specdec.draft import DraftTokenizerMismatchError, load_draft

    target_tok, draft_tok = load_tokenizer(tiny_qwen2_dir), load_tokenizer(foreign_draft_dir)
    assert len(target_tok) == len(draft_tok)  # what the old size-only check compared
    assert draft_tok.convert_ids_to_tokens(1000) == target_tok.convert_ids_to_tokens(1001)
    with pytest.raises(DraftTokenizerMismatchError) as info:
        load_draft(foreign_draft_dir, target=tiny_qwen2_dir)
    message = str(info.value)
    assert isinstance(info.value, SoaesError) and "\n" not in message
    assert str(foreign_draft_dir) in message and str(tiny_qwen2_dir) in message and "different tokenizers" in message


def test_draft_with_the_targets_ids_is_accepted(tiny_qwen2_dir: Path, own_draft_dir: Path) -> None:
    from soaes_specdec.draft import check_draft_tokenizer, load_draft

    draft = load_draft(own_draft_dir, target=tiny_qwen2_dir, dtype=torch.float32, device="cpu")
    assert draft.config.num_hidden_layers == 1
    # the embedded GGUF tokenizer and its copy reloaded into a Qwen2 directory normalise text differently, but map
    # ids to the same tokens: for a draft, which only sees ids, that is the same tokenizer
    check_draft_tokenizer("embedded:smollm2-135m", own_draft_dir)


def test_other_special_tokens_are_refused(tiny_qwen2_dir: Path, own_draft_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from soaes_specdec.draft import DraftTokenizerMismatchError, check_draft_tokenizer

    draft = tmp_path / "draft"
    shutil.copytree(own_draft_dir, draft)
    config_file = draft / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    assert config["eos_token"] != "<|endoftext|>"
    config["eos_token"] = "<|endoftext|>"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(DraftTokenizerMismatchError, match="different tokenizers"):
        check_draft_tokenizer(tiny_qwen2_dir, draft)


def test_draft_without_a_tokenizer_cannot_be_checked(tiny_qwen2_dir: Path, own_draft_dir: Path,
                                                     tmp_path: Path) -> None:
    import shutil

    from soaes_specdec.draft import DraftTokenizerMismatchError, load_draft

    draft = tmp_path / "draft"
    shutil.copytree(own_draft_dir, draft, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    with pytest.raises(DraftTokenizerMismatchError, match="no loadable tokenizer"):
        load_draft(draft, target=tiny_qwen2_dir)
    assert load_draft(draft).config.num_hidden_layers == 1  # without a target nothing is compared


def test_cli_refuses_a_foreign_draft_in_one_line(tiny_qwen2_dir: Path, foreign_draft_dir: Path,
                                                 tmp_path: Path) -> None:
    from click.testing import CliRunner

    from soaes_specdec.cli import main

    runs = {"bench": ["bench", "--target", str(tiny_qwen2_dir), "--draft", str(foreign_draft_dir), "--max-prompts",
                      "1", "--max-new-tokens", "4", "-o", str(tmp_path / "bench")],
            "generate": ["generate", "Hi", "--target", str(tiny_qwen2_dir), "--draft", str(foreign_draft_dir),
                         "--max-new-tokens", "4"]}
    for name, args in runs.items():
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (name, result.output)
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in result.output, (name, result.output)
        assert str(foreign_draft_dir) in errors[0] and str(tiny_qwen2_dir) in errors[0]
        if name == "bench":  # refused before any model is loaded: nothing else is printed
            assert result.output.strip().splitlines() == errors
