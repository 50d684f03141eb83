"""Curation throughput (documents/s, MB/s) and peak memory per worker of `soaes-data curate` (datatrove) on a
synthetic corpus, with the full default recipe (MinHash near-dedup included).

    python benchmarks/data/make_synthetic_corpus.py --docs 100000 --out /tmp/synth_corpus.jsonl
    python benchmarks/data/bench_curation.py --corpus /tmp/synth_corpus.jsonl --tasks 1 --workers 1 --out /tmp/b1
    python benchmarks/data/bench_curation.py --corpus /tmp/synth_corpus.jsonl --tasks 2 --workers 2 --out /tmp/b2
    # memory does not grow with the corpus: the same on 1M documents (compare peak RSS with the 100k run)
    python benchmarks/data/make_synthetic_corpus.py --docs 1000000 --out /tmp/synth_1m.jsonl
    python benchmarks/data/bench_curation.py --corpus /tmp/synth_1m.jsonl --tasks 1 --workers 1 --out /tmp/b1m
    # memory with one huge document: the corpus plus a 20 MB one-line document (dropped by length, or with
    # --max-chars 100000000 taken through every stage, near-dedup included)
    python benchmarks/data/bench_curation.py --corpus /tmp/synth_corpus.jsonl --huge-line-mb 20 --out /tmp/b3
    python benchmarks/data/bench_curation.py --corpus /tmp/synth_corpus.jsonl --huge-line-mb 20 \
        --max-chars 100000000 --out /tmp/b4

`docs_per_cpu_s` divides by the CPU time used (this process and its workers), which a busy machine does not
inflate as it does the wall time. Peak RSS: with one worker the tasks run in this process (`peak_rss_mb_main`,
which includes the imported libraries, `rss_after_imports_mb`); with several, in forked worker processes
(`peak_rss_mb_worker`: the largest worker's peak, from getrusage of the children; it counts the pages
inherited from this process too). `peak_rss_mb_main_by_phase`: this process's peak during each phase (the
high-water mark is reset before each), which shows the phase that sets the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from pathlib import Path

os.environ.setdefault("SOAES_PROGRESS", "0")

import soaes_data.pipeline as pipeline
from soaes_core import read_manifest
from soaes_data.pipeline import DEFAULT_STAGES, CurationConfig, run_curation


def _rss_mb(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # ru_maxrss is in KiB on Linux


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its finished children (a busy machine inflates wall
    time, not this)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _current_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def track_phase_peaks(peaks: dict[str, float]) -> None:
    """Record this process's peak RSS during each phase (`peaks[phase]`, MB): the kernel's high-water mark is
    reset (/proc/self/clear_refs) before each phase's executor runs. With one worker every phase runs in
    this process; with several, only the one-task phases (dedup clusters, finalize) do."""
    make = pipeline.make_executor

    def tracked(kind: str, steps: list, **kw):  # type: ignore[no-untyped-def]
        executor = make(kind, steps, **kw)
        run = executor.run

        def run_tracked():  # type: ignore[no-untyped-def]
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                    fh.write("5")
            except OSError:
                return run()
            out = run()
            peaks[kw["job_name"].removeprefix("curate-")] = _peak_rss_mb()
            return out

        executor.run = run_tracked
        return executor

    pipeline.make_executor = tracked


def with_huge_line(corpus: Path, mb: int, out: Path) -> Path:
    """A copy of `corpus` with one extra document: a single line of about `mb` MB of Chinese text."""
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"corpus_with_{mb}mb_line.jsonl"
    rng = random.Random(0)
    chars = "国有资产监督管理委员会企业改革重组混合所有制产权登记投资运营公司资本收益预算"
    with open(dest, "wb") as fh, open(corpus, "rb") as src:
        while chunk := src.read(1 << 24):
            fh.write(chunk)
        fh.write(b'{"id": "huge", "text": "')
        for _ in range(mb):  # written 1 MB at a time (3 bytes per character): this process stays small
            fh.write("".join(rng.choices(chars, k=1_000_000 // 3)).encode("utf-8"))
        fh.write(b'"}\n')
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--tasks", type=int, default=None, help="default: --workers")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--executor", default="local", choices=["local", "ray"])
    ap.add_argument("--huge-line-mb", type=int, default=0, help="add one document of this many MB on one line")
    ap.add_argument("--max-chars", type=int, default=None, help="length.max_chars (default: the recipe's 200,000; "
                    "raise it to push a huge document through every stage)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    corpus = with_huge_line(args.corpus, args.huge_line_mb, args.out) if args.huge_line_mb else args.corpus
    size_mb = corpus.stat().st_size / 1e6
    cfg = CurationConfig(inputs=[str(corpus)], output_dir=str(args.out / "run"), stages=list(DEFAULT_STAGES),
                         executor=args.executor, tasks=args.tasks or args.workers, workers=args.workers,
                         output_format="jsonl")
    cfg.relevance.min_score = 0.0
    if args.max_chars:
        cfg.length.max_chars = args.max_chars
    cfg.decontaminate.use_fetched = False
    rss_imports = _current_rss_mb()
    phase_peaks: dict[str, float] = {}
    track_phase_peaks(phase_peaks)
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    reports = run_curation(cfg, force=True)
    wall = time.perf_counter() - t0
    cpu = _cpu_s() - cpu0
    n = reports[0].counts["in"]
    rows = []
    for r in reports:
        secs = sum(read_manifest(r.dir)["timings_s"].values())
        rows.append({"stage": r.name, "in": r.counts["in"], "kept": r.counts["kept"], "seconds": round(secs, 2),
                     "docs_per_s": round(r.counts["in"] / secs) if secs else None})
    result = {"documents": n, "corpus_mb": round(size_mb, 1), "executor": args.executor, "tasks": cfg.tasks,
              "workers": args.workers, "wall_s": round(wall, 1), "docs_per_s": round(n / wall),
              "docs_per_s_per_worker": round(n / wall / args.workers), "mb_per_s": round(size_mb / wall, 2),
              "cpu_s": round(cpu, 1), "docs_per_cpu_s": round(n / cpu),
              "kept": reports[-1].counts["kept"], "rss_after_imports_mb": rss_imports,
              "peak_rss_mb_main": max([_rss_mb(resource.RUSAGE_SELF), *phase_peaks.values()]),
              "peak_rss_mb_main_by_phase": phase_peaks,
              "peak_rss_mb_worker": _rss_mb(resource.RUSAGE_CHILDREN) if args.workers > 1 else None,
              "stages": rows}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
