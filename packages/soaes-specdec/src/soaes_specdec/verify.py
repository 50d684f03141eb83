"""The verification step of speculative decoding, as a pure-PyTorch reference (the fused kernel's oracle).

Greedy (paper Eq. 3): accept draft tokens while they equal the target's argmax; the next token is the
target's argmax at the first mismatch (or the bonus position). Sampling (Leviathan et al. 2023; paper
Eq. 4): accept draft token x_i with probability min(1, p_i(x_i) / q_i(x_i)), drawn as u_i * q < p with
float64 uniforms; at the first rejection sample from the normalised residual max(p_i - q_i, 0); if all n
are accepted, sample the bonus token from p_n. `q` must be exactly the fp32 distribution each draft token
was drawn from (after the same warpers), or the output is biased.
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams, sample_inverse_cdf, warp_probs


def first_rejection(accepted: torch.Tensor) -> torch.Tensor:
    """Number of leading True values per row of a [B, n] bool tensor (= accepted draft tokens)."""
    return torch.cumprod(accepted.to(torch.int64), dim=-1).sum(dim=-1)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor,
                  num_draft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: target_logits [B, n+1, V], draft_tokens [B, n] -> (num_accepted [B], next_token [B]).

    `num_draft` [B] (default n) is how many leading draft tokens of each row are real proposals.
    """
    target_tokens = torch.argmax(target_logits, dim=-1)
    num_accepted = first_rejection(draft_tokens == target_tokens[:, :-1])
    if num_draft is not None:
        num_accepted = torch.minimum(num_accepted, num_draft)
    next_token = torch.gather(target_tokens, 1, num_accepted.unsqueeze(1)).squeeze(1)
    return num_accepted, next_token


def residual_weights(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalised residual distribution max(p - q, 0) that a rejected position is resampled from."""
    return torch.clamp(p - q, min=0.0)


def acceptance_mask(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor,
                    u_accept: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: accept x_i iff u_i < p_i(x_i) / q_i(x_i), evaluated as u_i * q < p in float64."""
    idx = draft_tokens.unsqueeze(-1)
    p_x = torch.gather(p, -1, idx).squeeze(-1).double()
    q_x = torch.gather(q, -1, idx).squeeze(-1).double()
    return u_accept.double() * q_x < p_x


def verify_sampling(p: torch.Tensor, q: torch.Tensor | None, draft_tokens: torch.Tensor, u_accept: torch.Tensor,
                    u_sample: torch.Tensor, num_draft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection-sampling verification on warped fp32 distributions.

    p [B, n+1, V] (target), q [B, n, V] (draft), draft_tokens [B, n], u_accept [B, n] and u_sample [B]
    float64 uniforms; `num_draft` [B] (default n) counts each row's real proposals. Returns
    (num_accepted [B], next_token [B]): the residual sample at the first rejection, or the bonus token
    from p at position num_draft when every real proposal was accepted.
    """
    batch, n = draft_tokens.shape
    rows = torch.arange(batch, device=p.device)
    if n == 0 or q is None:
        num_accepted = torch.zeros(batch, dtype=torch.long, device=p.device)
        return num_accepted, sample_inverse_cdf(p[:, 0], u_sample)
    num_accepted = first_rejection(acceptance_mask(p[:, :n], q, draft_tokens, u_accept))
    if num_draft is None:
        num_draft = torch.full_like(num_accepted, n)
    num_accepted = torch.minimum(num_accepted, num_draft)
    p_at = p[rows, num_accepted]
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
    q_at = q_pad[rows, num_accepted] * (num_accepted < num_draft).unsqueeze(-1)  # bonus: residual of p and 0 is p
    weights = residual_weights(p_at, q_at)
    empty = weights.sum(dim=-1, keepdim=True) <= 0  # only possible through rounding when p == q
    weights = torch.where(empty, p_at, weights)
    return num_accepted, sample_inverse_cdf(weights, u_sample)


def verify_reference(target_logits: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                     num_draft: torch.Tensor | None, params: SamplingParams, u_accept: torch.Tensor | None = None,
                     u_sample: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full verification from raw target logits [B, n+1, V] (warping included); the kernel's contract."""
    if not params.do_sample:
        return verify_greedy(target_logits, draft_tokens, num_draft)
    assert u_accept is not None and u_sample is not None
    return verify_sampling(warp_probs(target_logits, params), draft_probs, draft_tokens, u_accept, u_sample,
                           num_draft)


KERNEL_MAX_VOCAB = 65_536
"""Auto mode uses the fused kernel up to this vocabulary size: past it the kernel's one-program-per-row loops
grow too long to beat the PyTorch reference (measurements: docs/benchmarks.md, "GPU")."""


def kernel_available(device: torch.device, vocab_size: int | None = None) -> bool:
    """Whether auto mode runs the fused Triton kernel: CUDA device, triton importable, vocabulary not too large."""
    if device.type != "cuda" or (vocab_size is not None and vocab_size > KERNEL_MAX_VOCAB):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def verify_block(target_logits: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                 num_draft: torch.Tensor | None, params: SamplingParams, generator: torch.Generator | None = None,
                 use_kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the float64 uniforms and verify one block with the fused kernel (auto: `kernel_available`) or reference."""
    batch, n = draft_tokens.shape
    u_accept = u_sample = None
    if params.do_sample:
        gen_device = generator.device if generator is not None else target_logits.device
        u_accept = torch.rand((batch, n), dtype=torch.float64, device=gen_device, generator=generator)
        u_sample = torch.rand((batch,), dtype=torch.float64, device=gen_device, generator=generator)
        u_accept, u_sample = u_accept.to(target_logits.device), u_sample.to(target_logits.device)
    if use_kernel is None:
        use_kernel = kernel_available(target_logits.device, target_logits.shape[-1])
    if use_kernel and n > 0:
        from .kernel import verify_fused

        return verify_fused(target_logits, draft_tokens, draft_probs, num_draft, params, u_accept, u_sample)
    return verify_reference(target_logits, draft_tokens, draft_probs, num_draft, params, u_accept, u_sample)
