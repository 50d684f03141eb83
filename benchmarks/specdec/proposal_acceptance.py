"""Offline first-proposal acceptance on held-out target continuations (issue 14's top-p levers, before timing them).

Plain decoding writes each held-out prompt's continuation (greedy, and top-p under each seed); one target pass and
one draft pass over every continuation give the target's warped p and the draft's logits at each new position (a
feature draft reads the target's true features, as its first proposal does when decoding). Reported:

- greedy agreement (argmax equality) on the greedy continuations;
- Σ min(p, q) on the sampled ones for a grid of draft warps (temperature x top-p of the draft's proposals);
- where prompt lookup has a continuation: its token's acceptance p(A), the lookup/draft mixture m·onehot + (1-m)·q
  for several m, lookup then a second candidate drawn from the draft without A (recursive rejection sampling), and
  those numbers per bucket of the draft's own q(A);
- two draft candidates drawn without replacement, verified by recursive rejection sampling (Monte Carlo over the
  first draw): what a 2-candidate tree would accept at position 1.

    python benchmarks/specdec/proposal_acceptance.py --config benchmarks/specdec/cpu_smollm2_domain_best.yaml \
        --seeds 0,1,2,3 --out docs/bench/proposal_acceptance.json [--draft OTHER_DRAFT_DIR ...]
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch
import yaml

from soaes_core import atomic_write_json
from soaes_specdec.bench import BenchConfig, load_bench_models, load_prompts
from soaes_specdec.decoding import autoregressive_generate
from soaes_specdec.draft import load_any_draft
from soaes_specdec.feature_draft import FeatureDraft
from soaes_specdec.lookup import find_ngram_continuation
from soaes_specdec.runner import CachedCausalLM
from soaes_specdec.sampling import SamplingParams, warp_probs

WARP_TEMPERATURES = (0.7, 0.8, 0.9, 1.0, 1.1)
WARP_TOP_PS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MIXES = (0.0, 0.3, 0.5, 0.7, 1.0)
BUCKETS = ((0.0, 1e-9), (1e-9, 0.05), (0.05, 0.2), (0.2, 0.5), (0.5, 0.8), (0.8, 0.95), (0.95, 1.01))


def continuations(target: Any, tok: Any, prompts: list[torch.Tensor], seeds: list[int], top_p: float,
                  max_new_tokens: int) -> list[tuple[str, int, torch.Tensor]]:
    """(mode, prompt length, prompt + continuation ids [1, T]) by plain decoding: greedy once, top-p per seed."""
    runner = CachedCausalLM(target)
    out = []
    for mode, mode_seeds in (("greedy", seeds[:1]), ("top_p", seeds)):
        for seed in mode_seeds:
            g = torch.Generator().manual_seed(seed)
            kw = {"do_sample": True, "top_p": top_p} if mode == "top_p" else {}
            for p in prompts:
                res = autoregressive_generate(runner, p, max_new_tokens, eos_token_id=tok.eos_token_id, generator=g,
                                              **kw)
                out.append((mode, p.numel(), torch.tensor([p.tolist() + res.new_tokens()])))
    return out


def position_logits(target: Any, draft: Any, trajectories: list[tuple[str, int, torch.Tensor]],
                    ) -> dict[str, Any]:
    """Target and draft logits at every new position (predicting token i from tokens < i), and lookup's token."""
    rows: dict[str, list[Any]] = {"mode": [], "tl": [], "dl": [], "lookup": []}
    for mode, start, ids in trajectories:
        hidden = target.model(input_ids=ids).last_hidden_state
        tl = target.lm_head(hidden[0, start - 1:-1]).float()
        if isinstance(draft, FeatureDraft):  # input (f[p], x[p+1]) predicts x[p+2]
            dl = draft.logits(draft.forward(hidden[:, :-1], ids[:, 1:]))[0, start - 2:-1].float()
        else:
            dl = draft(input_ids=ids).logits[0, start - 1:-1].float()
        for i in range(start, ids.shape[1]):
            found = find_ngram_continuation(ids[0, :i].tolist(), 1, 3, 2)
            rows["lookup"].append(found[0] if found else -1)
        rows["mode"] += [mode] * tl.shape[0]
        rows["tl"].append(tl)
        rows["dl"].append(dl)
    return {"mode": rows["mode"], "tl": torch.cat(rows["tl"]), "dl": torch.cat(rows["dl"]),
            "lookup": torch.tensor(rows["lookup"])}


