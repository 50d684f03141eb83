"""Issue 14 probe: fine-tune a trained feature draft with an added total-variation term against the top-p-warped
target, TV(warp(p_T), softmax(q_D)) = 1 - (the acceptance of an unwarped draft), on the recipe's cached features.

Measured and dropped (docs/benchmarks.md, distill section 9): 2,000 steps moved the unwarped draft's top-p
acceptance from 45.2 to 47.2 % and the warped one's from 51.1 to 51.7 %, still the better of the two.

    python benchmarks/distill/feature_tv_finetune.py --config benchmarks/specdec/cpu_smollm2_domain_best.yaml \
        --run runs/pipeline-smollm2-domain --steps 2000 --out runs/draft-tv
    python benchmarks/specdec/proposal_acceptance.py --config ... --draft runs/draft-tv --out ...
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import yaml

from soaes_distill.feature_kd import (
    FeatureKDConfig,
    _batch,
    cached_features,
    feature_kd_loss,
    head_weight,
    trainable_parameters,
    usable_examples,
)
from soaes_distill.token_data import load_token_examples
from soaes_specdec.bench import BenchConfig, load_bench_models
from soaes_specdec.feature_draft import FeatureDraft
from soaes_specdec.sampling import SamplingParams, warp_probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="bench YAML: its target and (feature) draft")
    ap.add_argument("--run", required=True, help="the smollm2-domain pipeline's output directory (data, features)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tv-weight", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.7, help="the target's serving top-p the TV term warps to")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = BenchConfig(**yaml.safe_load(open(args.config, encoding="utf-8")))
    target, _, tok = load_bench_models(cfg)
    target = target.float().eval()
    draft = FeatureDraft.from_pretrained(cfg.draft, dtype=torch.float32, device="cpu")
    for module in (draft.fc, draft.lm.model.layers, draft.lm.model.norm):
        module.requires_grad_(True)
    draft.freeze_embeddings()
    run = Path(args.run)
    kd = FeatureKDConfig(max_length=256)
    train, _ = usable_examples(load_token_examples(run / "stages/08_teacher_data/train_tokens.jsonl"), 256, "train")
    feats = cached_features(target, train, run / "stages/10_distill_draft/distilled/features", kd)
    params = trainable_parameters(draft)
    weight, _ = head_weight(draft)
    opt = torch.optim.AdamW(list(params.values()), lr=args.lr)
    warp = SamplingParams(True, 1.0, args.top_p)
    draft.train()
    for step in range(args.steps):
        rng = torch.Generator().manual_seed(777 + step)
        idx = torch.randint(0, len(train), (8,), generator=rng).tolist()
        f_in, ids, f_next, mask = _batch([train[i] for i in idx], [feats[i] for i in idx])
        f_in = f_in + (torch.rand(f_in.shape, generator=rng) * 2 - 1) * kd.feature_noise
        for group in opt.param_groups:
            group["lr"] = args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps)))
        g = draft(f_in, ids).float()
        loss, parts = feature_kd_loss(g, f_next, mask, weight, kd.feature_weight, kd.kl_weight)
        with torch.no_grad():
            p = warp_probs(f_next[mask] @ weight.t(), warp)
        tv = 0.5 * (p - torch.softmax(g[mask] @ weight.t(), -1)).abs().sum(-1).mean()
        loss = loss + args.tv_weight * tv
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            print(step + 1, {"loss": round(float(loss), 4), "tv": round(float(tv), 4),
                             **{k: round(v, 4) for k, v in parts.items()}}, flush=True)
    draft.eval()
    draft.save_pretrained(args.out, tokenizer=tok)


if __name__ == "__main__":
    main()
