"""Build the held-out domain Q&A split (soaes-eval task `soaes_domain_qa_heldout`) from the held-out passages.

`python scripts/make_domain_eval.py` writes `qa.jsonl`, `passages.jsonl`, `checks.json` and `README.md` into
`packages/soaes-eval/src/soaes_eval/samples/domain_qa_heldout/` (committed); `--check` rebuilds in memory and
fails if the committed files differ. No network, no model: the items are the hand-written questions of
`domain_eval_passages.py`, each answered by one sentence of its passage (given in the prompt: open-book), and an
item is dropped when it repeats any text the pipeline trains on (exact, after normalisation) or shares a
`NGRAM`-character n-gram with it (soaes_data.decontam, the curation stage's decontaminator). The training texts
are every shipped set the pipeline trains a model on: the sample corpus (CPT), both SFT pools (stage 1 and 2,
and the teacher prompts drawn from them), the domain queries made from the corpus (every template fill of its
keywords and every passage window), and the distillation held-out prompts and existing domain samples.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "packages" / "soaes-eval" / "src" / "soaes_eval" / "samples" / "domain_qa_heldout"
NGRAM = 8  # the pipeline's held-out prompt rule (teacher_data.decontam_ngram); stricter than curation's 13
MIN_ITEMS = 200
INSTRUCTION = "阅读下面的材料，回答问题。"
FILES = ("qa.jsonl", "passages.jsonl", "checks.json", "README.md")


def load_passages() -> list[tuple[str, list[tuple[str, str]]]]:
    """The hand-written passages (scripts/domain_eval_passages.py), loaded by path: scripts/ is not a package."""
    path = Path(__file__).resolve().parent / "domain_eval_passages.py"
    spec = importlib.util.spec_from_file_location("domain_eval_passages", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.PASSAGES)


def make_prompt(passage: str, question: str) -> str:
    """The open-book prompt: instruction, the passage, the question (the task appends "回答：")."""
    return f"{INSTRUCTION}\n材料：{passage}\n问题：{question}"


def candidates() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(passages, items) before decontamination; an item's reference is a sentence of its passage."""
    passages, items = [], []
    for p, (title, pairs) in enumerate(load_passages()):
        pid = f"p{p:03d}"
        text = "".join(answer for _, answer in pairs)
        passages.append({"passage_id": pid, "title": title, "text": text})
        for k, (question, answer) in enumerate(pairs):
            items.append({"id": f"dqh-{p:03d}-{k}", "prompt": make_prompt(text, question), "reference": answer,
                          "question": question, "passage_id": pid})
    return passages, items


def _strings(obj: Any) -> Iterator[str]:
    from soaes_data.decontam import strings_in

    yield from (s for s in strings_in(obj) if s.strip())


def training_sets() -> dict[str, list[str]]:
    """Name → texts of every shipped set a pipeline recipe trains on (or holds out for distillation)."""
    from soaes_core import read_jsonl
    from soaes_data.readers import read_document
    from soaes_data.samples import sample_dir
    from soaes_distill.domain_queries import DEFAULT_TEMPLATES, domain_terms, passage_prompts, template_queries
    from soaes_eval.tasks.loaders import SAMPLES_DIR

    samples = sample_dir()
    corpus: list[str] = []
    for f in sorted((samples / "corpus").iterdir()):
        if f.suffix == ".jsonl":
            corpus += [t for rec in read_jsonl(f) for t in _strings(rec.get("text"))]
        else:
            corpus.append(read_document(f).text)
    articles = [rec["text"] for rec in read_jsonl(samples / "corpus" / "articles.jsonl")]
    single = [t for t in DEFAULT_TEMPLATES if "{b}" not in t]
    terms = domain_terms(articles, 200)  # the shipped recipes' num_terms
    # every one-slot fill (a superset of any recipe's max_queries cut), then the recipes' two-slot pairs
    queries = template_queries(terms, DEFAULT_TEMPLATES, len(terms) * len(single) + 2400, seed=0)
    queries += passage_prompts(articles, 120, 40)
    distill_data = Path(importlib.util.find_spec("soaes_distill").origin).parent / "data"  # type: ignore[arg-type]
    return {
        "cpt_corpus": corpus,
        "sft_stage1": [t for rec in read_jsonl(samples / "sft" / "dialog_pool.jsonl") for t in _strings(rec)],
        "sft_stage2": [t for rec in read_jsonl(samples / "sft" / "expert_pool.jsonl") for t in _strings(rec)],
        "teacher_domain_queries": queries,
        "distill_heldout_prompts": [t for rec in read_jsonl(distill_data / "heldout_domain_prompts.jsonl")
                                    for t in _strings(rec)],
        "eval_domain_samples": [t for name in ("qa.jsonl", "report.jsonl")
                                for rec in read_jsonl(SAMPLES_DIR / "domain" / name) for t in _strings(rec)],
    }


def contamination(items: list[dict[str, Any]], sets: dict[str, list[str]], n: int = NGRAM) -> dict[int, list[str]]:
    """Item index → why it is contaminated ("<set>: exact" / "<set>: <n>-gram 'xxx'"), over every training text.

    The training texts are indexed (soaes_data.decontam.NgramIndex, one file per set) and each item's prompt,
    question and reference looked up, so every item is checked on its own; a question or reference equal to a
    training text (normalised) counts too."""
    from soaes_data.decontam import NgramIndex
    from soaes_data.dedup import normalise_for_dedup

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name, texts in sets.items():
            files.append(Path(tmp) / f"{name}.jsonl")
            files[-1].write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                 encoding="utf-8")
        index = NgramIndex(files, n)
    exact = {normalise_for_dedup(t): name for name, texts in sets.items() for t in texts}
    found: dict[int, list[str]] = {}
    for i, it in enumerate(items):
        for key in ("prompt", "question", "reference"):
            for o in index.overlaps(it[key]):
                found.setdefault(i, []).append(f"{Path(o.eval_file).stem}: {n}-gram {o.example!r}")
            if key != "prompt" and normalise_for_dedup(it[key]) in exact:
                found.setdefault(i, []).append(f"{exact[normalise_for_dedup(it[key])]}: exact")
    return found


