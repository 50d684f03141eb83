"""Online forward-KL KD of a layer draft at GPU scale (issue 6): the target answers a large domain prompt set
(black-box data made with soaes_distill.synth), then the draft is trained against the live teacher with
`soaes_distill.losses.distillation_loss` under a wall-clock budget, selected on a dev split of the generated
data by the offline acceptance estimator, and its trained tensors are written as bf16 safetensors shards.

Superseded: the library's `soaes_distill.feature_kd.train_feature_draft` (the pipeline's `distill_draft` stage,
CPU or GPU with bfloat16 autocast, step or wall-clock budget, dev-split selection) trains the best draft now; this
script stays only to reproduce the run recorded in docs/benchmarks.md (soaes-distill section 3).

Runs on CPU too (tiny settings) so it can be checked before a device call. Example (GPU machine):
    python benchmarks/distill/gpu_kd.py --target gguf:/root/m/SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompts prompts.jsonl --heldout runs/distill-exp/heldout_tokens.jsonl --out $OUT --train-seconds 240
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from soaes_core import load_model, load_tokenizer, read_jsonl, write_jsonl
from soaes_data.packing import IGNORE_INDEX
from soaes_distill.acceptance import AcceptanceAccumulator
from soaes_distill.draft_init import freeze_embeddings
from soaes_distill.losses import distillation_loss
from soaes_distill.synth import blackbox_sft_records, chat_records_to_examples
from soaes_distill.token_data import TokenExample
from soaes_distill.trainer import KDCollator, KDDataset
from soaes_specdec.draft import make_layer_draft


def batches(examples: list[TokenExample], size: int, device: torch.device, pad: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (labels -100 and attention 0 on padding) by the KD trainer's own collator."""
    items, collate = KDDataset(examples), KDCollator(pad)
    out = []
    for s in range(0, len(examples), size):
        batch = collate([items[i] for i in range(s, min(s + size, len(examples)))])
        out.append({k: batch[k].to(device) for k in ("input_ids", "labels", "attention_mask")})
    return out


@torch.no_grad()
def estimate(target_logits: list[torch.Tensor], draft: torch.nn.Module, data: list[dict[str, torch.Tensor]],
             autocast: bool) -> dict[str, float]:
    draft.eval()
    acc = AcceptanceAccumulator(top_p=0.7, block_sizes=(1, 3))
    for t, b in zip(target_logits, data, strict=True):
        with torch.autocast(b["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
            d = draft(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        acc.add(t, d.float(), b["labels"])
    draft.train()
    return acc.result().as_metrics()


@torch.no_grad()
def teacher_logits(target: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    return [target(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits.float()
            for b in data]


def trained_state(draft: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.bfloat16).cpu().clone() for k, v in draft.named_parameters() if v.requires_grad}


def save_shards(state: dict[str, torch.Tensor], out: Path, max_bytes: int = 15 * 2**20) -> list[str]:
    """bf16 safetensors shards under `max_bytes` each (the device tool returns files of ≤ 16 MiB)."""
    names, shard, size, files = sorted(state), {}, 0, []
    for k in [*names, None]:
        nbytes = 0 if k is None else state[k].numel() * state[k].element_size()
        if shard and (k is None or size + nbytes > max_bytes):
            f = out / f"draft-{len(files):02d}.safetensors"
            save_file(shard, str(f))
            files.append(f.name)
            shard, size = {}, 0
        if k is not None:
            shard[k] = state[k].contiguous()
            size += nbytes
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL {id, prompt}")
    ap.add_argument("--heldout", required=True, help="tokenized held-out JSONL (input_ids, labels)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--gen-batch", type=int, default=256)
    ap.add_argument("--max-prompts", type=int, default=0)
    ap.add_argument("--dev", type=int, default=256, help="generated records held out for model selection")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--train-seconds", type=float, default=240.0)
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_type)
    torch.manual_seed(args.seed)
    log: dict = {"args": vars(args), "device": torch.cuda.get_device_name() if dev_type == "cuda" else "cpu"}
    t0 = time.perf_counter()
    target = load_model(args.target, dtype="float32", device=device)
    tok = load_tokenizer(args.target)
    log["load_s"] = time.perf_counter() - t0

    prompts = read_jsonl(args.prompts)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    torch.backends.cuda.matmul.allow_tf32 = False  # the answers are the fp32 target's greedy text
    t0 = time.perf_counter()
    records = blackbox_sft_records(target, tok, prompts, args.answer_tokens, args.gen_batch)
    log["generate_s"] = time.perf_counter() - t0
    write_jsonl(out / "train_records.jsonl", records)
    rejects: list[dict] = []
    examples = chat_records_to_examples(tok, records, args.max_length, rejects)
    write_jsonl(out / "rejects.jsonl", rejects)
    rng = random.Random(args.seed)
    rng.shuffle(examples)
    dev, train = examples[: args.dev], examples[args.dev:]
    log.update(records=len(records), rejected=len(rejects), train_examples=len(train), dev_examples=len(dev),
               train_answer_tokens=sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in train))

    torch.backends.cuda.matmul.allow_tf32 = True
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    held = [TokenExample(i, r["input_ids"], r["labels"]) for i, r in enumerate(read_jsonl(args.heldout))]
    dev_b, held_b = batches(dev, 32, device, pad), batches(held, 32, device, pad)
    dev_t, held_t = teacher_logits(target, dev_b), teacher_logits(target, held_b)

    draft = make_layer_draft(target, args.layers)
    freeze_embeddings(draft)
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    autocast = dev_type == "cuda"
    history, best, best_state = [], -1.0, None

    def evaluate(step: int, loss: float) -> None:
        nonlocal best, best_state
        m = {"step": step, "loss": loss, "seconds": time.perf_counter() - t_train}
        m.update({f"dev_{k}": v for k, v in estimate(dev_t, draft, dev_b, autocast).items()})
        m.update({f"heldout_{k}": v for k, v in estimate(held_t, draft, held_b, autocast).items()})
        history.append(m)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}), flush=True)
        if m["dev_acceptance_greedy"] > best:
            best, best_state = m["dev_acceptance_greedy"], trained_state(draft)
            m["best"] = True

    t_train = time.perf_counter()
    step, running = 0, 0.0
    evaluate(0, float("nan"))
    warmup = 100
    while step < args.max_steps:
        rng.shuffle(train)
        epoch: list[dict[str, torch.Tensor]] = []
        for s in range(0, len(train) - args.batch + 1, args.batch * 16):  # similar lengths within a batch
            group = sorted(train[s:s + args.batch * 16], key=lambda e: len(e.input_ids))
            epoch += batches(group[: len(group) // args.batch * args.batch], args.batch, device, pad)
        rng.shuffle(epoch)
        for b in epoch:
            elapsed = time.perf_counter() - t_train
            if elapsed > args.train_seconds or step >= args.max_steps:
                break
            # linear warm-up, then cosine to 10 % over the time budget (steps are not known in advance)
            frac = min(1.0, elapsed / args.train_seconds)
            lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.no_grad():
                t = target(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast):
                d = draft(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            loss = distillation_loss(d.float(), t.float(), b["labels"], alpha=args.alpha, temperature=args.tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
            if step % args.eval_every == 0:
                evaluate(step, running)
        else:
            continue
        break
    evaluate(step, running)
    log.update(steps=step, train_s=time.perf_counter() - t_train, history=history, best_dev_greedy=best)
    log["files"] = save_shards(best_state or trained_state(draft), out)
    (out / "gpu_kd.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: v for k, v in log.items() if k != "history"}), flush=True)


if __name__ == "__main__":
    main()
