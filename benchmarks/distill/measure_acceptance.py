"""Measured speculative-decoding acceptance of saved drafts on every held-out prompt of a distill experiment.

The experiment times only `speed_prompts` prompts per draft; this measures acceptance (accepted / proposed,
n = 3, greedy and top-p 0.7) on all held-out prompts with its binomial standard error, so that drafts can be
compared with some precision, next to the offline estimator's predictions on the held-out target answers
(the per-position mean α, and the `block_walk` rate that follows the decoder's blocks). Acceptance does not
depend on machine load; speed is measured by `soaes-specdec bench`.

    HF_HUB_OFFLINE=1 python benchmarks/distill/measure_acceptance.py runs/distill-exp \
        undistilled offline-forward-kl-a0.5-t2 black-box-sft-a0 --out docs/bench/distill_acceptance.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from soaes_core import DEFAULT_MODEL, encode_chat_prompt, load_model, load_tokenizer, read_prompts
from soaes_distill.acceptance import AcceptanceAccumulator
from soaes_distill.draft_init import load_draft
from soaes_distill.synth import end_of_turn_ids
from soaes_distill.token_data import load_token_examples
from soaes_specdec.decoding import SpecStats, SpeculativeDecoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment_dir")
    ap.add_argument("drafts", nargs="+", help="names under EXPERIMENT_DIR/drafts/")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    exp = Path(args.experiment_dir)
    tok = load_tokenizer(DEFAULT_MODEL)
    target = load_model(DEFAULT_MODEL, dtype=torch.float32, device="cpu").eval()
    eos = end_of_turn_ids(tok)
    prompts = [encode_chat_prompt(tok, p["prompt"]) for p in read_prompts(exp / "heldout_records.jsonl")]
    examples = load_token_examples(exp / "heldout_tokens.jsonl")
    with torch.no_grad():
        t_logits = [target(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits for e in examples]
    rows = []
    for name in args.drafts:
        draft = load_draft(exp / "drafts" / name, dtype=torch.float32, device="cpu").eval()
        acc = AcceptanceAccumulator(top_p=0.7, block_sizes=(args.n,))
        with torch.no_grad():
            for t, e in zip(t_logits, examples, strict=True):
                acc.add(t, draft(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits,
                        torch.tensor([e.labels]))
        est = acc.result()
        estimates = {"greedy": (est.alpha_greedy, est.predicted_acceptance_rate[f"greedy_n{args.n}"]),
                     "top_p_0.7": (est.alpha_sampled, est.predicted_acceptance_rate[f"sampled_n{args.n}"])}
        dec = SpeculativeDecoder(target, draft, num_speculative_tokens=args.n)
        for mode, kw in (("greedy", {"do_sample": False}), ("top_p_0.7", {"do_sample": True, "top_p": 0.7})):
            gen = torch.Generator().manual_seed(1234)
            start = time.perf_counter()
            total = SpecStats.merge(dec.generate(torch.tensor([p]), max_new_tokens=args.new_tokens, eos_token_id=eos,
                                                 generator=gen, **kw).stats for p in prompts)
            proposed, accepted, rate = total.proposed, total.accepted, total.acceptance_rate
            by_position = (total.acceptance_by_position + [0.0] * args.n)[:args.n]  # n entries even if none drafted
            rows.append({"draft": name, "mode": mode, "prompts": len(prompts), "new_tokens": total.new_tokens,
                         "proposed": proposed, "accepted": accepted, "acceptance_rate": rate,
                         "standard_error": math.sqrt(rate * (1 - rate) / proposed) if proposed else None,
                         "acceptance_by_position": by_position,
                         "estimated_alpha_mean": estimates[mode][0], "estimated_rate_block_walk": estimates[mode][1],
                         "seconds": round(time.perf_counter() - start, 1)})
            r = rows[-1]
            print(f"{name:45s} {mode:10s} acceptance {100 * rate:5.1f}% ± {100 * (r['standard_error'] or 0):.1f} "
                  f"({accepted}/{proposed}; by position "
                  f"{' '.join(f'{100 * x:.0f}' for x in r['acceptance_by_position'])}); estimated: α mean "
                  f"{100 * estimates[mode][0]:.1f}%, block walk {100 * estimates[mode][1]:.1f}%", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"experiment": str(exp), "n": args.n, "rows": rows,
                                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
