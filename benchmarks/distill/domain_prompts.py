"""Build the large domain prompt set for GPU-scale draft training (issue 6): the distill experiment's training
prompts (pool prompts, article prompts, Magpie queries from its run directory) plus template and passage
queries from the domain corpus (`soaes_distill.domain_queries`), decontaminated against the held-out prompts.

    python benchmarks/distill/domain_prompts.py runs/distill-exp --out runs/distill-gpu/prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiment import ExperimentConfig, sample_prompts

from soaes_core import read_jsonl, read_prompts, write_jsonl
from soaes_data.samples import sample_path
from soaes_distill.domain_queries import DomainQueryConfig, build_domain_queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment_dir", type=Path,
                    help="a `benchmarks/distill/experiment.py` output (its train_records.jsonl)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-queries", type=int, default=6000)
    ap.add_argument("--num-terms", type=int, default=200)
    args = ap.parse_args()

    _, held = sample_prompts(ExperimentConfig())
    base = read_prompts(args.experiment_dir / "train_records.jsonl")  # pool + article + Magpie prompts
    pools = [sample_path("sft/expert_pool.jsonl"), sample_path("sft/dialog_pool.jsonl")]
    held_prompts = [h["prompt"] for h in held]
    texts = [r["text"] for r in read_jsonl(sample_path("corpus/articles.jsonl")) if r.get("kind") == "domain"]
    for path in pools:  # the pool records the experiment trains on (not its held-out ones) contribute their text
        texts += [m["content"] for r, p in zip(read_jsonl(path), read_prompts(path), strict=True)
                  if p["prompt"] not in held_prompts for m in r["messages"]]
    cfg = DomainQueryConfig(num_terms=args.num_terms, max_queries=args.max_queries)
    q = build_domain_queries(texts, held_prompts, cfg)
    prompts = [{"id": f"base-{p['id']}", "prompt": p["prompt"]} for p in base] + q.prompts
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out, prompts)
    write_jsonl(args.out.with_suffix(".rejects.jsonl"), q.rejects)
    summary = {"base_prompts": len(base), "domain_prompts": len(q.prompts), "rejected": len(q.rejects),
               "terms": q.terms[:40], "total": len(prompts)}
    args.out.with_suffix(".summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1))
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
