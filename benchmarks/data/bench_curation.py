"""Curation throughput (documents/s and MB/s) of `soaes-data curate` on a synthetic corpus.

    python benchmarks/data/make_synthetic_corpus.py --docs 100000 --out /tmp/synth_corpus.jsonl
    python benchmarks/data/bench_curation.py --corpus /tmp/synth_corpus.jsonl --num-proc 2 --out /tmp/bench_cur
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("SOAES_PROGRESS", "0")

from soaes_core import read_manifest
from soaes_data.pipeline import DEFAULT_STAGES, RecipeConfig, run_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    size_mb = args.corpus.stat().st_size / 1e6
    cfg = RecipeConfig(inputs=[str(args.corpus)], output_dir=str(args.out), stages=list(DEFAULT_STAGES),
                       num_proc=args.num_proc, output_format="jsonl")
    cfg.relevance.min_score = 0.0
    t0 = time.perf_counter()
    reports = run_recipe(cfg, force=True)
    wall = time.perf_counter() - t0
    n = reports[0].counts["in"]
    rows = []
    for r in reports:
        m = read_manifest(r.dir)
        secs = sum(m["timings_s"].values())
        rows.append({"stage": r.name, "in": r.counts["in"], "kept": r.counts["kept"], "seconds": round(secs, 2),
                     "docs_per_s": round(r.counts["in"] / secs) if secs else None})
    result = {"documents": n, "corpus_mb": round(size_mb, 1), "num_proc": args.num_proc, "wall_s": round(wall, 1),
              "docs_per_s": round(n / wall), "mb_per_s": round(size_mb / wall, 2),
              "kept": reports[-1].counts["kept"], "stages": rows}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
