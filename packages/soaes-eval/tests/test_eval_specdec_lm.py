"""Acceptance 3: the `soaes-specdec` lm-eval model generates exactly what lm-eval's `hf` model generates (greedy)
on soaes_domain_qa with the same target, reports acceptance, and leaves the built-in models registered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from soaes_core import read_jsonl

Runs = dict[str, tuple[Path, dict[str, Any]]]


def _preds(runs: Runs, name: str) -> list[str]:
    return [p["prediction"] for p in read_jsonl(runs[name][0] / "predictions_soaes_domain_qa.jsonl")]


def test_registry_keeps_builtin_models() -> None:
    pytest.importorskip("soaes_specdec")
    from lm_eval.api.registry import get_model

    import soaes_eval.specdec_lm as specdec_lm

    assert get_model("soaes-specdec") is specdec_lm.SpecDecLM
    assert get_model("hf").__name__ == "HFLM"


def test_specdec_matches_hf_greedy(domain_runs: Runs, tiny_draft_dir: Path) -> None:
    hf, sd = domain_runs["hf"][1], domain_runs["specdec"][1]
    assert len(_preds(domain_runs, "hf")) == 4
    assert _preds(domain_runs, "specdec") == _preds(domain_runs, "hf")
    assert any(_preds(domain_runs, "hf"))  # something was generated
    assert sd["results"]["soaes_domain_qa"]["rouge1,none"] == hf["results"]["soaes_domain_qa"]["rouge1,none"]
    stats = sd["soaes"]["specdec"]
    assert stats["requests"] == 4 and stats["proposed"] > 0
    assert 0.0 <= stats["acceptance_rate"] <= 1.0 and stats["tokens_per_s"] > 0
    assert stats["draft"] == str(tiny_draft_dir) and stats["num_speculative_tokens"] == 3
    assert sd["soaes"]["num_items"]["soaes_domain_qa"] == 4 and sd["soaes"]["backend"] == "specdec"
    assert sd["soaes"]["num_items_available"]["soaes_domain_qa"] == 8  # --limit 4 of the 8 sample items
    assert "specdec" not in hf["soaes"]


def test_layer_draft_and_autoregressive_baseline(domain_runs: Runs) -> None:
    assert _preds(domain_runs, "layer") == _preds(domain_runs, "hf")
    assert _preds(domain_runs, "ar") == _preds(domain_runs, "hf")
    ar, layer = domain_runs["ar"][1]["soaes"]["specdec"], domain_runs["layer"][1]["soaes"]["specdec"]
    assert ar["proposed"] == 0 and ar["acceptance_rate"] is None and ar["draft"] is None
    assert layer["proposed"] > 0 and layer["draft"] == "layers:1"


def test_sampling_args_from_model_args(tiny_qwen2_dir: Path) -> None:
    pytest.importorskip("soaes_specdec")
    from soaes_eval.specdec_lm import SpecDecLM

    lm = SpecDecLM(pretrained=str(tiny_qwen2_dir), draft="layers:1", num_speculative_tokens=2, do_sample="true",
                   temperature=0.7, top_p=0.7, seed=3, device="cpu", batch_size=1)
    assert lm.sampling_overrides == {"do_sample": True, "temperature": 0.7, "top_p": 0.7}
    text = lm._decode_one("问题：什么是国有资产？\n回答：", {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 6})
    assert isinstance(text, str)
    stats = lm.spec_stats()
    assert stats["requests"] == 1 and stats["num_speculative_tokens"] == 2 and stats["new_tokens"] >= 1


def test_saved_restricted_draft_gets_its_restricted_head(tiny_qwen2_dir: Path, tiny_draft_dir: Path,
                                                         tmp_path: Path) -> None:
    """A draft directory with `head_token_ids.json` (as soaes-distill saves it) is loaded with its restricted head."""
    pytest.importorskip("soaes_specdec")
    import json
    import shutil

    from soaes_eval.specdec_lm import SpecDecLM
    from soaes_specdec.draft import HEAD_IDS_FILE, RestrictedLMHead

    draft_dir = tmp_path / "restricted"
    shutil.copytree(tiny_draft_dir, draft_dir)
    (draft_dir / HEAD_IDS_FILE).write_text(json.dumps({"token_ids": list(range(0, 200, 3))}), encoding="utf-8")
    lm = SpecDecLM(pretrained=str(tiny_qwen2_dir), draft=str(draft_dir), num_speculative_tokens=2, device="cpu",
                   batch_size=1)
    head = lm.draft_model.get_output_embeddings()
    assert isinstance(head, RestrictedLMHead) and head.token_ids.tolist() == list(range(0, 200, 3))
    text = lm._decode_one("问题：什么是国有资产？\n回答：", {"until": ["\n\n"], "do_sample": False, "max_gen_toks": 6})
    assert isinstance(text, str) and lm.spec_stats()["proposed"] > 0


def test_draft_with_a_foreign_tokenizer_of_the_same_size_is_refused(tiny_qwen2_dir: Path, tiny_draft_dir: Path,
                                                                    tmp_path: Path) -> None:
    """Issue 15: only vocabulary sizes were compared, so such a draft decoded with ~0 % acceptance."""
    pytest.importorskip("soaes_specdec")
    import shutil

    from soaes_eval.specdec_lm import SpecDecLM
    from soaes_specdec.draft import DraftTokenizerMismatchError
    from soaes_specdec.testing import swap_tokenizer_ids

    draft_dir = tmp_path / "foreign"
    shutil.copytree(tiny_draft_dir, draft_dir)
    swap_tokenizer_ids(draft_dir)
    with pytest.raises(DraftTokenizerMismatchError, match="different tokenizers") as info:
        SpecDecLM(pretrained=str(tiny_qwen2_dir), draft=str(draft_dir), num_speculative_tokens=2, device="cpu",
                  batch_size=1)
    assert str(draft_dir) in str(info.value) and str(tiny_qwen2_dir) in str(info.value)
