"""Fused Triton kernels for the verification step (one program per batch row; compiles to CUDA on GPUs).

Sampling kernel, per row: for each draft position, warp the target logits (temperature, top-k, top-p) over
the whole vocabulary without materialising them, test acceptance u * q(x) < p(x) in float64, and at the
first rejection (or the bonus position) draw from the residual max(p - q, 0) by inverse CDF in float64.
Top-k / top-p cut-offs are found exactly by binary search on float bit patterns, so no sort is needed and
ties are kept, as in `sampling.apply_top_k` / `apply_top_p`; the nucleus is the smallest set {p >= t} whose
float64-summed mass reaches `sampling.top_p_limit(top_p)` (the rule documented in `sampling`). The pure-PyTorch
oracle is `verify.verify_reference`; on CPU the kernels run under TRITON_INTERPRET=1 for testing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .sampling import SamplingParams, top_p_limit


@triton.jit
def _order_key(x):
    """int32 key whose signed order equals the float order of x (fp32)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _scaled(row_ptr, offs, V, temperature):
    return tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) / temperature


@triton.jit
def _position_stats(row_ptr, V, temperature, top_k, top_p_limit, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Max m, top-k key cut-off, top-k mass z_k, top-p prob cut-off and final mass z of one logits row."""
    m = float("-inf")
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.max(_scaled(row_ptr, offs, V, temperature), 0))
    key_cut = tl.full((), -2147483648, tl.int64)
    if USE_TOP_K:
        hi = _order_key(m).to(tl.int64) + 1
        lo = key_cut
        for _ in range(33):
            mid = (lo + hi) >> 1
            count = tl.zeros((), dtype=tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                key = _order_key(_scaled(row_ptr, offs, V, temperature)).to(tl.int64)
                count += tl.sum(((key >= mid) & (offs < V)).to(tl.int32), 0)
            ok = count >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        key_cut = lo
    z_k = tl.zeros((), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = _scaled(row_ptr, offs, V, temperature)
        e = tl.where(_order_key(x).to(tl.int64) >= key_cut, tl.exp(x - m), 0.0)
        z_k += tl.sum(e, 0)
    p_cut = tl.zeros((), dtype=tl.float32)
    z = z_k
    if USE_TOP_P:
        lo_b = tl.zeros((), dtype=tl.int64)
        hi_b = (1.0 / z_k).to(tl.int32, bitcast=True).to(tl.int64) + 1
        for _ in range(32):
            mid_b = (lo_b + hi_b) >> 1
            t = mid_b.to(tl.int32).to(tl.float32, bitcast=True)
            mass = tl.zeros((), dtype=tl.float64)  # float64: the sum's blocking cannot flip the decision
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = _scaled(row_ptr, offs, V, temperature)
                e = tl.where(_order_key(x).to(tl.int64) >= key_cut, tl.exp(x - m), 0.0)
                p = e / z_k
                mass += tl.sum(tl.where(p >= t, p, 0.0).to(tl.float64), 0)
            ok = mass >= top_p_limit  # an fp32 value (see `top_p_limit`), compared exactly in float64
            lo_b = tl.where(ok, mid_b, lo_b)
            hi_b = tl.where(ok, hi_b, mid_b)
        p_cut = lo_b.to(tl.int32).to(tl.float32, bitcast=True)
        z = tl.zeros((), dtype=tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = _scaled(row_ptr, offs, V, temperature)
            e = tl.where(_order_key(x).to(tl.int64) >= key_cut, tl.exp(x - m), 0.0)
            z += tl.sum(tl.where(e / z_k >= p_cut, e, 0.0), 0)
    return m, key_cut, z_k, p_cut, z


@triton.jit
def _warped_probs(row_ptr, offs, V, temperature, m, key_cut, z_k, p_cut, z):
    """Final warped probabilities at `offs` (0 for filtered tokens and out-of-range offsets)."""
    x = _scaled(row_ptr, offs, V, temperature)
    e = tl.where(_order_key(x).to(tl.int64) >= key_cut, tl.exp(x - m), 0.0)
    e = tl.where(e / z_k >= p_cut, e, 0.0)
    return tl.where(offs < V, e / z, 0.0)


@triton.jit
def _verify_sampling_kernel(logits_ptr, q_ptr, draft_ptr, num_draft_ptr, u_accept_ptr, u_sample_ptr,
                            out_accepted_ptr, out_token_ptr, n, V, temperature, top_k, top_p_limit,
                            USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch * (n + 1) * vocab can pass 2**31
    nd = tl.load(num_draft_ptr + b)
    accepted = nd
    stopped = 0
    for i in range(0, nd):
        if stopped == 0:
            row = logits_ptr + (b * (n + 1) + i) * V
            m, key_cut, z_k, p_cut, z = _position_stats(row, V, temperature, top_k, top_p_limit, USE_TOP_K,
                                                         USE_TOP_P, BLOCK)
            x_tok = tl.load(draft_ptr + b * n + i)
            p_x = tl.sum(_warped_probs(row, x_tok + tl.arange(0, 1), V, temperature, m, key_cut, z_k, p_cut, z),
                         0).to(tl.float64)
            q_x = tl.load(q_ptr + (b * n + i) * V + x_tok).to(tl.float64)
            u = tl.load(u_accept_ptr + b * n + i)
            if u * q_x >= p_x:
                accepted = nd * 0 + i  # keep the loop-carried type (int64) in compiled mode
                stopped = 1
    row = logits_ptr + (b * (n + 1) + accepted) * V
    m, key_cut, z_k, p_cut, z = _position_stats(row, V, temperature, top_k, top_p_limit, USE_TOP_K, USE_TOP_P,
                                                 BLOCK)
    q_limit = tl.where(accepted < nd, V, 0)  # bonus position: q = 0
    q_row = q_ptr + (b * n + accepted) * V
    total = tl.zeros((), dtype=tl.float64)
    total_p = tl.zeros((), dtype=tl.float64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        p = _warped_probs(row, offs, V, temperature, m, key_cut, z_k, p_cut, z)
        q = tl.load(q_row + offs, mask=offs < q_limit, other=0.0)
        total += tl.sum(tl.maximum(p - q, 0.0).to(tl.float64), 0)
        total_p += tl.sum(p.to(tl.float64), 0)
    use_residual = total > 0  # only false through rounding when p == q: fall back to p
    q_limit = tl.where(use_residual, q_limit, 0)
    target = tl.load(u_sample_ptr + b) * tl.where(use_residual, total, total_p)
    cum = tl.zeros((), dtype=tl.float64)
    token = V
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        p = _warped_probs(row, offs, V, temperature, m, key_cut, z_k, p_cut, z)
        q = tl.load(q_row + offs, mask=offs < q_limit, other=0.0)
        w = tl.maximum(p - q, 0.0).to(tl.float64)
        c = cum + tl.cumsum(w, 0)
        hit = (c > target) & (offs < V)
        token = tl.minimum(token, tl.min(tl.where(hit, offs, V), 0))
        cum += tl.sum(w, 0)
    tl.store(out_accepted_ptr + b, accepted.to(tl.int64))
    tl.store(out_token_ptr + b, tl.minimum(token, V - 1).to(tl.int64))


@triton.jit
def _row_argmax(row_ptr, V, BLOCK: tl.constexpr):
    """First index of the maximum of one logits row."""
    best = float("-inf")
    best_idx = V
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        bmax = tl.max(x, 0)
        bidx = tl.min(tl.where((x == bmax) & (offs < V), offs, V), 0)
        take = bmax > best
        best_idx = tl.where(take, bidx, best_idx)
        best = tl.where(take, bmax, best)
    return tl.minimum(best_idx, V - 1)


@triton.jit
def _verify_greedy_kernel(logits_ptr, draft_ptr, num_draft_ptr, out_accepted_ptr, out_token_ptr, n, V,
                          BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    nd = tl.load(num_draft_ptr + b)
    accepted = nd
    stopped = 0
    for i in range(0, nd):
        if stopped == 0:
            top = _row_argmax(logits_ptr + (b * (n + 1) + i) * V, V, BLOCK)
            if top != tl.load(draft_ptr + b * n + i):
                accepted = nd * 0 + i
                stopped = 1
    token = _row_argmax(logits_ptr + (b * (n + 1) + accepted) * V, V, BLOCK)
    tl.store(out_accepted_ptr + b, accepted.to(tl.int64))
    tl.store(out_token_ptr + b, token.to(tl.int64))


def verify_fused(target_logits: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                 num_draft: torch.Tensor | None, params: SamplingParams, u_accept: torch.Tensor | None,
                 u_sample: torch.Tensor | None, block: int | None = None, num_warps: int = 16,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `verify.verify_reference`: (num_accepted [B], next_token [B]) for one block.

    `block` is the vocabulary tile per loop step: 16384 on GPUs, with `num_warps` 16 (the fastest of the launch
    settings swept on an H200, `benchmarks/specdec/kernel_bench.py`); the whole vocabulary in one tile under
    TRITON_INTERPRET=1, where each step is a numpy call and fewer, larger steps are much faster.
    """
    batch, n = draft_tokens.shape
    vocab = target_logits.shape[-1]
    device = target_logits.device
    logits = target_logits.contiguous()
    drafts = draft_tokens.contiguous().long()
    nd = (num_draft if num_draft is not None else torch.full((batch,), n, device=device)).contiguous().long()
    accepted = torch.empty(batch, dtype=torch.long, device=device)
    token = torch.empty(batch, dtype=torch.long, device=device)
    if block is None:
        block = triton.next_power_of_2(vocab) if os.environ.get("TRITON_INTERPRET") == "1" else 16384
    block = min(block, triton.next_power_of_2(vocab))
    if not params.do_sample:
        _verify_greedy_kernel[(batch,)](logits, drafts, nd, accepted, token, n, vocab, BLOCK=block,
                                        num_warps=num_warps)
        return accepted, token
    assert draft_probs is not None and u_accept is not None and u_sample is not None
    use_top_k = 0 < params.top_k < vocab
    _verify_sampling_kernel[(batch,)](
        logits, draft_probs.contiguous().float(), drafts, nd, u_accept.contiguous().double(),
        u_sample.contiguous().double(), accepted, token, n, vocab, float(params.temperature),
        int(params.top_k) if use_top_k else 1, top_p_limit(params.top_p),
        USE_TOP_K=use_top_k, USE_TOP_P=params.top_p < 1.0, BLOCK=block, num_warps=num_warps)
    return accepted, token
