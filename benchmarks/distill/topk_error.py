"""KL error of top-k teacher logits vs the dense teacher, on the embedded SmolLM2-135M's real logits.

Teacher: the embedded model. For every position of the sample domain texts and k in {8, 32, 64, 128},
τ in {1, 2} we measure (1) the teacher reconstruction error KL(p_T ‖ p̂_T), where p̂_T is the store's top-k
(fp16 τ=1 log-probs + fp32 logsumexp) with the tail mass spread uniformly over the other V−k tokens, and
(2) the error of the forward-KL term of `distillation_loss` (tail-bucket top-k vs dense teacher) for two
students: the undistilled 4-layer derived draft (far from the target) and a 26-layer truncation (near it).
Bytes/token are measured by encoding real shards
(`soaes_distill.store.encode_shard`, one captured τ) with and without zstd.

    HF_HUB_OFFLINE=1 python benchmarks/distill/topk_error.py --out docs/bench/distill_topk.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from soaes_core import DEFAULT_MODEL, load_model, load_tokenizer, read_jsonl
from soaes_data.samples import sample_path
from soaes_distill.dump import capture_example
from soaes_distill.losses import TopKLogits, distillation_loss_terms
from soaes_distill.store import CaptureSettings, encode_shard
from soaes_specdec.draft import make_layer_draft

KS = (8, 32, 64, 128)
TAUS = (1.0, 2.0)


def texts(limit: int) -> list[str]:
    out = []
    for name in ("sft/expert_pool.jsonl", "sft/dialog_pool.jsonl"):
        for rec in read_jsonl(sample_path(name)):
            out.append("\n".join(m["content"] for m in rec["messages"]))
    return out[:limit]


def settings(k: int, tau: float, compression: str) -> CaptureSettings:
    return CaptureSettings(model=DEFAULT_MODEL, model_fingerprint="-", tokenizer_sha256="-", dataset_sha256="-",
                           vocab_size=49152, top_k=k, dtype="float16", temperatures=[tau], compression=compression)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/bench/distill_topk.json")
    ap.add_argument("--num-texts", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=96)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(DEFAULT_MODEL)
    target = load_model(DEFAULT_MODEL, dtype=torch.float32, device="cpu")
    students = {"draft4": make_layer_draft(target, 4), "draft26": make_layer_draft(target, 26)}
    err = {(s, k, t): [0.0, 0.0] for s in students for k in KS for t in TAUS}  # sum |err|, signed (pos.-weighted)
    dense_sum = {(s, t): 0.0 for s in students for t in TAUS}
    recon = {(k, t): 0.0 for k in KS for t in TAUS}
    tail_mass = dict.fromkeys(KS, 0.0)
    captured: dict[tuple[int, str], list[dict[str, torch.Tensor]]] = {(k, c): [] for k in KS for c in ("none", "zstd")}
    positions = 0
    start = time.perf_counter()
    with torch.no_grad():
        for text in texts(args.num_texts):
            ids = torch.tensor([tok(text)["input_ids"][: args.max_length]])
            logp = torch.log_softmax(target(input_ids=ids).logits.float(), -1)  # teacher τ=1 log-probs
            s_logits = {name: m(input_ids=ids).logits for name, m in students.items()}
            n = ids.shape[1] - 1
            positions += n
            for tau in TAUS:
                p_t = torch.log_softmax(logp[0, :-1] / tau, -1)
                for k in KS:
                    arrays = capture_example(logp[0], settings(k, tau, "none"))
                    topk = TopKLogits(arrays["values"].half().float()[None], arrays["indices"][None],
                                      arrays["logsumexp"][None, :, 0], tau, 49152)
                    # reconstruction: exact top-k probs from the stored values, uniform tail over V - k tokens
                    top_lp = topk.values[0, :-1] / tau - topk.logsumexp[0, :-1, None]
                    tail = (1 - top_lp.exp().sum(-1)).clamp(min=1e-12)
                    rec = (tail / (49152 - k)).log()[:, None].expand(-1, 49152).clone()
                    rec.scatter_(-1, topk.indices[0, :-1], top_lp)
                    recon[(k, tau)] += float((p_t.exp() * (p_t - rec)).sum())
                    for name, d_logits in s_logits.items():
                        dense = distillation_loss_terms(d_logits, logp, ids, alpha=1.0, temperature=tau).kd.item()
                        if k == KS[0]:
                            dense_sum[(name, tau)] += dense * n
                        approx = distillation_loss_terms(d_logits, topk, ids, alpha=1.0, temperature=tau).kd.item()
                        err[(name, k, tau)][0] += abs(approx - dense) * n
                        err[(name, k, tau)][1] += (approx - dense) * n
                    if tau == 2.0:
                        for comp in ("none", "zstd"):
                            captured[(k, comp)].append(arrays)
                    if tau == 1.0:
                        tail_mass[k] += float((1 - arrays["values"][:-1].exp().sum(-1)).sum())
    rows = []
    for k in KS:
        size = {c: len(encode_shard(settings(k, 2.0, c), list(range(len(captured[(k, c)]))), captured[(k, c)]))
                for c in ("none", "zstd")}
        for tau in TAUS:
            per_student = {f"{name}_{what}": v for name in students for what, v in (
                ("dense_kl", dense_sum[(name, tau)] / positions),
                ("abs_error", err[(name, k, tau)][0] / positions),
                ("signed_error", err[(name, k, tau)][1] / positions))}
            rows.append({"k": k, "tau": tau, "teacher_reconstruction_kl": recon[(k, tau)] / positions,
                         **per_student, "teacher_tail_mass_tau1": tail_mass[k] / positions,
                         "bytes_per_token_formula": settings(k, tau, "none").bytes_per_position(),
                         "bytes_per_token": size["none"] / positions,
                         "bytes_per_token_zstd": size["zstd"] / positions})
    result = {"model": DEFAULT_MODEL, "students": {"draft4": "first 4 layers of the target (undistilled)",
                                                   "draft26": "first 26 layers of the target"},
              "texts": args.num_texts, "positions": positions, "rows": rows,
              "seconds": round(time.perf_counter() - start, 1),
              "note": "errors: position-weighted mean of |KD_topk - KD_dense| of the forward-KL term (nats); "
                      "bytes: one shard holding every position, fp16 values, 16-bit ids, one fp32 logsumexp",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"k={r['k']:4d} tau={r['tau']:.0f} recon KL={r['teacher_reconstruction_kl']:.5f} "
              f"d4: dense={r['draft4_dense_kl']:.3f} |err|={r['draft4_abs_error']:.4f} "
              f"d26: dense={r['draft26_dense_kl']:.3f} |err|={r['draft26_abs_error']:.4f} "
              f"tail={r['teacher_tail_mass_tau1']:.4f} "
              f"B/tok={r['bytes_per_token']:.1f} zstd={r['bytes_per_token_zstd']:.1f}")


if __name__ == "__main__":
    main()