def _drop(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each row of `probs` with its token in `tokens` removed, renormalised (all-zero rows stay zero)."""
    out = probs.clone()
    out[torch.arange(out.shape[0]), tokens] = 0.0
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


def two_draft_candidates(p: torch.Tensor, q: torch.Tensor, draws: int = 8, seed: int = 0) -> torch.Tensor:
    """Per-row acceptance of x1 ~ q then x2 ~ q without x1 under recursive rejection sampling (Monte Carlo over x1):
    P(x1 accepted) + P(rejected) · Σ min(residual, q without x1), residual = norm(max(p - q, 0))."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(p.shape[0])
    residual = torch.clamp(p - q, min=0)
    residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-30)
    total = torch.zeros(p.shape[0], dtype=torch.float64)
    for _ in range(draws):
        x1 = torch.multinomial(q, 1, generator=g)[:, 0]
        first = torch.clamp(p[rows, x1] / q[rows, x1], max=1.0)
        second = torch.minimum(residual, _drop(q, x1)).sum(-1)
        total += (first + (1 - first) * second).double()
    return total / draws


def analyse(data: dict[str, Any], top_p: float) -> dict[str, Any]:
    """The numbers listed in the module docstring, from `position_logits`' output."""
    greedy = torch.tensor([m == "greedy" for m in data["mode"]])
    tl, dl, lookup = data["tl"], data["dl"], data["lookup"]
    out: dict[str, Any] = {"positions_greedy": int(greedy.sum()), "positions_top_p": int((~greedy).sum())}
    out["greedy_agreement"] = float((tl[greedy].argmax(-1) == dl[greedy].argmax(-1)).float().mean())
    target = SamplingParams(True, 1.0, top_p)
    tl, dl, lookup = tl[~greedy], dl[~greedy], lookup[~greedy]
    p = warp_probs(tl, target)
    out["draft_warp"] = {}
    for temperature, draft_top_p in itertools.product(WARP_TEMPERATURES, WARP_TOP_PS):
        q = warp_probs(dl, SamplingParams(True, temperature, draft_top_p))
        out["draft_warp"][f"T={temperature},top_p={draft_top_p}"] = float(torch.minimum(p, q).sum(-1).mean())
    q = warp_probs(dl, target)
    single = torch.minimum(p, q).sum(-1)
    out["draft"] = float(single.mean())
    two = two_draft_candidates(p, q)
    has = lookup >= 0
    out["two_draft_candidates"] = float(two.mean())
    out["rows_without_lookup"] = {"positions": int((~has).sum()), "draft": float(single[~has].mean()),
                                  "two_draft_candidates": float(two[~has].mean())}
    idx = torch.nonzero(has)[:, 0]
    a, pl, ql = lookup[idx], p[idx], q[idx]
    rows = torch.arange(idx.numel())
    p_a, q_a = pl[rows, a], ql[rows, a]
    then_draft = p_a + (1 - p_a) * torch.minimum(_drop(pl, a), _drop(ql, a)).sum(-1)
    onehot = torch.zeros_like(ql)
    onehot[rows, a] = 1.0
    mixes = {m: torch.minimum(pl, m * onehot + (1 - m) * ql).sum(-1) for m in MIXES}
    out["rows_with_lookup"] = {"positions": int(idx.numel()), "lookup_token": float(p_a.mean()),
                               "lookup_then_draft": float(then_draft.mean()),
                               **{f"mix_{m}": float(v.mean()) for m, v in mixes.items()}}
    out["by_draft_q_of_lookup_token"] = []
    for lo, hi in BUCKETS:
        sel = (q_a >= lo) & (q_a < hi)
        if bool(sel.any()):
            out["by_draft_q_of_lookup_token"].append(
                {"q_range": [lo, min(hi, 1.0)], "positions": int(sel.sum()), "lookup_token": float(p_a[sel].mean()),
                 **{f"mix_{m}": float(mixes[m][sel].mean()) for m in (0.0, 0.5)}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="soaes-specdec bench YAML (target, draft, prompts, top_p, ...)")
    ap.add_argument("--seeds", default="0,1,2,3", help="comma-separated sampling seeds")
    ap.add_argument("--draft", action="append", default=[], help="also analyse this draft directory (repeatable)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = BenchConfig(**yaml.safe_load(open(args.config, encoding="utf-8")))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    target, draft, tok = load_bench_models(cfg)
    prompts = load_prompts(cfg.prompts, tok, cfg.max_prompts)
    report: dict[str, Any] = {"config": args.config, "seeds": seeds, "top_p": cfg.top_p,
                              "max_new_tokens": cfg.max_new_tokens, "drafts": {}}
    with torch.inference_mode():
        trajectories = continuations(target, tok, prompts, seeds, cfg.top_p, cfg.max_new_tokens)
        drafts = {str(cfg.draft): draft}
        for path in args.draft:
            drafts[path] = load_any_draft(path, dtype=cfg.dtype, device=target.device, target=cfg.target,
                                          target_tokenizer=tok)
        for name, model in drafts.items():
            report["drafts"][name] = analyse(position_logits(target, model, trajectories), cfg.top_p)
            print(name, {k: v for k, v in report["drafts"][name].items() if not isinstance(v, (dict, list))},
                  flush=True)
    atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
