"""Teacher data for the feature-conditioned draft (issue 14): domain prompts answered by the target, in the
token-data format `soaes-distill feature-draft` reads, with a held-out split that never reaches training.

Training prompts are the sample pools' prompts (minus the held-out ones), article prompts and domain template /
passage queries (`soaes_distill.domain_queries`); every one sharing an 8-character span with a held-out prompt's
content is dropped (recorded in `prompt_rejects.jsonl`). The target answers greedily (and, with `--sampled N`,
N times more at T = 1 / top-p 0.7, the serving distribution). Generation runs in chunks appended to
`*_records.jsonl`, so a killed run resumes where it stopped; `--start K` runs a second worker on prompts K.. (its
files get the suffix `_fromK`; example ids are offset by K so both token files load together as one directory).

    python benchmarks/distill/feature_draft_data.py --out /work/runs/feature-draft/data --max-prompts 2400
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from soaes_core import encode_chat_prompt, load_model, load_tokenizer, read_jsonl, read_prompts, write_jsonl
from soaes_data.decontam import char_ngrams
from soaes_data.samples import sample_path
from soaes_distill.domain_queries import PASSAGE_INSTRUCTIONS, DomainQueryConfig, build_domain_queries
from soaes_distill.synth import blackbox_sft_records, chat_records_to_examples, generate_texts
from soaes_distill.token_data import TokenExample, write_token_jsonl

HELDOUT = Path(__file__).resolve().parents[2] / "packages/soaes-distill/src/soaes_distill/data" / \
    "heldout_domain_prompts.jsonl"
ARTICLE_INSTRUCTION = "请用两三句话概括下面的内容：\n"


def _content(prompt: str) -> str:
    """A held-out prompt without its (shared) instruction prefix: the part whose overlap means contamination."""
    for ins in (*PASSAGE_INSTRUCTIONS, ARTICLE_INSTRUCTION):
        if prompt.startswith(ins):
            return prompt[len(ins):]
    return prompt


def training_prompts(held: list[dict[str, Any]], max_prompts: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept prompts, rejects): pool + article prompts first, then domain queries, none near a held-out prompt."""
    held_texts = [_content(h["prompt"]) for h in held]
    held_grams = {g for h in held_texts for g in char_ngrams(h, 8)}
    held_exact = {h["prompt"].strip() for h in held}
    pools = [sample_path("sft/expert_pool.jsonl"), sample_path("sft/dialog_pool.jsonl")]
    base = [p for path in pools for p in read_prompts(path)]
    texts = [r["text"] for r in read_jsonl(sample_path("corpus/articles.jsonl")) if r.get("kind") == "domain"]
    base += [{"id": f"article-{i}", "prompt": ARTICLE_INSTRUCTION + t[:200]} for i, t in enumerate(texts)]
    texts += [m["content"] for path in pools for r in read_jsonl(path) for m in r["messages"]
              if r["messages"][0]["content"].strip() not in held_exact]
    q = build_domain_queries(texts, held_texts, DomainQueryConfig(num_terms=200, max_queries=6000, seed=seed))
    rejects = list(q.rejects)
    queries = list(q.prompts)
    random.Random(seed).shuffle(queries)
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    for p in base + queries:
        text = p["prompt"]
        if text.strip() in held_exact or char_ngrams(text, 8) & held_grams:
            rejects.append({"id": p["id"], "prompt": text, "reason": "overlaps a held-out prompt"})
        elif text in seen:
            rejects.append({"id": p["id"], "prompt": text, "reason": "exact duplicate"})
        else:
            seen.add(text)
            kept.append({"id": str(p["id"]), "prompt": text})
    return kept[:max_prompts], rejects


def _generate(model: Any, tok: Any, prompts: list[dict], path: Path, max_new: int, batch: int, chunk: int,
              sample_seed: int | None) -> list[dict]:
    """Answers for `prompts`, appended to `path` per chunk (resumes from the records already there)."""
    done = read_jsonl(path) if path.exists() else []
    start = time.perf_counter()
    for s in range(len(done), len(prompts), chunk):
        part = sorted(prompts[s:s + chunk], key=lambda p: len(p["prompt"]))  # less padding per batch
        if sample_seed is None:
            recs = blackbox_sft_records(model, tok, part, max_new, batch_size=batch)
        else:
            ids = [encode_chat_prompt(tok, p["prompt"]) for p in part]
            answers = generate_texts(model, tok, ids, max_new, batch, do_sample=True, temperature=1.0, top_p=0.7,
                                     seed=sample_seed + s)
            recs = [{"id": p["id"], "messages": [{"role": "user", "content": p["prompt"]},
                                                 {"role": "assistant", "content": a}], "source": "target-top-p0.7"}
                    for p, a in zip(part, answers, strict=True)]
        with path.open("a", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        done += recs
        print(f"{path.name}: {len(done)}/{len(prompts)} ({time.perf_counter() - start:.0f} s)", flush=True)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--heldout", type=Path, default=HELDOUT)
    ap.add_argument("--max-prompts", type=int, default=2400)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--sampled", type=int, default=0, help="sampled (T=1, top-p 0.7) answers per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--start", type=int, default=0, help="answer train prompts from this index on (a second worker "
                                                         "takes a later slice; its files get the suffix _from<START>)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    held = read_prompts(args.heldout)
    prompts, rejects = training_prompts(held, args.max_prompts, args.seed)
    write_jsonl(args.out / "train_prompts.jsonl", prompts)
    write_jsonl(args.out / "heldout_prompts.jsonl", held)
    write_jsonl(args.out / "prompt_rejects.jsonl", rejects)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32, device="cpu").eval()
    summary: dict[str, Any] = {"train_prompts": len(prompts), "heldout_prompts": len(held),
                               "prompt_rejects": len(rejects)}
    tag = f"_from{args.start}" if args.start else ""
    mine = prompts[args.start:]
    splits = [("heldout", held, None)] if not args.start else []
    splits += [(f"train{tag}", mine, None)]
    splits += [(f"train_sampled{k}{tag}", mine, 1000 * (k + 1) + args.start) for k in range(args.sampled)]
    for name, ps, seed in splits:
        start = time.perf_counter()
        records = _generate(model, tok, ps, args.out / f"{name}_records.jsonl", args.max_new_tokens,
                            args.batch_size, args.chunk, seed)
        bad: list[dict[str, Any]] = []
        examples = chat_records_to_examples(tok, records, args.max_length, bad)
        if name != "heldout":  # unique example ids across workers (and sampled copies), so their files load together
            offset = args.start + (int(name[13]) + 1) * 100_000 if name.startswith("train_sampled") else args.start
            examples = [TokenExample(e.example_id + offset, e.input_ids, e.labels) for e in examples]
        write_token_jsonl(args.out / f"{name}_tokens.jsonl", examples)
        write_jsonl(args.out / f"{name}_token_rejects.jsonl", bad)
        summary[name] = {"records": len(records), "examples": len(examples), "rejected": len(bad),
                         "seconds": round(time.perf_counter() - start, 1)}
        text = json.dumps(summary, ensure_ascii=False, indent=1)
        (args.out / f"summary{tag}.json").write_text(text, encoding="utf-8")
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
