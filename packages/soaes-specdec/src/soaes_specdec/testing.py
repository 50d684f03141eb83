"""Random verification-step inputs, shared by the kernel tests (CPU interpreter, CUDA) and the kernel benchmark."""

from __future__ import annotations

from typing import Any

import torch

from .sampling import SamplingParams, warp_probs


def random_verify_block(batch: int, n: int, vocab: int, params: SamplingParams, seed: int,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        agree: float = 0.7) -> dict[str, Any]:
    """Keyword arguments for `verify_reference` / `verify_fused` (all but `params`), drawn from one seeded generator.

    Target logits [batch, n+1, vocab] in `dtype`; draft logits = target + noise. Sampling: drafts drawn from the
    warped draft distribution q. Greedy: each draft equals the target's argmax with probability `agree`, else
    a random token. Per-row `num_draft` in 1..n and float64 uniforms.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(batch, n + 1, vocab, generator=g, device=device) * 3).to(dtype)
    draft_logits = logits[:, :n].float() + torch.randn(batch, n, vocab, generator=g, device=device)
    q = warp_probs(draft_logits, params) if params.do_sample else None
    if q is not None:
        drafts = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).reshape(batch, n)
    else:
        hit = torch.rand(batch, n, generator=g, device=device) < agree
        drafts = torch.where(hit, logits[:, :n].float().argmax(-1),
                             torch.randint(0, vocab, (batch, n), generator=g, device=device))
    return dict(target_logits=logits, draft_tokens=drafts, draft_probs=q,
                num_draft=torch.randint(1, n + 1, (batch,), generator=g, device=device),
                u_accept=torch.rand(batch, n, dtype=torch.float64, generator=g, device=device),
                u_sample=torch.rand(batch, dtype=torch.float64, generator=g, device=device))
