"""Train the short feature draft the serving benchmark uses (no demo run left one under runs/): the embedded
SmolLM2-135M answers the shipped SFT pools' user turns (greedy + one top-p sample each; the held-out domain prompts
are left out), then `soaes_distill.feature_kd` trains an EAGLE-style head on those answers for a fixed time budget.

    .venv/bin/python benchmarks/serve/train_draft.py --out runs/serve-bench/draft-train --budget-s 240
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from soaes_core import DEFAULT_MODEL, load_model, load_tokenizer, read_jsonl
from soaes_distill.feature_kd import FeatureKDConfig, train_feature_draft
from soaes_distill.synth import blackbox_sft_records, chat_records_to_examples, sampled_sft_records

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "packages/soaes-data/src/soaes_data/samples/sft"
HELDOUT = ROOT / "packages/soaes-distill/src/soaes_distill/data/heldout_domain_prompts.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/serve-bench/draft-train")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    held = {r["id"] for r in read_jsonl(HELDOUT)}
    prompts = [{"id": r["id"], "prompt": r["messages"][0]["content"]}
               for name in ("expert_pool.jsonl", "dialog_pool.jsonl") for r in read_jsonl(SAMPLES / name)
               if r["id"] not in held]
    tok, model = load_tokenizer(DEFAULT_MODEL), load_model(DEFAULT_MODEL, dtype=torch.float32, device="cpu")
    records = blackbox_sft_records(model, tok, prompts, args.max_new_tokens, batch_size=8)
    records += sampled_sft_records(model, tok, prompts, args.max_new_tokens, batch_size=8, temperature=1.0,
                                   top_p=0.7, seed=1)
    examples = chat_records_to_examples(tok, records, 192)
    cfg = FeatureKDConfig(steps=3000, time_budget_s=args.budget_s, batch_size=8, max_length=192,
                          learning_rate=5e-4, warmup_steps=30, head_tokens=2048, checkpoint_every=200,
                          dev_max_examples=8, threads=0)
    res = train_feature_draft(model, examples, None, cfg, args.out, tokenizer=tok)
    print(json.dumps({"draft_dir": str(res.draft_dir), "prompts": len(prompts), "examples": len(examples),
                      "steps": res.steps, "best_step": res.best_step, "train_seconds": round(res.train_seconds, 1),
                      "dev": res.dev_metrics}, indent=2))


if __name__ == "__main__":
    main()
