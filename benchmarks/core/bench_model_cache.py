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

        t = time.perf_counter()
        load_model("embedded:smollm2-135m")
        load_tokenizer("embedded:smollm2-135m")
        first = time.perf_counter() - t
        cached = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            load_model("embedded:smollm2-135m")
            load_tokenizer("embedded:smollm2-135m")
            cached.append(time.perf_counter() - t)
        os.environ["SOAES_VERIFY_CACHE"] = "0"
        unverified = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            load_model("embedded:smollm2-135m")
            load_tokenizer("embedded:smollm2-135m")
            unverified.append(time.perf_counter() - t)
    print(json.dumps({"first_load_s": round(first, 2), "cached_load_s_median": round(statistics.median(cached), 3),
                      "cached_load_no_checksum_s_median": round(statistics.median(unverified), 3),
                      "speedup": round(first / statistics.median(cached), 1)}, indent=2))


if __name__ == "__main__":
    main()
