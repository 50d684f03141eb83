"""Time the fused Triton verification kernel against the PyTorch reference on a CUDA GPU.

One verification step = warp the target's n+1 logits rows (temperature, top-k, top-p), test acceptance of the n
draft tokens and sample the next token from the residual. Both paths get the same inputs and float64 uniforms;
the script also checks that they agree. Usage (GPU machine):

    python benchmarks/specdec/kernel_bench.py --out kernel_bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from soaes_specdec.kernel import verify_fused
from soaes_specdec.sampling import SamplingParams
from soaes_specdec.testing import random_verify_block
from soaes_specdec.verify import verify_reference

MODES = {"greedy": SamplingParams(False), "top_p=0.7": SamplingParams(True, 1.0, 0.7),
         "T=0.7,top_k=50": SamplingParams(True, 0.7, 1.0, 50)}


def inputs(batch: int, n: int, vocab: int, params: SamplingParams, dtype: torch.dtype) -> dict:
    """A full block (every row drafts n tokens; greedy drafts all equal the target's argmax) on the GPU."""
    block = random_verify_block(batch, n, vocab, params, seed=batch * 7 + n + vocab, device="cuda", dtype=dtype,
                                agree=1.0)
    return {**block, "num_draft": None}


def cuda_time_ms(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", default="49152,152064")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("-n", default="3")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--launch", default="16384x16", help="comma-separated BLOCKxNUM_WARPS kernel launch settings")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for vocab in map(int, args.vocab.split(",")):
        for batch in map(int, args.batch.split(",")):
            for n in map(int, args.n.split(",")):
                for mode, params in MODES.items():
                    for dtype in (torch.float32, torch.bfloat16):
                        block = inputs(batch, n, vocab, params, dtype)
                        fused = verify_fused(params=params, **block)
                        ref = verify_reference(params=params, **block)
                        same = fused[0].tolist() == ref[0].tolist() and fused[1].tolist() == ref[1].tolist()
                        t_ref = cuda_time_ms(lambda b=block, p=params: verify_reference(params=p, **b), args.repeats)
                        for launch in args.launch.split(","):
                            tile, warps = map(int, launch.split("x"))
                            out = verify_fused(params=params, block=tile, num_warps=warps, **block)
                            same_l = same and out[0].tolist() == ref[0].tolist() and out[1].tolist() == ref[1].tolist()
                            t_fused = cuda_time_ms(lambda b=block, p=params, t=tile, w=warps: verify_fused(
                                params=p, block=t, num_warps=w, **b), args.repeats)
                            rows.append({"vocab": vocab, "batch": batch, "n": n, "mode": mode, "launch": launch,
                                         "dtype": str(dtype).split(".")[-1], "reference_ms": t_ref,
                                         "fused_ms": t_fused, "speedup": t_ref / t_fused, "identical": same_l})
                            r = rows[-1]
                            print(f"| {vocab} | {batch} | {n} | {mode} | {r['dtype']} | {launch} | {t_ref:.3f} | "
                                  f"{t_fused:.3f} | {r['speedup']:.2f}x | {same_l} |", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
