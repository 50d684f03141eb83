"""Train one more α/τ point of a finished distill experiment (same data, store, draft and schedule) and print
its offline acceptance estimate, e.g. the α = 0.5, τ = 2 reference at the grid's step count.

    HF_HUB_OFFLINE=1 python benchmarks/distill/grid_point.py runs/distill-exp --alpha 0.5 --tau 2 --steps 150
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from experiment import ExperimentConfig, _estimate, _train

from soaes_core import from_dict, load_model, seed_everything
from soaes_distill.store import TeacherLogitStore
from soaes_distill.token_data import load_token_examples
from soaes_distill.trainer import KDConfig
from soaes_specdec.draft import make_layer_draft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment_dir")
    ap.add_argument("--alpha", type=float, required=True)
    ap.add_argument("--tau", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    args = ap.parse_args()
    exp = Path(args.experiment_dir)
    saved = json.loads((exp / "report.json").read_text())["settings"]
    cfg = from_dict(ExperimentConfig, {k: v for k, v in saved.items() if k in ExperimentConfig.__dataclass_fields__},
                    source=str(exp / "report.json"))
    seed_everything(cfg.seed)
    target = load_model(cfg.target, dtype=torch.float32, device="cpu").eval()
    train = load_token_examples(exp / "train_tokens.jsonl")
    held = load_token_examples(exp / "heldout_tokens.jsonl")
    with torch.no_grad():
        t_logits = [target(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits for e in held]
    draft = make_layer_draft(target, cfg.draft_layers)
    name = f"grid forward KL (α={args.alpha:g}, τ={args.tau:g})"
    draft, history, seconds = _train(copy.deepcopy(draft), train, KDConfig(alpha=args.alpha, temperature=args.tau),
                                     cfg, exp / "runs" / f"extra-a{args.alpha:g}-t{args.tau:g}",
                                     TeacherLogitStore(exp / "teacher_logits"), args.steps)
    row = {"method": name, "steps": len(history), "train_s": round(seconds, 1), **_estimate(t_logits, draft, held)}
    print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
