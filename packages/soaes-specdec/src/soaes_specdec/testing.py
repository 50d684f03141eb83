"""Test inputs shared by the test suites and the kernel benchmark: random verification blocks, nucleus boundary
cases, support probes of the fused kernel, a same-size foreign tokenizer for draft compatibility checks, and a
deterministic feature draft and prompts that mix lookup and draft blocks for decoding tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
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


TOP_P_BOUNDARY_CASES: list[tuple[float, list[float], list[int]]] = [
    # (top_p, probabilities, kept mask under the nucleus rule of `sampling`); most sum exactly to top_p
    (0.8, [0.3, 0.1, 0.1, 0.5], [1, 0, 0, 1]),  # transformers' test_top_p_dist_warper, first row
    (0.8, [0.15, 0.3, 0.3, 0.25], [0, 1, 1, 1]),  # ... and its second row
    (0.8, [0.6, 0.2, 0.1, 0.05, 0.05], [1, 1, 0, 0, 0]),  # a past kernel bug: the reference kept 2, the kernel 3
    (0.6, [0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1], [1, 1, 1, 0, 0, 0, 0]),
    (0.9, [0.3, 0.3, 0.3, 0.05, 0.05], [1, 1, 1, 0, 0]),
    (0.95, [0.05, 0.9, 0.02, 0.02, 0.01], [1, 1, 0, 0, 0]),
    (0.9, [0.5, 0.4, 0.1], [1, 1, 0]),
    (0.75, [0.5, 0.25, 0.125, 0.125], [1, 1, 0, 0]),
    (0.7, [0.4, 0.3, 0.2, 0.1], [1, 1, 0, 0]),
    (0.5, [0.25, 0.25, 0.25, 0.25], [1, 1, 1, 1]),  # ties at the cut-off are all kept
    (0.71, [0.4, 0.3, 0.2, 0.1], [1, 1, 1, 0]),  # just past a boundary: one more token
]


def support_probe_block(logits: torch.Tensor, tokens: torch.Tensor) -> dict[str, Any]:
    """Verify inputs whose `num_accepted[i]` is 1 iff `tokens[i]` has non-zero warped target probability.

    Row i drafts tokens[i] from a one-hot q with u_accept = 0, so it is accepted iff p(tokens[i]) > 0: this
    reads the kernel's top-k / top-p support (which it never materialises) through its public contract.
    """
    k, vocab = tokens.numel(), logits.shape[-1]
    q = torch.zeros(k, 1, vocab, device=logits.device)
    q[torch.arange(k), 0, tokens] = 1.0
    return dict(target_logits=logits.float().reshape(1, 1, vocab).expand(k, 2, vocab).contiguous(),
                draft_tokens=tokens.reshape(k, 1), draft_probs=q,
                num_draft=torch.ones(k, dtype=torch.long, device=logits.device),
                u_accept=torch.zeros(k, 1, dtype=torch.float64, device=logits.device),
                u_sample=torch.full((k,), 0.5, dtype=torch.float64, device=logits.device))


def swap_tokenizer_ids(model_dir: str | os.PathLike[str], first: int = 1000, second: int = 1001) -> Path:
    """Rewrite `model_dir/tokenizer.json` so the tokens with ids `first` and `second` trade ids.

    The result is a real, loadable tokenizer of the same size that maps two ids to other tokens: the kind of
    foreign tokenizer that a vocabulary-size comparison cannot tell from the original.
    """
    path = Path(model_dir) / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    by_id = {i: tok for tok, i in vocab.items()}
    vocab[by_id[first]], vocab[by_id[second]] = second, first
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def identity_feature_draft(target: Any, alpha: float, layer: int = 0) -> Any:
    """A deterministic, imperfect `FeatureDraft` for tests: the target's layer `layer` reading fc = [I | alpha*I] (the
    token's embedding plus a little of the target's feature), so proposals depend on the features and are accepted
    only in part."""
    from .feature_draft import FeatureDraft

    draft = FeatureDraft.from_target(target, layer=layer)
    hidden = draft.hidden_size
    with torch.no_grad():
        draft.fc.weight.zero_()
        draft.fc.weight[:, :hidden] = torch.eye(hidden)
        draft.fc.weight[:, hidden:] = alpha * torch.eye(hidden)
    return draft


def mixed_lookup_prompts() -> list[torch.Tensor]:
    """Three prompts for decoders with prompt lookup: one repeats a 4-gram (lookup matches from the start), two are
    random (the draft proposes): a batch of them mixes lookup and draft blocks."""
    g = torch.Generator().manual_seed(5)
    return [torch.tensor([7, 8, 9, 10] * 3), torch.randint(2, 512, (9,), generator=g),
            torch.randint(2, 512, (5,), generator=g)]


# ms per pass measured by `benchmarks/specdec/row_cost.py --rows 1,2,4,6 --with-head` on an AMD EPYC Zen 4 host
# (2 threads) where MKL prepacking loses: a calibration file for tests of path choice and block-size policy
STREAM_WINS_COST_TABLE = """\
ms:
  fp32 stream_linear: {1: 21.8, 2: 21.1, 4: 28.5, 6: 43.6}
  fp32 MKL prepacked: {1: 37.6, 2: 55.3, 4: 66.6, 6: 56.4}
  fp32 F.linear: {1: 45.3, 2: 73.7, 4: 67.9, 6: 61.4}
  bf16 F.linear: {1: 25.6, 2: 24.4, 4: 25.1, 6: 25.0}
"""
