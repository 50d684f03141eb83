"""Decontamination index cost: build time, memory and pickle size of `NgramIndex` over a benchmark-sized folder
of subject CSVs (CMMLU layout, random Chinese questions), and query time per document.

    python benchmarks/data/bench_decontam.py --items 25000 --out /tmp/bench_decontam.json

25,000 items is about CMMLU (11.6k) + C-Eval (13.9k) together. Memory is the tracemalloc size of the index after
the build (and the build's peak); the pre-check bitmap (16 MB) is built on the first query and counted apart.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import tempfile
import time
import tracemalloc
from pathlib import Path

from soaes_data.decontam import NgramIndex

HANZI = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能"
         "下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量"
         "都两体制机当使点从业本去把性好应开它合还因由其些")


def write_benchmark(root: Path, items: int, rng: random.Random) -> None:
    """`items` questions over 60 subjects in CMMLU's `test/<subject>.csv` layout, 30–200 characters each."""
    (root / "test").mkdir(parents=True)
    per = -(-items // 60)
    for s in range(60):
        rows = [f"{k},{''.join(rng.choice(HANZI) for _ in range(rng.randint(30, 200)))},甲,乙,丙,丁,A"
                for k in range(min(per, items - s * per))]
        (root / "test" / f"subject{s:02d}.csv").write_text(",Question,A,B,C,D,Answer\n" + "\n".join(rows) + "\n",
                                                           encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=25000)
    ap.add_argument("--ngram", type=int, default=13)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_benchmark(Path(tmp) / "cmmlu", args.items, rng)
        tracemalloc.start()
        t0 = time.perf_counter()
        index = NgramIndex(n=args.ngram, dirs={"cmmlu": Path(tmp) / "cmmlu"})
        build_s = time.perf_counter() - t0
        size, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    result = {"items": index.items, "ngrams": len(index), "build_s": round(build_s, 2),
              "index_mb": round(size / 1e6, 1), "build_peak_mb": round(peak / 1e6, 1),
              "pickle_mb": round(len(pickle.dumps(index)) / 1e6, 1)}
    for chars in (300, 2000):
        doc = "".join(rng.choice(HANZI) for _ in range(chars))
        index.overlaps(doc)  # builds the pre-check bitmap
        t0 = time.perf_counter()
        for _ in range(500):
            index.overlaps(doc)
        result[f"query_ms_{chars}_chars"] = round((time.perf_counter() - t0) / 500 * 1000, 3)
    result["prefilter_mb"] = round(index._filter.nbytes / 1e6, 1)
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
