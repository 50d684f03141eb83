"""Online distillation: the stream is served by soaes_specdec, rejected positions are buffered and the
draft is updated once the buffer passes its threshold."""

from __future__ import annotations

import torch

from soaes_distill.online import OnlineConfig, online_distill, rejected_positions
from soaes_specdec.draft import make_layer_draft


def test_online_distillation_updates_draft(tiny_qwen2, embedded_tokenizer) -> None:
    draft = make_layer_draft(tiny_qwen2, 1)
    before = [p.detach().clone() for p in draft.parameters()]
    prompts = [embedded_tokenizer(t)["input_ids"] for t in
               ["state assets", "the board of", "国有企业", "dividend policy", "audit report", "mixed ownership"]]
    seq = torch.tensor(prompts[0] + [5, 6, 7, 8])
    pos, logits = rejected_positions(tiny_qwen2, draft, seq, len(prompts[0]))
    assert logits.shape == (pos.numel(), 49152) and (pos >= len(prompts[0]) - 1).all()
    res = online_distill(tiny_qwen2, draft, prompts,
                         OnlineConfig(max_new_tokens=8, buffer_threshold=6, update_steps=2, learning_rate=1e-3))
    assert len(res.acceptance) == 6 and all(0.0 <= a <= 1.0 for a in res.acceptance)
    assert res.updates >= 1 and res.buffered_positions >= 6
    assert any(not torch.equal(a, b) for a, b in zip(before, draft.parameters()))
    assert 0.0 <= res.window_acceptance(0, 3) <= 1.0
