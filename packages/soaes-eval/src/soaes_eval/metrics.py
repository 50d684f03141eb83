"""Chinese-aware ROUGE-1/2/L and BLEU-4 on the paper's 0–100 scale, with explicit tokenisation conventions.

Chinese BLEU/ROUGE numbers are only comparable under the same tokenisation and averaging, so every score is
computed under a named *convention* (all n-gram counting is done by the reference libraries):

- ``"llamafactory"`` (default for ``lang="zh"``; the common Chinese-SFT convention, as in LLaMA-Factory's
  ``compute_metrics``): ROUGE-1/2/L F1 from ``rouge_chinese.Rouge`` on jieba-segmented text, per sample, averaged;
  a pair whose prediction or reference segments to nothing scores 0. BLEU-4 is NLTK ``sentence_bleu`` on
  characters (``list(text)``, whitespace included) against the one reference, with
  ``SmoothingFunction().method3``, per sample, averaged.
- ``"jieba"`` (word level): ROUGE F1 from ``rouge_score`` with jieba tokens (whitespace tokens dropped), per
  sample, averaged; BLEU-4 is sacrebleu *corpus* BLEU on jieba tokens joined by spaces (``tokenize="none"``).
- ``"char"`` (character level): tokens from sacrebleu's ``zh`` tokenizer (each CJK character is a token; other
  text is tokenised by ``13a``); ROUGE F1 from ``rouge_score`` on those tokens, per sample, averaged; BLEU-4 is
  sacrebleu corpus BLEU with ``tokenize="zh"``.

``lang="en"`` uses ``rouge_score``'s default tokenizer and sacrebleu corpus BLEU with ``tokenize="13a"``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Any

from soaes_core.errors import DataError, InvalidArgumentError

CONVENTIONS = ("llamafactory", "jieba", "char")
LANGS = ("zh", "en")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")

_log = logging.getLogger(__name__)


@dataclass
class TextMetrics:
    """Scores (0–100) plus everything needed to reproduce them: convention, tokeniser versions, signature."""

    rouge1: float
    rouge2: float
    rougeL: float
    bleu4: float
    num_items: int
    lang: str
    convention: str
    tokenizer: str
    versions: dict[str, str] = field(default_factory=dict)
    sacrebleu_signature: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _convention(lang: str, convention: str) -> str:
    """The convention actually used ("en" for English), after checking both names."""
    if lang not in LANGS:
        raise InvalidArgumentError(f"lang must be one of {LANGS}, got {lang!r}")
    if lang == "en":
        return "en"
    if convention not in CONVENTIONS:
        raise InvalidArgumentError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    return convention


def _check(predictions: Sequence[str], references: Sequence[str], lang: str, convention: str) -> str:
    convention = _convention(lang, convention)
    if isinstance(predictions, str) or isinstance(references, str):
        raise InvalidArgumentError("predictions and references must be lists of strings, not a single string")
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} references; counts must match")
    if len(predictions) == 0:
        raise DataError("no predictions to score (empty list)")
    for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(p, str) or not isinstance(r, str):
            raise DataError(f"item {i}: prediction and reference must be strings, got "
                            f"{type(p).__name__} and {type(r).__name__}")
    return convention


def _jieba_tokens(text: str) -> list[str]:
    import jieba

    return [t for t in jieba.lcut(text) if t.strip()]


def _char_tokens(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    return TokenizerZh()(text).split()


class _ListTokenizer:
    """Adapter giving ``rouge_score`` a tokenizer object (it calls ``.tokenize(text)``)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def tokenize(self, text: str) -> list[str]:
        return self.fn(text)


def _quiet_jieba() -> None:
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()


def _rouge_llamafactory(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    import jieba
    from rouge_chinese import Rouge

    scorer = Rouge()
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        hyp, tgt = " ".join(jieba.cut(pred)), " ".join(jieba.cut(ref))
        if not hyp.split() or not tgt.split():  # LLaMA-Factory: an empty side scores 0
            continue
        s = scorer.get_scores(hyp, tgt)[0]
        totals["rouge1"] += s["rouge-1"]["f"]
        totals["rouge2"] += s["rouge-2"]["f"]
        totals["rougeL"] += s["rouge-l"]["f"]
    return {k: 100.0 * v / len(predictions) for k, v in totals.items()}


def _rouge_score_mean(predictions: Sequence[str], references: Sequence[str], tokenizer: Any) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), tokenizer=tokenizer)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score(ref, pred)  # rouge_score takes (target, prediction)
        for k in ROUGE_KEYS:
            totals[k] += s[k].fmeasure
    return {k: 100.0 * v / len(predictions) for k, v in totals.items()}


def _bleu_llamafactory(predictions: Sequence[str], references: Sequence[str]) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method3
    total = sum(sentence_bleu([list(ref)], list(pred), smoothing_function=smooth)
                for pred, ref in zip(predictions, references, strict=True))
    return 100.0 * total / len(predictions)