def internal_duplicates(items: list[dict[str, Any]]) -> dict[int, str]:
    """Item index → the earlier item it repeats (same normalised question or reference)."""
    from soaes_data.dedup import normalise_for_dedup

    seen: dict[str, str] = {}
    dup = {}
    for i, it in enumerate(items):
        for key in ("question", "reference"):
            norm = normalise_for_dedup(it[key])
            if norm in seen and seen[norm] != it["id"]:
                dup[i] = f"same {key} as {seen[norm]}"
            seen.setdefault(norm, it["id"])
    return dup


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


README = """# Held-out domain Q&A split (`soaes_domain_qa_heldout`)

Written for this project: illustrative text on state-owned asset supervision, not real regulatory text and not
SOAEs-DataSuite. Generated by `python scripts/make_domain_eval.py` (deterministic, no network, no model; the
passages and questions are in `scripts/domain_eval_passages.py`); `--check` verifies these files are what it makes.

- `passages.jsonl`: {passages} held-out passages `{{"passage_id", "title", "text"}}`, on topics and in wording
  kept apart from the sample corpus and SFT pools.
- `qa.jsonl`: {items} items `{{"id", "prompt", "reference", "question", "passage_id"}}`. The prompt is open-book
  (instruction, `材料：` the passage, `问题：` the question); the reference is the passage sentence that answers the
  question, verbatim (every reference is a span of its passage).
- `checks.json`: the checks below, per training set, and the sha256 of `qa.jsonl`.

Checks ({candidates} candidates, {dropped} dropped, {items} kept):
- Exact: no question or reference equals (after NFKC, lower-casing, dropping spaces and punctuation) any text of
  a training set, and no two items share a question or a reference.
- n-gram: no item (prompt, question or reference) shares any n-gram of {ngram} characters with any training text
  (the pipeline's rule for held-out prompts; stricter than the curation stage's 13), checked with
  `soaes_data.decontam.NgramIndex` (the curation stage's decontaminator).
- Training sets checked ({texts} texts): {sets}.
  The teacher's domain queries are every template fill of the corpus's 200 keywords plus two-slot pairs and
  every 120-character passage window (a superset of the shipped recipes' `teacher_data.domain_queries`). Texts
  generated at run time by a model (teacher answers, Magpie prompts) cannot be checked here.

Use it in a pipeline recipe with `eval: {{domain_task: soaes_domain_qa_heldout}}` (Tables 2 and 3), or
`soaes-eval run --tasks soaes_domain_qa_heldout`. The task reads this folder; no data directory is needed.
"""


def build() -> dict[str, str]:
    """File name → the exact content of each committed file."""
    passages, items = candidates()
    sets = training_sets()
    bad = contamination(items, sets)
    dups = internal_duplicates(items)
    dropped = [{"id": it["id"], "reasons": sorted(set(bad.get(i, [])))[:3] + ([dups[i]] if i in dups else [])}
               for i, it in enumerate(items) if i in bad or i in dups]
    kept = [it for i, it in enumerate(items) if i not in bad and i not in dups]
    used = {it["passage_id"] for it in kept}
    passages = [p for p in passages if p["passage_id"] in used]
    if len(kept) < MIN_ITEMS:
        raise SystemExit(f"only {len(kept)} items survive (need {MIN_ITEMS}); dropped: {dropped}")
    qa = _jsonl(kept)
    checks = {
        "items": len(kept), "passages": len(passages), "candidates": len(items), "ngram": NGRAM,
        "training_sets": {name: len(texts) for name, texts in sets.items()},
        "dropped": dropped, "qa_sha256": hashlib.sha256(qa.encode("utf-8")).hexdigest(),
    }
    readme = README.format(passages=len(passages), items=len(kept), candidates=len(items), dropped=len(dropped),
                           ngram=NGRAM, texts=sum(len(t) for t in sets.values()),
                           sets=", ".join(f"`{k}` ({len(v)})" for k, v in sets.items()))
    return {"qa.jsonl": qa, "passages.jsonl": _jsonl(passages),
            "checks.json": json.dumps(checks, ensure_ascii=False, indent=1) + "\n", "README.md": readme}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="Fail if the committed files differ from a rebuild.")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        stale = [n for n, text in files.items() if not (OUT_DIR / n).is_file()
                 or (OUT_DIR / n).read_text(encoding="utf-8") != text]
        if stale:
            print(f"error: {', '.join(stale)} in {OUT_DIR} differ from a rebuild; run scripts/make_domain_eval.py",
                  file=sys.stderr)
            return 1
        print(f"ok: {OUT_DIR} matches a rebuild")
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT_DIR / name).write_text(text, encoding="utf-8")
    checks = json.loads(files["checks.json"])
    print(f"wrote {OUT_DIR}: {checks['items']} items from {checks['passages']} passages "
          f"({len(checks['dropped'])} of {checks['candidates']} dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
