"""Static pointer-rollback cache (soaes_specdec.runner) vs transformers' DynamicCache + crop, on CPU.

Times one decode step (1 token) and one verify-and-roll-back cycle (n+1 tokens, then drop 2) for the
embedded SmolLM2-135M, median over repeats. Usage: python benchmarks/specdec/cache_compare.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import DynamicCache

from soaes_core import load_model
from soaes_specdec.bench import median_time
from soaes_specdec.runner import CachedCausalLM


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` after one warm-up (the benchmark's own timer)."""
    return 1000 * median_time(fn, repeats, warmup=1)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("embedded:smollm2-135m", dtype=torch.float32)
    ids = torch.randint(0, 49152, (1, args.context + args.n + 1), generator=torch.Generator().manual_seed(0))
    prompt, block, one = ids[:, :args.context], ids[:, args.context:], ids[:, args.context:args.context + 1]

    runner = CachedCausalLM(model)
    runner.start(1, args.context + args.n + 2)
    start = torch.tensor([args.context])
    runner.forward(prompt, torch.zeros(1, dtype=torch.long), need_logits=False)
    ours_step = median_ms(lambda: runner.forward(one, start, logits_at=torch.zeros(1, dtype=torch.long)), args.repeats)
    ours_cycle = median_ms(lambda: runner.forward(block, start), args.repeats)  # rollback = set lengths: free

    cache = DynamicCache(config=model.config)
    model(prompt, past_key_values=cache, use_cache=True)

    def hf_step() -> None:
        model(one, past_key_values=cache, use_cache=True)
        cache.crop(-1)  # transformers 5: a negative count removes that many trailing tokens

    def hf_cycle() -> None:
        model(block, past_key_values=cache, use_cache=True)
        cache.crop(-2)  # roll back two rejected tokens, then the rest to reuse the same context
        cache.crop(-(args.n - 1))

    hf_step_ms = median_ms(hf_step, args.repeats)
    hf_cycle_ms = median_ms(hf_cycle, args.repeats)
    print(json.dumps({"threads": args.threads, "context": args.context, "n": args.n,
                      "static_cache_step_ms": ours_step, "dynamic_cache_step_ms": hf_step_ms,
                      "static_cache_verify_ms": ours_cycle, "dynamic_cache_verify_crop_ms": hf_cycle_ms}, indent=2))


if __name__ == "__main__":
    main()