def _sacrebleu(predictions: Sequence[str], references: Sequence[str], tokenize: str) -> tuple[float, str]:
    from sacrebleu.metrics import BLEU

    bleu = BLEU(tokenize=tokenize)
    score = bleu.corpus_score(list(predictions), [list(references)])
    return float(score.score), str(bleu.get_signature())


def _pretokenize(texts: Sequence[str], fn: Any) -> list[str]:
    return [" ".join(fn(t)) for t in texts]


def rouge(predictions: Sequence[str], references: Sequence[str], lang: str = "zh",
          convention: str = "llamafactory") -> dict[str, float]:
    """ROUGE-1/2/L F1 (0–100), averaged over pairs, under ``convention`` (see module docstring)."""
    convention = _check(predictions, references, lang, convention)
    if convention == "llamafactory":
        _quiet_jieba()
        return _rouge_llamafactory(predictions, references)
    if convention == "jieba":
        _quiet_jieba()
        return _rouge_score_mean(predictions, references, _ListTokenizer(_jieba_tokens))
    if convention == "char":
        return _rouge_score_mean(predictions, references, _ListTokenizer(_char_tokens))
    return _rouge_score_mean(predictions, references, None)


def bleu4_with_signature(predictions: Sequence[str], references: Sequence[str], lang: str = "zh",
                         convention: str = "llamafactory") -> tuple[float, str | None]:
    """BLEU-4 (0–100) under ``convention`` and the sacrebleu signature (None for the NLTK convention)."""
    convention = _check(predictions, references, lang, convention)
    if convention == "llamafactory":
        return _bleu_llamafactory(predictions, references), None
    if convention == "jieba":
        _quiet_jieba()
        return _sacrebleu(_pretokenize(predictions, _jieba_tokens), _pretokenize(references, _jieba_tokens), "none")
    if convention == "char":
        return _sacrebleu(predictions, references, "zh")
    return _sacrebleu(predictions, references, "13a")


def bleu4(predictions: Sequence[str], references: Sequence[str], lang: str = "zh",
          convention: str = "llamafactory") -> float:
    """BLEU-4 (0–100) under ``convention`` (see module docstring)."""
    return bleu4_with_signature(predictions, references, lang, convention)[0]


def tokenizer_description(lang: str, convention: str) -> tuple[str, dict[str, str]]:
    """Human-readable tokeniser name and the versions of the libraries that define the scores."""
    libs = {"rouge_chinese": "rouge-chinese", "rouge_score": "rouge-score", "nltk": "nltk",
            "sacrebleu": "sacrebleu", "jieba": "jieba"}
    used = {
        "llamafactory": ("jieba (ROUGE, rouge-chinese) / characters (BLEU, nltk method3)",
                         ["jieba", "rouge_chinese", "nltk"]),
        "jieba": ("jieba words (rouge-score, sacrebleu tokenize=none)", ["jieba", "rouge_score", "sacrebleu"]),
        "char": ("sacrebleu zh characters (rouge-score, sacrebleu tokenize=zh)", ["rouge_score", "sacrebleu"]),
        "en": ("rouge-score default / sacrebleu 13a", ["rouge_score", "sacrebleu"]),
    }["en" if lang == "en" else convention]
    return used[0], {libs[m]: version(libs[m]) for m in used[1]}


def score_provenance(lang: str = "zh", convention: str = "llamafactory") -> dict[str, Any]:
    """How scores under `convention` are made (tokeniser, library versions, sacrebleu signature), without scoring:
    for scores aggregated elsewhere (the lm-eval domain tasks) that must still say how they were computed."""
    conv = _convention(lang, convention)
    tok, versions = tokenizer_description(lang, conv)
    signature = None
    if conv != "llamafactory":  # sacrebleu's signature describes settings (one reference per item here) only
        signature = bleu4_with_signature(["."], ["."], lang, conv)[1]
    return {"lang": lang, "convention": conv, "tokenizer": tok, "versions": versions,
            "sacrebleu_signature": signature}


def text_metrics(predictions: Sequence[str], references: Sequence[str], lang: str = "zh",
                 convention: str = "llamafactory") -> TextMetrics:
    """All four scores with the provenance that makes them comparable (convention, tokeniser, signature)."""
    conv = _check(predictions, references, lang, convention)
    scores = rouge(predictions, references, lang, convention)
    b, signature = bleu4_with_signature(predictions, references, lang, convention)
    tok, versions = tokenizer_description(lang, conv)
    return TextMetrics(rouge1=scores["rouge1"], rouge2=scores["rouge2"], rougeL=scores["rougeL"], bleu4=b,
                       num_items=len(predictions), lang=lang, convention=conv, tokenizer=tok, versions=versions,
                       sacrebleu_signature=signature)
