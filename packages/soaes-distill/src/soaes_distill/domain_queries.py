"""Domain queries from a small corpus, for draft training at scale: question templates filled with domain
terms (jieba keyword extraction) plus instruction prompts over corpus passages, deduplicated and
decontaminated against held-out prompts, every dropped query accounted for with a reason.

A small target writes poor questions itself (Magpie), so the queries come from the domain's own vocabulary;
the target then answers them (black-box SFT / KD data) as for any other prompt set.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from soaes_core.errors import InvalidArgumentError

# One slot ({a}) or two ({a}, {b}); written in the style of expert-pool questions.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "什么是{a}？", "{a}的主要职责是什么？", "{a}有哪些要求？", "{a}包括哪些内容？", "如何理解{a}？",
    "请简要介绍{a}。", "{a}应当遵循哪些原则？", "{a}的目的是什么？", "{a}有什么作用？", "为什么要加强{a}？",
    "{a}存在哪些问题？", "如何做好{a}工作？", "{a}需要注意什么？", "{a}的主要方式有哪些？",
    "在什么情况下需要进行{a}？", "{a}由谁负责？", "{a}的程序是什么？", "{a}的重点是什么？",
    "请解释{a}的含义。", "{a}有哪些主要指标？", "企业应当如何落实{a}？", "{a}对企业有什么影响？",
    "{a}和{b}有什么区别？", "{a}与{b}之间是什么关系？", "{a}对{b}有什么要求？", "如何通过{a}推动{b}？",
    "{a}在{b}中发挥什么作用？", "{a}和{b}分别由谁负责？",
)
PASSAGE_INSTRUCTIONS: tuple[str, ...] = (
    "请用两三句话概括下面的内容：\n", "请解释下面这段话的主要意思：\n", "根据下面的内容，列出其中的要点：\n",
    "下面这段话讲了什么？\n",
)
_TERM_POS = ("n", "nz", "vn", "nt", "l", "i")


@dataclass
class DomainQueryConfig:
    """How many queries to make and from what: `num_terms` keywords, `max_queries` template fills (pairs are
    sampled), passages of `passage_chars` characters every `passage_stride`; `decontam_ngram`-character
    overlap with a held-out prompt drops a query."""

    num_terms: int = 200
    max_queries: int = 6000
    passage_chars: int = 120
    passage_stride: int = 40
    decontam_ngram: int = 8
    seed: int = 0
    templates: Sequence[str] = field(default_factory=lambda: DEFAULT_TEMPLATES)

    def __post_init__(self) -> None:
        if self.num_terms < 1 or self.max_queries < 1:
            raise InvalidArgumentError("num_terms and max_queries must be ≥ 1")
        if self.decontam_ngram < 5:
            raise InvalidArgumentError(f"decontam_ngram must be ≥ 5, got {self.decontam_ngram}")
        for t in self.templates:
            if "{a}" not in t:
                raise InvalidArgumentError(f"template {t!r} has no {{a}} slot")


def domain_terms(texts: Iterable[str], top_k: int = 200) -> list[str]:
    """The `top_k` domain keywords of `texts` by jieba TF-IDF (nouns, named and idiomatic phrases), ≥ 2 chars."""
    import jieba
    import jieba.analyse

    jieba.setLogLevel(60)
    joined = "\n".join(texts)
    tags = jieba.analyse.extract_tags(joined, topK=top_k * 2, allowPOS=_TERM_POS)
    return [t for t in tags if len(t) >= 2 and not re.fullmatch(r"[\W\d_]+", t)][:top_k]


def template_queries(terms: Sequence[str], templates: Sequence[str], max_queries: int, seed: int = 0) -> list[str]:
    """Every one-slot fill, then random distinct pairs for two-slot templates, up to `max_queries` in all."""
    if not terms:
        raise InvalidArgumentError("no domain terms to fill the templates with")
    rng = random.Random(seed)
    single = [t for t in templates if "{b}" not in t]
    double = [t for t in templates if "{b}" in t]
    out = [t.format(a=a) for a in terms for t in single]
    rng.shuffle(out)
    out = out[:max_queries]
    seen = set(out)
    tries = 0
    while double and len(terms) > 1 and len(out) < max_queries and tries < 20 * max_queries:
        tries += 1
        a, b = rng.sample(list(terms), 2)
        q = rng.choice(double).format(a=a, b=b)
        if q not in seen:
            seen.add(q)
            out.append(q)
    return out


def passage_prompts(texts: Iterable[str], chars: int, stride: int,
                    instructions: Sequence[str] = PASSAGE_INSTRUCTIONS) -> list[str]:
    """Instruction + passage prompts over sliding character windows of each text (instructions rotate)."""
    out: list[str] = []
    for text in texts:
        text = re.sub(r"\s+", "", text)
        starts = range(0, max(1, len(text) - chars + stride), stride)
        for s in starts:
            out.append(instructions[len(out) % len(instructions)] + text[s:s + chars])
    return out


@dataclass
class DomainQueries:
    """Kept prompts (`{id, prompt, source}`), rejects (`{index, prompt, reason}`) and the terms used."""

    prompts: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    terms: list[str]


def held_out_matcher(held_out: Sequence[str], ngram: int) -> Callable[[str], int | None]:
    """A function giving the index of the held-out prompt a text equals (stripped) or shares an `ngram`-character
    span with, else None: the one contamination rule for generated and given training prompts."""
    from soaes_data.decontam import char_ngrams

    grams: dict[str, int] = {}
    for k, h in enumerate(held_out):
        for g in char_ngrams(h, ngram):
            grams.setdefault(g, k)
    exact = {h.strip(): k for k, h in enumerate(held_out)}

    def match(text: str) -> int | None:
        hit = exact.get(text.strip())
        return hit if hit is not None else next((grams[g] for g in char_ngrams(text, ngram) if g in grams), None)

    return match


def build_domain_queries(texts: Sequence[str], held_out: Sequence[str], cfg: DomainQueryConfig) -> DomainQueries:
    """Template and passage prompts from `texts`; exact duplicates, held-out prompts and queries sharing a
    `decontam_ngram`-character span with one go to `rejects` with the reason."""
    terms = domain_terms(texts, cfg.num_terms)
    candidates = template_queries(terms, cfg.templates, cfg.max_queries, cfg.seed)
    candidates += passage_prompts(texts, cfg.passage_chars, cfg.passage_stride)
    held_out_index = held_out_matcher(held_out, cfg.decontam_ngram)
    prompts: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, q in enumerate(candidates):
        hit = held_out_index(q)
        if q in seen:
            rejects.append({"index": i, "prompt": q, "reason": "exact duplicate"})
        elif hit is not None:
            rejects.append({"index": i, "prompt": q, "reason": f"overlaps held-out prompt {hit}"})
        else:
            seen.add(q)
            prompts.append({"id": f"domain-{len(prompts):05d}", "prompt": q, "source": "domain-template"})
    return DomainQueries(prompts, rejects, terms)
