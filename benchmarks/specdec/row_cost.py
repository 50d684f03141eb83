"""Cost of one pass over SmolLM2-135M's 30 layers of projection matrices for 1-16 rows, fp32 vs bf16 (issue 6).

Why bf16 makes long blocks pay on this CPU: a verify of n+1 rows costs c_v times a 1-row step; the row count is
what block size n trades against. Random weights of the real shapes; median of `--repeats` passes.
The JSON written by `--out` names the host and can be given as it is to `soaes-specdec calibrate MODEL
--calibration-file` (projections only; `soaes-specdec calibrate` itself times the model's whole forward pass).

    python benchmarks/specdec/row_cost.py --out docs/bench/row_cost.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from soaes_specdec.hostinfo import format_host, host_info
from soaes_specdec.runner import packed_linear, prepack_available, stream_linear

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def pass_ms(weights: list[torch.Tensor], rows: int, fn, dtype: torch.dtype, repeats: int) -> float:
    xs = {k: torch.randn(rows, k, dtype=dtype) for k in (576, 1536)}
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for w in weights:
            fn(xs[w.shape[1]], w)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,3,4,5,6,8,12,16")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--with-head", action="store_true", help="add the 49,152 x 576 output head to every pass")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w32 = [torch.randn(o, i) * 0.02 for _ in range(30) for o, i in SHAPES]
    if args.with_head:
        w32.append(torch.randn(49152, 576) * 0.02)
    w16 = [w.to(torch.bfloat16) for w in w32]
    modes = {
        "fp32 F.linear": (w32, lambda x, w: F.linear(x, w), torch.float32),
        "fp32 stream_linear": (w32, lambda x, w: stream_linear(x, w), torch.float32),
        "bf16 F.linear": (w16, lambda x, w: F.linear(x, w), torch.bfloat16),
    }
    rows = [int(r) for r in args.rows.split(",")]
    table = {name: {r: pass_ms(ws, r, fn, dt, args.repeats) for r in rows} for name, (ws, fn, dt) in modes.items()}
    if prepack_available(torch.device("cpu"), torch.float32):  # MKL packed for exactly r rows (runner prepack)
        table["fp32 MKL prepacked per row count"] = {}
        for r in rows:
            packs = {id(w): torch.ops.mkl._mkl_reorder_linear_weight(w, r) for w in w32}
            table["fp32 MKL prepacked per row count"][r] = pass_ms(
                w32, r, lambda x, w, r=r, packs=packs: packed_linear(x, packs[id(w)], w, None, r), torch.float32,
                args.repeats)
    lines = ["| weights / kernel | " + " | ".join(f"{r} rows" for r in rows) + " |",
             "|---|" + "---:|" * len(rows)]
    for name, ms in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{ms[r]:.1f} ({ms[r] / ms[1]:.2f})" for r in rows) + " |")
    what = "210 matrices + the head" if args.with_head else "210 matrices"
    host = host_info()
    print(f"host: {format_host(host)}\nms per pass over {what} (ratio to 1 row)\n" + "\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"host": host, "threads": args.threads, "repeats": args.repeats, "with_head": args.with_head,
                       "ms": table}, f, indent=1)


if __name__ == "__main__":
    main()
