"""Interleaved timing of SpeculativeDecoder settings against plain decoding on one bench config's models (issue 14's
lever tables): each variant is a set of decoder keyword arguments; every prompt is decoded under each seed.

Sampled continuations differ per seed and their acceptance spreads by several points between seeds, so a lever is
judged on the tokens/s summed over several seeds, with all variants timed in the same interleaved passes. Greedy
rows also report whether each variant's output equals plain decoding.

    python benchmarks/specdec/decoder_variants.py --config benchmarks/specdec/cpu_smollm2_domain_topp.yaml \
        --mode top_p --seeds 0,1,2,3 --out docs/bench/levers_topp.json \
        base:n=1,lookup_tokens=5 mix:n=1,lookup_tokens=5,lookup_mix=0.5
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import yaml

from soaes_core import atomic_write_json
from soaes_specdec.bench import BenchConfig, load_bench_models, load_prompts
from soaes_specdec.decoding import SpecStats, SpeculativeDecoder, autoregressive_generate
from soaes_specdec.feature_draft import FeatureDraft
from soaes_specdec.feature_runner import FeatureDraftRunner
from soaes_specdec.runner import CachedCausalLM


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'name:key=value,key=value' -> (name, kwargs); values parsed as YAML scalars (1, 0.5, true)."""
    name, _, spec = text.partition(":")
    kwargs = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in spec.split(",") if item)}
    return name, kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="soaes-specdec bench YAML (target, draft, prompts, ...)")
    ap.add_argument("--mode", choices=["greedy", "top_p"], required=True)
    ap.add_argument("--seeds", default="0", help="comma-separated sampling seeds (greedy uses the first)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved timed passes over all seeds")
    ap.add_argument("--out", required=True)
    ap.add_argument("variants", nargs="+", help="name:key=value,... (SpeculativeDecoder arguments; n = block size)")
    args = ap.parse_args()
    cfg = BenchConfig(**yaml.safe_load(open(args.config, encoding="utf-8")))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.mode == "greedy" else None]
    target, draft, tok = load_bench_models(cfg)
    prompts = load_prompts(cfg.prompts, tok, cfg.max_prompts)
    runner = CachedCausalLM(target)
    plain_runner = CachedCausalLM(target)  # never prepacked: the plain baseline runs as `soaes-specdec bench` runs it
    draft_runner = FeatureDraftRunner(draft) if isinstance(draft, FeatureDraft) else CachedCausalLM(draft)
    sampling = ({"do_sample": False} if args.mode == "greedy"
                else {"do_sample": True, "top_p": cfg.top_p, "temperature": cfg.temperature})

    def decode_all(gen: Any, warm: bool = False) -> list[Any]:
        outs = []
        for seed in seeds[:1] if warm else seeds:
            g = torch.Generator().manual_seed(seed)
            outs += [gen(p, max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id, generator=g, **sampling)
                     for p in (prompts[:1] if warm else prompts)]
        return outs

    jobs: dict[str, Any] = {"plain": lambda p, **kw: autoregressive_generate(plain_runner, p, **kw)}
    settings: dict[str, dict[str, Any]] = {"plain": {}}
    for text in args.variants:
        name, kwargs = parse_variant(text)
        n = int(kwargs.pop("n", 1))
        # a variant without prepack gets its own runner, so another variant's packs never speed it up
        own = runner if kwargs.get("prepack") else CachedCausalLM(target)
        jobs[name] = SpeculativeDecoder(own, draft_runner, n, **kwargs).generate
        settings[name] = {"n": n, **kwargs}
    for gen in jobs.values():
        decode_all(gen, warm=True)
    totals = {name: {"tokens": 0, "seconds": 0.0, "passes": []} for name in jobs}
    outputs: dict[str, list[Any]] = {}
    for _ in range(args.repeats):
        for name, gen in jobs.items():
            t0 = time.perf_counter()
            outs = decode_all(gen)
            seconds = time.perf_counter() - t0
            tokens = sum(o.stats.new_tokens for o in outs)
            totals[name]["tokens"] += tokens
            totals[name]["seconds"] += seconds
            totals[name]["passes"].append(tokens / seconds)
            outputs[name] = outs
    base = totals["plain"]["tokens"] / totals["plain"]["seconds"]
    rows = []
    for name in jobs:
        rate = totals[name]["tokens"] / totals[name]["seconds"]
        row: dict[str, Any] = {"variant": name, "settings": settings[name], "tokens_per_s": rate,
                               "speedup_vs_plain": rate / base, "passes_tokens_per_s": totals[name]["passes"]}
        if name != "plain":
            stats = SpecStats.merge(o.stats for o in outputs[name])
            row.update(acceptance_rate=stats.acceptance_rate, tokens_per_target_call=stats.mean_accepted_length,
                       lookup_proposed=stats.lookup_proposed, proposed=stats.proposed)
            if args.mode == "greedy":
                row["output_equals_plain"] = ([o.new_tokens() for o in outputs[name]]
                                              == [o.new_tokens() for o in outputs["plain"]])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "passes_tokens_per_s"}), flush=True)
    atomic_write_json(args.out, {"config": args.config, "mode": args.mode, "seeds": seeds, "repeats": args.repeats,
                                 "prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
                                 "packed_rows": runner.packed_rows, "threads": torch.get_num_threads(),
                                 "results": rows})


if __name__ == "__main__":
    main()
