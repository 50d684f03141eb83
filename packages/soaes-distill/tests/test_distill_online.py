"""Online distillation: the stream is served by soaes_specdec, rejected positions are buffered and the
draft is updated once the buffer passes its threshold."""

from __future__ import annotations

import torch

from soaes_distill.draft_init import make_small_draft
from soaes_distill.online import OnlineConfig, online_distill, rejected_positions


def test_online_distillation_updates_draft(tiny_qwen2, embedded_tokenizer) -> None:
    draft = make_small_draft(tiny_qwen2, num_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                             num_key_value_heads=1, seed=5)  # a random draft: disagrees often
    before = [p.detach().clone() for p in draft.parameters()]
    prompts = [embedded_tokenizer(t)["input_ids"] for t in
               ["state assets", "the board of", "国有企业", "dividend policy", "audit report", "mixed ownership"]]
    seq = torch.tensor(prompts[0] + [5, 6, 7, 8])
    pos, logits = rejected_positions(tiny_qwen2, draft, seq, len(prompts[0]))
    assert logits.shape == (pos.numel(), 49152) and (pos >= len(prompts[0]) - 1).all()
    res = online_distill(tiny_qwen2, draft, prompts,
                         OnlineConfig(max_new_tokens=8, buffer_threshold=2, update_steps=2, learning_rate=1e-3))
    assert len(res.acceptance) == 6 and all(0.0 <= a <= 1.0 for a in res.acceptance)
    assert res.updates >= 1 and res.buffered_positions >= 2
    assert any(not torch.equal(a, b) for a, b in zip(before, draft.parameters(), strict=False))
    assert 0.0 <= res.window_acceptance(0, 3) <= 1.0
