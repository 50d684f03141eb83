"""Cleaning: NFKC keeping Chinese punctuation, control chars, whitespace, headers/footers, t2s."""

from __future__ import annotations

import make_samples
import pytest

from soaes_data.cleaning import CleanConfig, clean_text, nfkc_keep_chinese_punctuation, remove_repeated_lines
from soaes_data.readers import read_document
from soaes_data.samples import sample_path


def test_nfkc_keeps_chinese_punctuation() -> None:
    assert nfkc_keep_chinese_punctuation("ＡＢＣ１２３，（国资）！") == "ABC123，（国资）！"
    assert nfkc_keep_chinese_punctuation("ｅｘａｍｐｌｅ＠ｍａｉｌ．ｃｏｍ") == "example@mail.com"


def test_control_whitespace() -> None:
    raw = "国 有  资产\u200b监管\x07\r\n\r\n\r\n\r\n  第二段\t\tEnd  here  \ufeff"
    assert clean_text(raw) == "国有资产监管\n\n第二段 End here"


def test_pdf_headers_and_page_numbers_removed() -> None:
    text = clean_text(read_document(sample_path("corpus/briefing.pdf")).text)
    assert make_samples.PDF_HEADER not in text and "第 1 页" not in text
    assert make_samples.KNOWN_PDF in text


def test_repeated_lines_threshold() -> None:
    text = "页眉\n正文一\n页眉\n正文二\n页眉\n- 3 -\nPage 2 of 9"
    assert remove_repeated_lines(text, 3) == "正文一\n正文二"
    assert remove_repeated_lines(text, 4, page_numbers=False) == text


def test_traditional_to_simplified() -> None:
    raw = make_samples.TRADITIONAL_TEXT
    assert clean_text(raw, CleanConfig(traditional_to_simplified=True)).startswith("国有资产监督管理委员会")
    assert clean_text(raw) == raw  # off by default


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        CleanConfig(repeated_line_min_count=1)
