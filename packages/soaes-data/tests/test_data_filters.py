"""Filters: language id, PII masking, length, quality, lexicon relevance + classifier hook, categories."""

from __future__ import annotations

import json
from pathlib import Path

import make_samples
import pytest

from soaes_core.errors import ConfigError, DataError
from soaes_data.filters import (
    CategoryConfig,
    LengthConfig,
    RelevanceConfig,
    check_category,
    check_length,
    check_quality,
    detect_language,
    lexicon_relevance,
    load_lexicon,
    luhn_valid,
    mask_pii,
    relevance_scorer,
    valid_id_card,
)
from soaes_data.samples import sample_path


def test_language() -> None:
    assert detect_language("国有资产监督管理委员会") == "zh"
    assert detect_language("State-owned assets supervision") == "en"
    assert detect_language("12345 !!! ###") == "other"


def test_pii_masking() -> None:
    text, counts = mask_pii(make_samples.PII_DOC[1])
    for raw in ("13812345678", "zhang.san@example.com", "6222020200112233446", "110101199003074573"):
        assert raw not in text
    assert dict(counts) == {"EMAIL": 1, "ID_CARD": 1, "BANK_CARD": 1, "PHONE": 1}
    assert "[ID_CARD]" in text and "[BANK_CARD]" in text
    # numbers failing their checksums are not masked as ID/bank cards
    kept, c = mask_pii("编号110101199003074578，流水号6222020200112233445")
    assert "110101199003074578" in kept and "6222020200112233445" in kept and not c
    assert valid_id_card("11010519491231002X") and luhn_valid("4111111111111111")


def test_length_and_quality() -> None:
    assert check_length("短", LengthConfig(min_chars=5)) == "too_short:<5"
    assert check_length("长" * 11, LengthConfig(min_chars=1, max_chars=10)) == "too_long:>10"
    assert check_quality(make_samples.DOMAIN_DOCS[0][1]) is None
    assert check_quality(make_samples.DISTRACTORS[-1][1]) is not None
    assert check_quality("国资委监管。\n" * 10) == "quality:duplicate_lines"
    with pytest.raises(ValueError):
        LengthConfig(min_chars=10, max_chars=5)


def test_relevance_orders_domain_above_distractors() -> None:
    score = relevance_scorer()
    domain = [score(t) for _, t in make_samples.DOMAIN_DOCS]
    other = [score(t) for _, t in make_samples.DISTRACTORS]
    assert min(domain) > 0.3 and max(other) == 0.0  # recipe threshold is 0.2
    lex = load_lexicon()
    # longest term first: 国有资本投资运营公司 counts once (weight 3), not also as 国有资本
    assert lexicon_relevance("国有资本投资运营公司", lex) == pytest.approx(1 - 2.718281828 ** (-0.3), rel=1e-6)


def test_custom_lexicon_and_classifier(tmp_path: Path) -> None:
    lex = tmp_path / "lex.tsv"
    lex.write_text("# my terms\n红烧肉\t5\n", encoding="utf-8")
    score = relevance_scorer(RelevanceConfig(lexicon=str(lex)))
    assert score(make_samples.DISTRACTORS[0][1]) > 0.3
    bad = tmp_path / "bad.tsv"
    bad.write_text("词\tabc\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.tsv:1"):
        relevance_scorer(RelevanceConfig(lexicon=str(bad)))
    clf = relevance_scorer(RelevanceConfig(classifier="soaes_data.filters:cjk_ratio"))
    assert clf("国资") == 1.0
    with pytest.raises(ConfigError):
        relevance_scorer(RelevanceConfig(classifier="no_such_module:f"))


def test_category_filter_paper_defaults() -> None:
    recs = [json.loads(x) for x in sample_path("sft/dialog_pool.jsonl").read_text(encoding="utf-8").splitlines()]
    kept = {r["category"] for r in recs if check_category(r) is None}
    assert kept == {"finance", "law", "business", "politics"}
    assert check_category({"label": {"cate_ability_en": ["mathematical reasoning"]}}) .startswith("category:excluded")
    assert check_category({"x": 1}) == "category:missing"
    assert check_category({"category": "code"}, CategoryConfig(include=[], exclude=[])) is None


def test_language_detector_hook() -> None:
    from soaes_data.filters import LanguageConfig, check_language

    cfg = LanguageConfig(keep=["zh"], detector="soaes_data.filters:detect_language")
    assert check_language("国有资产", cfg) is None and check_language("assets", cfg) == "language:en"
    with pytest.raises(ConfigError):
        check_language("x", LanguageConfig(detector="nope"))
