"""Generate a synthetic Chinese corpus for curation throughput benchmarks (≥100k documents).

Documents are 4-12 sentences drawn from the shipped sample corpus with ~20% of characters substituted, so
they are distinct but realistic in length and character mix; 3% are planted exact duplicates, 3% near
duplicates (a few characters edited), 2% English, 1% junk. Deterministic for a seed.

    python benchmarks/data/make_synthetic_corpus.py --docs 100000 --out /tmp/synth_corpus.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import make_samples


def sentence_pool() -> list[str]:
    texts = [t for _, t in make_samples.DOMAIN_DOCS + make_samples.DISTRACTORS[:-2]]
    texts += [a for _, _, a in make_samples.DIALOG_POOL + make_samples.EXPERT_POOL]
    return [s + "。" for t in texts for s in re.split(r"[。！？\n]", t) if len(s) >= 8]


def make_corpus(n_docs: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pool = sentence_pool()
    chars = sorted({c for s in pool for c in s if "\u4e00" <= c <= "\u9fff"})
    docs: list[dict] = []
    for k in range(n_docs):
        r = rng.random()
        if docs and r < 0.03:
            text = rng.choice(docs)["text"]
            kind = "exact_dup"
        elif docs and r < 0.06:
            src = list(rng.choice(docs)["text"])
            for _ in range(2):
                src[rng.randrange(len(src))] = rng.choice(chars)
            text, kind = "".join(src), "near_dup"
        elif r < 0.08:
            text = " ".join(rng.choice(["The", "board", "approved", "the", "annual", "budget", "report", "for",
                                        "state", "assets", "and", "enterprise", "reform"]) for _ in range(80))
            kind = "english"
        elif r < 0.09:
            text = "".join(rng.choice("#@!*-=~0123456789") for _ in range(200))
            kind = "junk"
        else:
            sents = []
            for _ in range(rng.randint(4, 12)):
                s = list(rng.choice(pool))
                for i in range(len(s)):
                    if rng.random() < 0.2 and "\u4e00" <= s[i] <= "\u9fff":
                        s[i] = rng.choice(chars)
                sents.append("".join(s))
            text = "\n".join(sents) if rng.random() < 0.3 else "".join(sents)
            kind = "doc"
        docs.append({"id": f"syn-{k:07d}", "text": text, "kind": kind})
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    docs = make_corpus(args.docs, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"wrote {len(docs)} documents, {args.out.stat().st_size / 1e6:.1f} MB to {args.out}")


if __name__ == "__main__":
    main()
