"""Held-out acceptance of trained feature drafts by layout (soaes | engine) and head (restricted | full vocabulary).

Each DRAFT is a `soaes-distill feature-draft --out` folder (its `draft/` and `metrics.json`). Every draft is
scored twice on the same held-out target answers with the trainer's own teacher-forced estimator
(`estimate_feature_acceptance`): once with its restricted head (the kept token set, as soaes and SGLang's
`--speculative-token-map` run it) and once over the full vocabulary (the target's whole head, as vLLM's EAGLE-1
proposes). Greedy rows also get a paired difference against the first draft's restricted row, position by
position, with its standard error. Acceptance does not depend on machine load.

    HF_HUB_OFFLINE=1 python benchmarks/distill/layout_acceptance.py --heldout RUN/heldout_tokens.jsonl \
        soaes=/tmp/fd_exp/soaes engine=/tmp/fd_exp/engine --out docs/bench/feature_layout_acceptance.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path
from typing import Any

import torch

from soaes_core import load_model
from soaes_core.atomic import atomic_write_json
from soaes_distill.feature_kd import (
    _batch,
    estimate_feature_acceptance,
    extract_features,
    two_step_hidden,
    usable_examples,
)
from soaes_distill.token_data import load_token_examples
from soaes_specdec.feature_draft import FeatureDraft


@torch.no_grad()
def greedy_hits(target: Any, draft: FeatureDraft, examples: list, features: list) -> torch.Tensor:
    """Per counted position (step 1, teacher-forced): 1.0 where the draft's argmax equals the target's."""
    head = target.get_output_embeddings()
    hits = []
    for ex, f in zip(examples, features, strict=True):
        f_in, ids, f_next, mask = _batch([ex], [f])
        g = two_step_hidden(draft, f_in, ids)[0][0][mask[0]]  # the estimator's own step-1 pass
        hits.append((head(f_next[0][mask[0]]).argmax(-1) == draft.logits(g).argmax(-1)).double())
    return torch.cat(hits)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def markdown(rows: list[dict[str, Any]], n: int) -> str:
    head = ("| Draft | Layout | Head | Head tokens | Greedy α (%) | Δ greedy vs ref (pts, ±SE) | Top-p 0.7 α (%) | "
            f"Step-2 greedy (%) | Step-2 top-p (%) | Tokens/call n={n} greedy | Tokens/call n={n} top-p |")
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['layout']} | {r['head']} | {r['head_tokens']} | {100 * r['acceptance_greedy']:.2f} "
            f"| {r['delta_greedy_pts']:+.2f} ± {r['delta_greedy_se_pts']:.2f} | {100 * r['acceptance_top_p']:.2f} "
            f"| {100 * r['step2_acceptance_greedy']:.2f} | {100 * r['step2_acceptance_top_p']:.2f} "
            f"| {r[f'accepted_length_greedy_n{n}']:.3f} | {r[f'accepted_length_sampled_n{n}']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("drafts", nargs="+", metavar="NAME=DIR", help="feature-draft training output folders")
    ap.add_argument("--heldout", required=True, help="held-out token data (the teacher_data stage's)")
    ap.add_argument("--target", default="embedded:smollm2-135m")
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("-n", type=int, default=3, help="block size of the tokens-per-call walk")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON output (the markdown table goes to stdout)")
    args = ap.parse_args()
    named = []
    for item in args.drafts:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            ap.error(f"draft {item!r} is not NAME=DIR")
        if not (Path(path) / "draft").is_dir():
            ap.error(f"{path}: no draft/ folder (not a feature-draft training output)")
        named.append((name, Path(path)))
    torch.set_num_threads(args.threads)
    target = load_model(args.target, dtype=torch.float32, device="cpu").eval()
    held, rejects = usable_examples(load_token_examples(args.heldout), args.max_length, "heldout")
    if not held:
        ap.error(f"{args.heldout}: no usable held-out examples")
    feats = extract_features(target, held)
    rows: list[dict[str, Any]] = []
    ref: torch.Tensor | None = None
    for name, path in named:
        trained = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        for restrict in (True, False):
            draft = FeatureDraft.from_pretrained(path / "draft", dtype=torch.float32, device="cpu",
                                                 restrict_head=restrict)
            m = estimate_feature_acceptance(target, draft, held, feats, args.top_p, 1.0, (args.n,))
            hits = greedy_hits(target, draft, held, feats)
            if abs(float(hits.mean()) - m["acceptance_greedy"]) > 1e-9:
                raise SystemExit(f"error: {name}: per-position greedy hits disagree with the estimator's mean")
            ref = hits if ref is None else ref
            diff = hits - ref
            rows.append({"name": name, "dir": str(path), "layout": draft.layout,
                         "head": "restricted" if restrict else "full",
                         "head_tokens": trained.get("head_tokens") if restrict else target.config.vocab_size,
                         "steps": trained["steps"], "best_step": trained["best_step"],
                         "seed": trained["config"]["seed"],
                         "delta_greedy_pts": 100 * float(diff.mean()),
                         "delta_greedy_se_pts": 100 * float(diff.std(unbiased=True) / math.sqrt(diff.numel())),
                         "greedy_se_pts": 100 * math.sqrt(float(hits.mean()) * (1 - float(hits.mean())) / hits.numel()),
                         **m})
    out = {"target": args.target, "heldout": args.heldout, "heldout_examples": len(held),
           "heldout_rejected": len(rejects), "top_p": args.top_p, "temperature": 1.0, "n": args.n,
           "cpu": cpu_model(), "rows": rows}
    if args.out:
        atomic_write_json(Path(args.out), out)
    print(markdown(rows, args.n))


if __name__ == "__main__":
    main()
