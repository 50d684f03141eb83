"""Rebuild the GPU-trained draft (benchmarks/distill/gpu_kd.py) on this machine: derive the same layer draft
from the target, load the returned bf16 tensors, and save it twice with `save_draft` (full head, and head
restricted to the most frequent tokens of the generated training data), ready for `soaes-specdec bench`.

    python benchmarks/distill/assemble_gpu_draft.py runs/distill-gpu/device --out runs/distill-gpu/drafts
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from soaes_core import load_model, load_tokenizer, read_jsonl
from soaes_distill.draft_init import frequent_tokens, restrict_output_head, save_draft
from soaes_distill.synth import chat_records_to_examples
from soaes_specdec.draft import make_layer_draft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("device_dir", type=Path, help="gpu_kd.py output: draft-*.safetensors, gpu_kd.json, train_records")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--target", default="embedded:smollm2-135m")
    ap.add_argument("--head-tokens", type=int, default=4096)
    args = ap.parse_args()

    log = json.loads((args.device_dir / "gpu_kd.json").read_text())
    target = load_model(args.target, dtype="float32", device="cpu")
    tok = load_tokenizer(args.target)
    draft = make_layer_draft(target, log["args"]["layers"])
    state: dict[str, torch.Tensor] = {}
    for f in log["files"]:
        state.update(load_file(str(args.device_dir / f)))
    params = dict(draft.named_parameters())
    missing = [k for k, p in params.items() if k not in state and "embed_tokens" not in k and "lm_head" not in k]
    unknown = [k for k in state if k not in params]
    if missing or unknown:
        raise SystemExit(f"tensor mismatch: missing {missing[:5]}, unknown {unknown[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.float())
    info = {"target": args.target, "kind": "first-layers", "trained": "gpu_kd.py (online forward KL)",
            "gpu_kd": {k: log[k] for k in ("args", "device", "steps", "records", "train_answer_tokens",
                                           "best_dev_greedy")}}
    save_draft(draft, tok, args.out / "full-head", None, info)
    records = read_jsonl(args.device_dir / "train_records.jsonl")
    seqs = [e.input_ids for e in chat_records_to_examples(tok, records, log["args"]["max_length"], [])]
    ids = frequent_tokens(seqs, args.head_tokens, always=tok.all_special_ids)
    restrict_output_head(draft, ids)
    save_draft(draft, tok, args.out / f"head-{len(ids)}", ids, {**info, "head_tokens": len(ids)})
    print(json.dumps({"out": str(args.out), "head_tokens": len(ids), "tensors": len(state)}))


if __name__ == "__main__":
    main()
