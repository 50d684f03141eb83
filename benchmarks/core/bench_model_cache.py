"""Benchmark: first load of the embedded model (GGUF dequantise + cache build) vs cached loads.

Usage: python benchmarks/core/bench_model_cache.py [--repeats 3]
Uses a fresh temporary SOAES_CACHE so the first load really builds the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SOAES_CACHE"] = cache
        from soaes_core import load_model, load_tokenizer

        def timed_load() -> float:
            t = time.perf_counter()
            load_model("embedded:smollm2-135m")
            load_tokenizer("embedded:smollm2-135m")
            return time.perf_counter() - t

        first = timed_load()
        cached = [timed_load() for _ in range(args.repeats)]
        os.environ["SOAES_VERIFY_CACHE"] = "0"
        unverified = [timed_load() for _ in range(args.repeats)]
    print(json.dumps({"first_load_s": round(first, 2), "cached_load_s_median": round(statistics.median(cached), 3),
                      "cached_load_no_checksum_s_median": round(statistics.median(unverified), 3),
                      "speedup": round(first / statistics.median(cached), 1)}, indent=2))


if __name__ == "__main__":
    main()
