"""Error of top-k (+ sampled tail) teacher logits vs the dense teacher, on the embedded SmolLM2-135M's real logits.

Teacher: the embedded model, on the soaes-data sample SFT texts. Two families of stored teachers:

- **top-k** (tail bucket), k in {8, 32, 64, 128}, captured at the row's τ only (one logsumexp);
- **top-k + s tail samples**, (k, s) configurations that fit in ≤ 300 bytes/token, captured at τ ∈ {1, 2}
  (two logsumexps) with the samples drawn at τ_s = 2, so the τ = 1 rows use the importance weights τ ≠ τ_s.

Each is built by `soaes_distill.dump.capture_example` (the dump's own code path; fp16 values) and scored
with `soaes_distill.losses.divergence_per_position` (the row function of `distillation_loss`) on the
forward-KL term at τ ∈ {1, 2}, for two students: the undistilled 4-layer derived draft (far from the target)
and a 26-layer truncation (near it). Per row and student:

- objective error: |mean over ALL positions of KD_approx − of KD_dense| (the error of the loss a run optimises),
  with the standard error of that mean for the sampled rows (their per-position errors are independent);
- per-text error: position-weighted mean over texts of |mean_text KD_approx − mean_text KD_dense|;
- per-position error: mean over positions of |KD_approx − KD_dense|;
- gradient cosine: cosine between the approximate and dense gradients of Σ_positions KD w.r.t. the student
  logits, all positions of all texts concatenated.

Top-k rows also report the teacher reconstruction error KL(p_T ‖ p̂_T) (tail spread uniformly). Bytes/token
are measured by encoding one real shard holding every position (`soaes_distill.store.encode_shard`), without
and with zstd.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/distill/topk_error.py --num-texts 48 --max-length 512 \\
        --out docs/bench/distill_topk.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from soaes_core import DEFAULT_MODEL, load_model, load_tokenizer, read_jsonl
from soaes_data.samples import sample_path
from soaes_distill.dump import capture_example
from soaes_distill.losses import TopKLogits, distillation_loss_terms, divergence_per_position
from soaes_distill.store import CaptureSettings, encode_shard
from soaes_specdec.draft import make_layer_draft

VOCAB = 49152
TAUS = (1.0, 2.0)
TOPK_ONLY = (8, 32, 64, 128)
TAIL_CONFIGS = ((8, 56), (16, 48), (32, 32), (48, 16))  # (k, s): k + s = 64 ids, 264 B/token + header
TAIL_TAU = 2.0


@dataclass(frozen=True)
class Config:
    """One stored-teacher configuration: k top tokens, s tail samples, captured temperatures."""

    k: int
    s: int
    temperatures: tuple[float, ...]

    @property
    def name(self) -> str:
        return f"k={self.k}" + (f"+s={self.s}" if self.s else "")

    def settings(self, compression: str = "none") -> CaptureSettings:
        return CaptureSettings(model=DEFAULT_MODEL, model_fingerprint="-", tokenizer_sha256="-", dataset_sha256="-",
                               vocab_size=VOCAB, top_k=self.k, dtype="float16", temperatures=list(self.temperatures),
                               compression=compression, tail_samples=self.s,
                               tail_temperature=TAIL_TAU if self.s else None)


def texts(limit: int) -> list[str]:
    out = []
    for name in ("sft/expert_pool.jsonl", "sft/dialog_pool.jsonl"):
        for rec in read_jsonl(sample_path(name)):
            out.append("\n".join(m["content"] for m in rec["messages"]))
    return out[:limit]


def stored_teacher(arrays: dict[str, torch.Tensor], cfg: Config, tau: float) -> TopKLogits:
    """The `TopKLogits` a store lookup returns for one example (values rounded to fp16 as stored), positions [:-1]."""
    col = cfg.temperatures.index(tau)
    top = TopKLogits(arrays["values"].half().float()[:-1], arrays["indices"][:-1], arrays["logsumexp"][:-1, col],
                     tau, VOCAB)
    if not cfg.s:
        return top
    s_col = cfg.temperatures.index(TAIL_TAU)
    return TopKLogits(top.values, top.indices, top.logsumexp, tau, VOCAB, tail_indices=arrays["tail_indices"][:-1],
                      tail_values=arrays["tail_values"].half().float()[:-1],
                      tail_logsumexp=arrays["logsumexp"][:-1, s_col], tail_temperature=TAIL_TAU)


def kd_and_grad(student: torch.Tensor, teacher: torch.Tensor | TopKLogits, tau: float) -> tuple[torch.Tensor, ...]:
    """Per-position forward KL (n,) and the gradient of its sum w.r.t. the student logits (n, V)."""
    leaf = student.detach().requires_grad_(True)
    per = divergence_per_position(leaf, teacher, tau, "forward_kl")
    (grad,) = torch.autograd.grad(per.sum(), leaf)
    return per.detach(), grad


def reconstruction_kl(log_p: torch.Tensor, teacher: TopKLogits, tau: float) -> float:
    """Σ_positions KL(p_T ‖ p̂_T): exact top-k probabilities, tail mass spread uniformly over the other V − k."""
    top_lp = teacher.values / tau - teacher.logsumexp[:, None]
    tail = (1 - top_lp.exp().sum(-1)).clamp(min=1e-12)
    rec = (tail / (VOCAB - teacher.k)).log()[:, None].expand(-1, VOCAB).clone()
    rec.scatter_(-1, teacher.indices, top_lp)
    return float((log_p.exp() * (log_p - rec)).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/bench/distill_topk.json")
    ap.add_argument("--num-texts", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(DEFAULT_MODEL)
    target = load_model(DEFAULT_MODEL, dtype=torch.float32, device="cpu")
    students = {"d4": make_layer_draft(target, 4), "d26": make_layer_draft(target, 26)}
    configs = [Config(k, 0, (tau,)) for k in TOPK_ONLY for tau in TAUS] + \
        [Config(k, s, TAUS) for k, s in TAIL_CONFIGS]
    rows_of = [(cfg, tau) for cfg in configs for tau in cfg.temperatures]
    # accumulators per (config, τ, student): per-position errors, per-text |error|·n, gradient dots
    errors: dict[tuple, list[torch.Tensor]] = {(c, t, s): [] for c, t in rows_of for s in students}
    per_text: dict[tuple, float] = dict.fromkeys(errors, 0.0)
    dots: dict[tuple, list[float]] = {key: [0.0, 0.0, 0.0] for key in errors}  # <a,d>, |a|², |d|²
    dense_sum = {(t, s): 0.0 for t in TAUS for s in students}
    recon = {(c, t): 0.0 for c, t in rows_of if not c.s}
    tail_mass = {(c, t): 0.0 for c, t in rows_of}
    captured: dict[Config, list[dict[str, torch.Tensor]]] = {c: [] for c in configs}
    positions = 0
    checked = False
    start = time.perf_counter()
    for text_id, text in enumerate(texts(args.num_texts)):
        ids = torch.tensor([tok(text)["input_ids"][: args.max_length]])
        with torch.no_grad():
            logp = torch.log_softmax(target(input_ids=ids).logits.float(), -1)[0]  # teacher τ=1 log-probs (L, V)
            s_logits = {name: m(input_ids=ids).logits.float()[0, :-1] for name, m in students.items()}
        n = ids.shape[1] - 1
        positions += n
        arrays_of = {}
        for cfg in configs:
            arrays_of[cfg] = capture_example(logp, cfg.settings(), example_id=text_id)
            captured[cfg].append(arrays_of[cfg])
        for tau in TAUS:
            log_p = torch.log_softmax(logp[:-1] / tau, -1)
            dense = {name: kd_and_grad(z, logp[:-1], tau) for name, z in s_logits.items()}
            for name in students:
                dense_sum[(tau, name)] += float(dense[name][0].sum())
            for cfg in configs:
                if tau not in cfg.temperatures:
                    continue
                teacher = stored_teacher(arrays_of[cfg], cfg, tau)
                top_lp = teacher.values / tau - teacher.logsumexp[:, None]
                tail_mass[(cfg, tau)] += float((1 - top_lp.exp().sum(-1)).sum())
                if not cfg.s:
                    recon[(cfg, tau)] += reconstruction_kl(log_p, teacher, tau)
                for name, z in s_logits.items():
                    approx, grad = kd_and_grad(z, teacher, tau)
                    d_val, d_grad = dense[name]
                    key = (cfg, tau, name)
                    errors[key].append(approx - d_val)
                    per_text[key] += abs(float(approx.sum() - d_val.sum()))
                    acc = dots[key]
                    acc[0] += float((grad * d_grad).sum())
                    acc[1] += float((grad * grad).sum())
                    acc[2] += float((d_grad * d_grad).sum())
                    if not checked:  # the per-position function is the loss's row function
                        ref = distillation_loss_terms(z[None], teacher.index(lambda t: t[None]),
                                                      torch.zeros(1, n, dtype=torch.long), alpha=1.0,
                                                      temperature=tau, shift_labels=False).kd.item()
                        assert math.isclose(ref, float(approx.mean()), rel_tol=1e-4), (ref, float(approx.mean()))
                        checked = True
        print(f"text {text_id + 1}: {positions} positions, {time.perf_counter() - start:.0f}s", flush=True)
    rows = []
    for cfg in configs:
        size = {c: len(encode_shard(cfg.settings(c), list(range(len(captured[cfg]))), captured[cfg]))
                for c in ("none", "zstd")}
        for tau in cfg.temperatures:
            row = {"config": cfg.name, "k": cfg.k, "tail_samples": cfg.s, "tau": tau,
                   "tail_tau": TAIL_TAU if cfg.s else None, "captured_taus": list(cfg.temperatures),
                   "teacher_tail_mass": tail_mass[(cfg, tau)] / positions,
                   "teacher_reconstruction_kl": None if cfg.s else recon[(cfg, tau)] / positions}
            for name in students:
                key = (cfg, tau, name)
                err = torch.cat(errors[key]).double()
                a_d, a_a, d_d = dots[key]
                row.update({
                    f"{name}_dense_kl": dense_sum[(tau, name)] / positions,
                    f"{name}_objective_error": abs(float(err.mean())),
                    f"{name}_objective_signed_error": float(err.mean()),
                    f"{name}_objective_error_se": float(err.std() / math.sqrt(len(err))) if cfg.s else 0.0,
                    f"{name}_per_text_error": per_text[key] / positions,
                    f"{name}_per_position_error": float(err.abs().mean()),
                    f"{name}_grad_cosine": a_d / math.sqrt(a_a * d_d),
                })
            row.update({"bytes_per_token_formula": cfg.settings().bytes_per_position(),
                        "bytes_per_token": size["none"] / positions, "bytes_per_token_zstd": size["zstd"] / positions})
            rows.append(row)
    result = {"model": DEFAULT_MODEL, "students": {"d4": "first 4 layers of the target (undistilled)",
                                                   "d26": "first 26 layers of the target"},
              "texts": args.num_texts, "max_length": args.max_length, "positions": positions, "rows": rows,
              "seconds": round(time.perf_counter() - start, 1),
              "note": "errors of the forward-KL term (nats), see the module docstring for the three error metrics; "
                      "top-k rows capture the row's τ only, top-k + tail rows capture τ ∈ {1, 2} with tail samples "
                      "drawn at τ_s = 2; bytes: one shard holding every position, fp16 values, 16-bit ids, one "
                      "fp32 logsumexp per captured τ",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(f"{r['config']:>10} tau={r['tau']:.0f} " + " ".join(
            f"{s}: obj={r[f'{s}_objective_error']:.4f}±{r[f'{s}_objective_error_se']:.4f} "
            f"text={r[f'{s}_per_text_error']:.4f} pos={r[f'{s}_per_position_error']:.4f} "
            f"cos={r[f'{s}_grad_cosine']:.4f}" for s in students)
            + f" B/tok={r['bytes_per_token']:.1f} zstd={r['bytes_per_token_zstd']:.1f}")


if __name__ == "__main__":
    main()
