"""The speculative-decoding cost model (Leviathan et al.): expected tokens per target call, predicted speed-up
over plain decoding and the break-even acceptance, from acceptance alpha, block size n and relative costs."""

from __future__ import annotations

from soaes_core.errors import InvalidArgumentError


def expected_accepted_length(alpha: float, n: int) -> float:
    """E[L] = (1 - alpha^(n+1)) / (1 - alpha): expected tokens per target call with n draft tokens and i.i.d.
    acceptance alpha (n = 0 is plain decoding: one token per call)."""
    if n < 0:
        raise InvalidArgumentError(f"block size n must be >= 0, got {n}")
    if alpha >= 1.0:
        return float(n + 1)
    return (1.0 - alpha ** (n + 1)) / (1.0 - alpha)


def theoretical_speedup(alpha: float, n: int, c: float, c_v: float) -> float:
    """S = E[L] / (n*c + c_v): walltime improvement over plain decoding predicted by the cost model."""
    return expected_accepted_length(alpha, n) / (n * c + c_v)


def break_even_acceptance(n: int, c: float, c_v: float) -> float | None:
    """Smallest acceptance rate alpha with theoretical_speedup(alpha, n, c, c_v) >= 1 (None if even alpha=1 loses)."""
    if theoretical_speedup(1.0, n, c, c_v) < 1.0:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if theoretical_speedup(mid, n, c, c_v) >= 1.0 else (mid, hi)
    return hi
