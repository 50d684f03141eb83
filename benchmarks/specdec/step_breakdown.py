"""Where a decoding loop's time goes: every target and draft forward timed by its row count, plus the draft's
proposal sampling, verification and lookup, for plain decoding and one SpeculativeDecoder setting (issue 14).

    python benchmarks/specdec/step_breakdown.py --config benchmarks/specdec/cpu_smollm2_domain_best.yaml \
        --mode top_p --seed 1 n=1,lookup_tokens=5,lookup_mix=0.5,prepack=true
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from typing import Any

import torch
import yaml

from soaes_specdec import decoding, verify
from soaes_specdec.bench import BenchConfig, load_bench_models, load_prompts
from soaes_specdec.decoding import SpeculativeDecoder, autoregressive_generate
from soaes_specdec.feature_draft import FeatureDraft
from soaes_specdec.feature_runner import FeatureDraftRunner
from soaes_specdec.runner import CachedCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--mode", choices=["greedy", "top_p"], required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("variant", help="key=value,... SpeculativeDecoder arguments (n = block size)")
    args = ap.parse_args()
    cfg = BenchConfig(**yaml.safe_load(open(args.config, encoding="utf-8")))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    target, draft, tok = load_bench_models(cfg)
    prompts = load_prompts(cfg.prompts, tok, cfg.max_prompts)
    kwargs = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.variant.split(",") if item)}
    n = int(kwargs.pop("n", 1))
    spec_target, plain_target = CachedCausalLM(target), CachedCausalLM(target)
    draft_runner = FeatureDraftRunner(draft) if isinstance(draft, FeatureDraft) else CachedCausalLM(draft)
    draft_lm = draft_runner.lm if isinstance(draft_runner, FeatureDraftRunner) else draft_runner
    decoder = SpeculativeDecoder(spec_target, draft_runner, n, **kwargs)
    sampling = {"do_sample": True, "top_p": cfg.top_p, "temperature": cfg.temperature} if args.mode == "top_p" else {}
    seconds: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    forward = CachedCausalLM.forward

    def timed_forward(self: CachedCausalLM, tokens: torch.Tensor, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = forward(self, tokens, *a, **kw)
        rows = tokens.shape[0] * tokens.shape[1]
        who = {id(spec_target): "target", id(plain_target): "plain", id(draft_lm): "draft"}[id(self)]
        key = f"{who} forward, {rows} rows" if rows <= 16 else f"{who} prefill"
        seconds[key] += time.perf_counter() - t0
        calls[key] += 1
        return out

    def timed(module: Any, name: str) -> None:
        fn: Callable[..., Any] = getattr(module, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            seconds[name] += time.perf_counter() - t0
            calls[name] += 1
            return out

        setattr(module, name, wrapper)

    CachedCausalLM.forward = timed_forward  # type: ignore[method-assign]
    timed(verify, "verify_block")
    timed(decoding, "propose_ngram_continuations")
    timed(decoding, "draft_sample")

    def run(gen: Any, some: list[torch.Tensor]) -> tuple[float, int, int]:
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        outs = [gen(p, max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id, generator=g, **sampling)
                for p in some]
        return (time.perf_counter() - t0, sum(o.stats.new_tokens for o in outs),
                sum(o.stats.target_calls for o in outs))

    jobs = {"plain": lambda p, **kw: autoregressive_generate(plain_target, p, **kw), "speculative": decoder.generate}
    for gen in jobs.values():
        run(gen, prompts[:2])
    seconds.clear()
    calls.clear()
    for name, gen in jobs.items():
        wall, tokens, target_calls = run(gen, prompts)
        print(f"{name}: {tokens} tokens in {wall:.2f} s ({tokens / wall:.1f} tokens/s), {target_calls} target calls, "
              f"{1000 * wall / target_calls:.2f} ms per call")
    for key in sorted(seconds):
        print(f"  {key}: {calls[key]} calls, {seconds[key]:.2f} s, {1000 * seconds[key] / calls[key]:.2f} ms each")


if __name__ == "__main__":
    main()
