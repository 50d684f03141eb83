"""Metrics equal the reference libraries under each convention, and match hand-computed values."""

from __future__ import annotations

import math

import jieba
import pytest
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge
from rouge_score import rouge_scorer

from soaes_core.errors import DataError, InvalidArgumentError
from soaes_eval.metrics import CONVENTIONS, bleu4, rouge, text_metrics

# Varied pairs: mixed zh/en/digits, punctuation, empty sides, identical, disjoint, long.
PAIRS = [
    ("国有资产监督管理委员会负责监管中央企业。", "国资委负责监管中央企业的国有资产。"),
    ("2023年GDP增长了5.2%，超出预期！", "2023年国内生产总值增长5.2%。"),
    ("混合所有制改革 (mixed ownership reform) 正在推进", "混合所有制改革正在稳步推进"),
    ("", "参考答案不为空"),
    ("预测不为空", ""),
    ("", ""),
    ("完全相同的句子，一字不差。", "完全相同的句子，一字不差。"),
    ("abc def", "甲乙丙丁"),
    ("《企业国有资产法》第十二条规定：履行出资人职责的机构……",
     "根据《企业国有资产法》，履行出资人职责的机构代表本级政府。"),
    ("资产负债率=负债总额/资产总额×100%", "资产负债率等于负债总额除以资产总额"),
    ("国企改革三年行动方案" * 20, "国企改革三年行动" * 25),
]
PREDS = [p for p, _ in PAIRS]
REFS = [r for _, r in PAIRS]


def _llamafactory_reference(preds: list[str], refs: list[str]) -> dict[str, float]:
    """LLaMA-Factory's compute_metrics (scripts/eval_bleu_rouge.py), written straight on the libraries."""
    scores: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": [], "bleu4": []}
    for pred, label in zip(preds, refs, strict=True):
        hypothesis, reference = list(jieba.cut(pred)), list(jieba.cut(label))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(" ".join(hypothesis), " ".join(reference))[0]
        scores["rouge1"].append(result["rouge-1"]["f"] * 100)
        scores["rouge2"].append(result["rouge-2"]["f"] * 100)
        scores["rougeL"].append(result["rouge-l"]["f"] * 100)
        scores["bleu4"].append(bleu * 100)
    return {k: sum(v) / len(v) for k, v in scores.items()}


class _Tok:
    def __init__(self, fn):
        self.tokenize = fn


def _rouge_score_reference(preds: list[str], refs: list[str], tokenize) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Tok(tokenize))
    out = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(preds, refs, strict=True):
        s = scorer.score(r, p)
        for k in out:
            out[k] += s[k].fmeasure * 100 / len(preds)
    return out


def test_llamafactory_convention_equals_reference() -> None:
    ref = _llamafactory_reference(PREDS, REFS)
    got = rouge(PREDS, REFS, convention="llamafactory")
    for k in ("rouge1", "rouge2", "rougeL"):
        assert got[k] == pytest.approx(ref[k], abs=1e-9)
    assert bleu4(PREDS, REFS) == pytest.approx(ref["bleu4"], abs=1e-9)  # default convention


def test_jieba_convention_equals_reference() -> None:
    def words(t: str) -> list[str]:
        return [w for w in jieba.lcut(t) if w.strip()]

    ref = _rouge_score_reference(PREDS, REFS, words)
    got = rouge(PREDS, REFS, convention="jieba")
    assert got == pytest.approx(ref, abs=1e-9)
    seg = lambda xs: [" ".join(words(x)) for x in xs]  # noqa: E731
    expect = sacrebleu.corpus_bleu(seg(PREDS), [seg(REFS)], tokenize="none").score
    assert bleu4(PREDS, REFS, convention="jieba") == pytest.approx(expect, abs=1e-9)


def test_char_convention_equals_reference() -> None:
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    ref = _rouge_score_reference(PREDS, REFS, lambda t: TokenizerZh()(t).split())
    assert rouge(PREDS, REFS, convention="char") == pytest.approx(ref, abs=1e-9)
    expect = sacrebleu.corpus_bleu(PREDS, [REFS], tokenize="zh").score
    assert bleu4(PREDS, REFS, convention="char") == pytest.approx(expect, abs=1e-9)


def test_hand_computed_values() -> None:
    # 我爱北京 vs 我爱上海, characters: unigram P=R=2/4, bigram 1/3 (我爱), LCS 2 (我爱).
    r = rouge(["我爱北京"], ["我爱上海"], convention="char")
    assert r == pytest.approx({"rouge1": 50.0, "rouge2": 100 / 3, "rougeL": 50.0})
    # BLEU-4 with method3 / exp smoothing: p = 2/4, 1/3, then zero counts -> 1/(2*2), 1/(4*1); BP = 1.
    hand = 100 * math.exp((math.log(1 / 2) + math.log(1 / 3) + math.log(1 / 4) + math.log(1 / 4)) / 4)
    assert hand == pytest.approx(31.9471, abs=1e-4)
    assert bleu4(["我爱北京"], ["我爱上海"], convention="llamafactory") == pytest.approx(hand)
    assert bleu4(["我爱北京"], ["我爱上海"], convention="char") == pytest.approx(hand)
    for conv in CONVENTIONS:  # identical -> 100, disjoint -> 0 ROUGE
        same = "国有企业深化改革，推动高质量发展，完善现代企业制度。"
        assert rouge([same], [same], convention=conv) == pytest.approx(dict.fromkeys(("rouge1", "rouge2", "rougeL"),
                                                                                      100.0))
        assert bleu4([same], [same], convention=conv) == pytest.approx(100.0)
        assert rouge(["甲乙丙"], ["丁戊己"], convention=conv)["rouge1"] == 0.0
    # LLaMA-Factory: an empty side scores 0 ROUGE (and 0 BLEU), and still counts in the average.
    assert rouge(["", "相同"], ["参考", "相同"])["rouge1"] == pytest.approx(50.0)
    assert bleu4([""], ["参考"]) == 0.0


def test_text_metrics_records_provenance() -> None:
    m = text_metrics(PREDS, REFS, convention="char")
    assert m.num_items == len(PREDS)
    assert m.sacrebleu_signature is not None and "tok:zh" in m.sacrebleu_signature
    assert set(m.versions) == {"rouge-score", "sacrebleu"}
    lf = text_metrics(PREDS, REFS)
    assert lf.convention == "llamafactory" and lf.sacrebleu_signature is None and "jieba" in lf.versions
    assert text_metrics(["the cat sat"], ["the cat sat"], lang="en").rouge1 == pytest.approx(100.0)


def test_bad_input() -> None:
    with pytest.raises(DataError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(DataError, match="no predictions"):
        bleu4([], [])
    with pytest.raises(InvalidArgumentError, match="convention"):
        rouge(["a"], ["a"], convention="bpe")
    with pytest.raises(InvalidArgumentError, match="lang"):
        bleu4(["a"], ["a"], lang="fr")
    with pytest.raises(DataError, match="item 0"):
        rouge([None], ["a"])  # type: ignore[list-item]
