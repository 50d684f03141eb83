"""Acceptance 1: a packed batch gives the same loss and gradients as its sequences run one by one, for every
attention implementation available here; wrong position_ids (or a KV cache) are detected as leakage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from soaes_core.errors import ConfigError
from soaes_data.packing import pack_examples
from soaes_train.attention import (
    available_attn_implementations,
    choose_attn_implementation,
    flash_attn_available,
    packed_layout_for,
    packed_logits_gap,
)
from soaes_train.collator import PackedCollator

LENGTHS = [5, 9, 3, 7, 12, 4, 6, 2, 10]
MAX_LEN = 20


def _examples(vocab: int = 4000, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(LENGTHS):
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        labels = list(ids)
        if k % 2:  # SFT-style: a masked prompt prefix
            labels[: n // 2] = [-100] * (n // 2)
        out.append({"input_ids": ids, "labels": labels})
    return out


def _reference(model, examples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-mean loss of the sequences run separately (same normalisation as the packed batch) + grads."""
    model.zero_grad()
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        logits = model(input_ids=ids, use_cache=False).logits[0]
        tgt = torch.tensor(ex["labels"][1:])
        total = total + F.cross_entropy(logits[:-1].float(), tgt, ignore_index=-100, reduction="sum")
        count += int((tgt != -100).sum())
    loss = total / count
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _packed(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_rel_grad_diff(g1: dict[str, torch.Tensor], g2: dict[str, torch.Tensor]) -> float:
    assert g1.keys() == g2.keys()
    return max(float((g1[n] - g2[n]).abs().max() / g2[n].abs().max().clamp_min(1e-30)) for n in g2)


def _model(path: Path, impl: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    model.train()
    return model


IMPLS = ["sdpa", "eager", pytest.param("flash_attention_2", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["rows", "flatten"])
def test_packed_equals_unpacked_loss_and_grads(tiny_qwen2_dir: Path, impl: str, layout: str) -> None:
    if impl == "flash_attention_2" and not flash_attn_available():
        pytest.skip("flash-attn not installed")
    model = _model(tiny_qwen2_dir, impl)
    examples = _examples()
    rows = pack_examples(examples, MAX_LEN)
    assert len(rows) >= 3  # batch size > 1, rows of different lengths
    batch = PackedCollator(pad_token_id=0, layout=layout)(rows)
    batch["use_cache"] = False
    ref_loss, ref_grads = _reference(model, examples)
    loss, grads = _packed(model, batch)
    assert abs(float(loss) - float(ref_loss)) / float(ref_loss) <= 1e-5
    assert _max_rel_grad_diff(grads, ref_grads) <= 1e-5


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_leakage_detected_with_wrong_position_ids_or_cache(tiny_qwen2_dir: Path, impl: str) -> None:
    model = _model(tiny_qwen2_dir, impl)
    examples = _examples()
    rows = pack_examples(examples, MAX_LEN)
    ref_loss, ref_grads = _reference(model, examples)
    good = PackedCollator(pad_token_id=0)(rows)
    # 1) position_ids that run on across sequences: one causal block, sequences see each other
    wrong = dict(good, position_ids=torch.arange(good["input_ids"].shape[1]).expand_as(good["input_ids"]).clone(),
                 use_cache=False)
    loss, grads = _packed(model, wrong)
    assert abs(float(loss) - float(ref_loss)) / float(ref_loss) > 1e-4
    assert _max_rel_grad_diff(grads, ref_grads) > 1e-3
    # 2) right position_ids but a KV cache: transformers then skips packed-sequence detection
    loss, grads = _packed(model, dict(good, use_cache=True))
    assert abs(float(loss) - float(ref_loss)) / float(ref_loss) > 1e-4
    # the self-check used before training reports exact packing as ~0 and leaks as large
    model.eval()
    seqs = [e["input_ids"] for e in examples[:3]]
    assert packed_logits_gap(model, seqs) < 1e-5


def test_logit_gap_flags_leak_when_mask_is_ignored(tiny_qwen2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If packed-sequence detection is disabled (as in older transformers), the self-check catches it."""
    import transformers.masking_utils as mu

    model = _model(tiny_qwen2_dir, "sdpa").eval()
    seqs = [e["input_ids"] for e in _examples()[:3]]
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    assert packed_logits_gap(model, seqs) > 1e-2


def test_choose_implementation() -> None:
    impls = available_attn_implementations()
    assert "sdpa" in impls and "eager" in impls
    assert choose_attn_implementation("auto") == impls[0]
    assert choose_attn_implementation("eager") == "eager"
    assert packed_layout_for("flash_attention_2") == "flatten"
    assert packed_layout_for("sdpa") == "rows"
    if not flash_attn_available():
        with pytest.raises(ConfigError, match="flash_attention_2"):
            choose_attn_implementation("flash_attention_2")
