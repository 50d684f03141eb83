"""lm-eval hooks for the domain generation tasks: data loading and ROUGE/BLEU aggregation via soaes_eval.metrics."""

from __future__ import annotations

from typing import Any

from soaes_eval.metrics import bleu4, rouge
from soaes_eval.tasks.loaders import load_domain, load_domain_heldout

__all__ = ["load_domain", "load_domain_heldout", "process_results", "agg_rouge1", "agg_rouge2", "agg_rougeL",
           "agg_bleu4", "agg_bleu4_corpus_zh", "agg_rouge1_char", "agg_rouge2_char", "agg_rougeL_char"]

# rouge*/bleu4: the llamafactory convention; *_char and bleu4_corpus_zh: the char convention (soaes_eval.metrics)
METRICS = ("rouge1", "rouge2", "rougeL", "bleu4", "bleu4_corpus_zh", "rouge1_char", "rouge2_char", "rougeL_char")


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, tuple[str, str]]:
    """Keep (prediction, reference) per item; scores are computed over the whole set in the aggregations."""
    pair = (results[0].strip(), doc["reference"])
    return dict.fromkeys(METRICS, pair)


def _split(items: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    return [p for p, _ in items], [r for _, r in items]


def agg_rouge1(items: list[tuple[str, str]]) -> float:
    return rouge(*_split(items))["rouge1"]


def agg_rouge2(items: list[tuple[str, str]]) -> float:
    return rouge(*_split(items))["rouge2"]


def agg_rougeL(items: list[tuple[str, str]]) -> float:
    return rouge(*_split(items))["rougeL"]


def agg_bleu4(items: list[tuple[str, str]]) -> float:
    return bleu4(*_split(items))


def agg_bleu4_corpus_zh(items: list[tuple[str, str]]) -> float:
    return bleu4(*_split(items), convention="char")


def agg_rouge1_char(items: list[tuple[str, str]]) -> float:
    return rouge(*_split(items), convention="char")["rouge1"]


def agg_rouge2_char(items: list[tuple[str, str]]) -> float:
    return rouge(*_split(items), convention="char")["rouge2"]


def agg_rougeL_char(items: list[tuple[str, str]]) -> float:
    return rouge(*_split(items), convention="char")["rougeL"]
