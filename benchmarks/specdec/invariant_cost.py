"""What bit-exact verification costs (issue 14): the embedded target's one-token step and its (n+1)-token verify,
batched (default) vs batch-invariant (token by token), in float32 and bfloat16; plus per-row invariance and cost
of the projection kernels (`F.linear`, `stream_linear`) at 1-4 rows. Interleaved rounds, medians.

    python benchmarks/specdec/invariant_cost.py --out docs/bench/invariant_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from soaes_core import DEFAULT_MODEL, load_model
from soaes_specdec.runner import CachedCausalLM, stream_linear

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def rows_invariant(fn, dtype: torch.dtype, rows: int) -> bool:
    """Whether each row of an `rows`-row product equals the same row computed alone, bit for bit (all shapes)."""
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in [*SHAPES, (49152, 576)]:
        w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype)
        x = torch.randn(rows, in_f, generator=g).to(dtype)
        many = fn(x, w)
        if any(not torch.equal(fn(x[r:r + 1], w)[0], many[r]) for r in range(rows)):
            return False
    return True


@torch.inference_mode()
def runner_costs(dtype: torch.dtype, n: int, context: int, repeats: int) -> dict[str, float]:
    """Median ms of a one-token step and of an (n+1)-token verify, batched and batch-invariant, interleaved."""
    model = load_model(DEFAULT_MODEL, dtype=dtype, device="cpu")
    prompt = torch.randint(0, 49152, (1, context), generator=torch.Generator().manual_seed(0))
    runners = {"batched": CachedCausalLM(model), "invariant": CachedCausalLM(model, batch_invariant=True)}
    for r in runners.values():
        r.start(1, context + n + 2)
        r.forward(prompt, torch.zeros(1, dtype=torch.long), need_logits=False)
    at, first = torch.tensor([context]), torch.zeros(1, dtype=torch.long)
    calls = {"step": lambda: runners["batched"].forward(prompt[:, -1:], at, logits_at=first),
             "verify_batched": lambda: runners["batched"].forward(prompt[:, -(n + 1):], at),
             "verify_invariant": lambda: runners["invariant"].forward(prompt[:, -(n + 1):], at)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for round_ in range(repeats + 2):
        for key, fn in calls.items():
            t = time.perf_counter()
            fn()
            if round_ >= 2:
                times[key].append((time.perf_counter() - t) * 1e3)
    out = {f"{k}_ms": statistics.median(v) for k, v in times.items()}
    out["c_v_batched"] = out["verify_batched_ms"] / out["step_ms"]
    out["c_v_invariant"] = out["verify_invariant_ms"] / out["step_ms"]
    return out


def projection_costs(repeats: int) -> dict[str, dict[int, float]]:
    """Median ms of one pass over the 210 projection matrices at 1, 2 and 4 rows, per bf16 kernel, interleaved."""
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(o, i, generator=g) * 0.02).bfloat16() for _ in range(30) for o, i in SHAPES]
    kernels = {"bf16 F.linear": F.linear, "bf16 stream_linear": stream_linear}
    times: dict[tuple[str, int], list[float]] = {(k, r): [] for k in kernels for r in (1, 2, 4)}
    for _ in range(repeats):
        for rows in (1, 2, 4):
            xs = {k: torch.randn(rows, k, generator=g).bfloat16() for k in (576, 1536)}
            for name, fn in kernels.items():
                t = time.perf_counter()
                for w in weights:
                    fn(xs[w.shape[1]], w)
                times[(name, rows)].append((time.perf_counter() - t) * 1e3)
    return {name: {rows: statistics.median(times[(name, rows)]) for rows in (1, 2, 4)} for name in kernels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    invariance = {name: {rows: rows_invariant(fn, dt, rows) for rows in (2, 4, 8)}
                  for name, fn, dt in [("fp32 stream_linear", stream_linear, torch.float32),
                                       ("bf16 stream_linear", stream_linear, torch.bfloat16),
                                       ("bf16 F.linear", F.linear, torch.bfloat16)]}
    report = {"threads": args.threads, "n": args.n, "context": args.context,
              "rows_bit_identical_to_one_row": invariance,
              "projection_pass_ms": projection_costs(args.repeats),
              "runner": {str(dt): runner_costs(dt, args.n, args.context, args.repeats)
                         for dt in (torch.float32, torch.bfloat16)}}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
