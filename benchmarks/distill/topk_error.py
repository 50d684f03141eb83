"""KL error of top-k teacher logits vs the dense teacher, on the embedded SmolLM2-135M's real logits.

Teacher: the embedded model; student: its 4-layer derived draft (undistilled). For each position of the
sample domain texts we compare the forward-KL term of `distillation_loss` computed from the dense teacher
with the one computed from a `TopKLogits` store (fp16 log-probs, tail bucket), for k in {8, 32, 64, 128} and
τ in {1, 2}. We also dump a real store for each k to measure bytes/token (with and without zstd).

    HF_HUB_OFFLINE=1 python benchmarks/distill/topk_error.py --out docs/bench/distill_topk.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from soaes_core import DEFAULT_MODEL, load_model, load_tokenizer, read_jsonl
from soaes_data.samples import sample_path
from soaes_distill.dump import DumpConfig, run_dump
from soaes_distill.losses import TopKLogits, distillation_loss_terms
from soaes_distill.store import TeacherLogitStore
from soaes_distill.token_data import TokenExample, write_token_jsonl
from soaes_specdec.draft import make_layer_draft


def texts(limit: int) -> list[str]:
    out = []
    for name in ("sft/expert_pool.jsonl", "sft/dialog_pool.jsonl"):
        for rec in read_jsonl(sample_path(name)):
            out.append("\n".join(m["content"] for m in rec["messages"]))
    for rec in read_jsonl(sample_path("corpus/articles.jsonl")):
        if isinstance(rec.get("text"), str):
            out.append(rec["text"])
    return out[:limit]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/bench/distill_topk.json")
    ap.add_argument("--num-texts", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=96)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(DEFAULT_MODEL)
    target = load_model(DEFAULT_MODEL, dtype=torch.float32, device="cpu")
    draft = make_layer_draft(target, 4)
    examples = [TokenExample(i, tok(t)["input_ids"][: args.max_length]) for i, t in enumerate(texts(args.num_texts))]
    work = Path(tempfile.mkdtemp(prefix="distill-topk-"))
    data = write_token_jsonl(work / "tokens.jsonl", examples)
    ks = [8, 32, 64, 128]
    stores = {}
    sizes = {}
    for k in ks:
        for comp in ("none", "zstd"):
            res = run_dump(DumpConfig(dataset=str(data), output_dir=str(work / f"k{k}-{comp}"), top_k=k,
                                      temperatures=[1.0, 2.0], compression=comp, examples_per_shard=64),
                           model=target, tokenizer=tok)
            sizes[(k, comp)] = res.bytes_per_token
        stores[k] = TeacherLogitStore(work / f"k{k}-none")
    rows = []
    positions = 0
    err = {(k, t): [] for k in ks for t in (1.0, 2.0)}
    dense_kl = {t: [] for t in (1.0, 2.0)}
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            t_logits = target(input_ids=ids).logits
            d_logits = draft(input_ids=ids).logits
            labels = ids.clone()
            positions += ids.shape[1] - 1
            for tau in (1.0, 2.0):
                dense = distillation_loss_terms(d_logits, t_logits, labels, alpha=1.0, temperature=tau).kd.item()
                dense_kl[tau].append((dense, ids.shape[1] - 1))
                for k in ks:
                    L = ids.shape[1]
                    topk = stores[k].lookup(torch.full((1, L), ex.example_id), torch.arange(L)[None], temperature=tau)
                    assert isinstance(topk, TopKLogits)
                    approx = distillation_loss_terms(d_logits, topk, labels, alpha=1.0, temperature=tau).kd.item()
                    err[(k, tau)].append((abs(approx - dense), approx - dense, ids.shape[1] - 1))
    for k in ks:
        for tau in (1.0, 2.0):
            n = sum(w for *_, w in err[(k, tau)])
            mae = sum(a * w for a, _, w in err[(k, tau)]) / n
            bias = sum(b * w for _, b, w in err[(k, tau)]) / n
            dkl = sum(v * w for v, w in dense_kl[tau]) / n
            rows.append({"k": k, "tau": tau, "dense_kl": dkl, "abs_error": mae, "signed_error": bias,
                         "bytes_per_token_1temp": k * 2 + k * 2 + 4,
                         "bytes_per_token_stored": sizes[(k, "none")],
                         "bytes_per_token_zstd": sizes[(k, "zstd")]})
    result = {"model": DEFAULT_MODEL, "student": "first 4 layers of the target (undistilled)",
              "positions": positions, "texts": len(examples), "rows": rows,
              "note": "stored bytes include 2 logsumexps (tau 1 and 2); bytes_per_token_1temp = one tau",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"k={r['k']:4d} tau={r['tau']:.0f} dense KL={r['dense_kl']:.4f} |err|={r['abs_error']:.5f} "
              f"signed={r['signed_error']:+.5f} B/tok={r['bytes_per_token_stored']:.1f} "
              f"zstd={r['bytes_per_token_zstd']:.1f}")


if __name__ == "__main__":
    main()
