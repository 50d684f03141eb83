"""Text cleaning for Chinese documents: NFKC (keeping Chinese full-width punctuation), control and
zero-width characters, whitespace, repeated header/footer lines and page numbers, optional
Traditional → Simplified conversion."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

# Full-width punctuation that is standard in Chinese text: NFKC would turn it into ASCII, so keep it.
KEEP_FULLWIDTH = "，。！？：；（）【】《》、“”‘’…—～「」『』"
_KEEP_RE = re.compile("([" + re.escape(KEEP_FULLWIDTH) + "])")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
                         r"\u200b-\u200f\u2028\u2029\u202a-\u202e\u2060\ufeff\ufffd]")
_SPACES_RE = re.compile(r"[ \t\u00a0\u3000]+")
_CJK = r"\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_CJK_GAP_RE = re.compile(rf"(?<=[{_CJK}]) (?=[{_CJK}])")
_BLANKS_RE = re.compile(r"\n{3,}")
PAGE_NUMBER_RE = re.compile(r"^(第\s*\d+\s*页(\s*[/，,]?\s*共\s*\d+\s*页)?|[-—–]?\s*\d{1,4}\s*[-—–]?|"
                            r"page\s+\d+(\s+of\s+\d+)?|\d+\s*/\s*\d+)$", re.IGNORECASE)


@dataclass
class CleanConfig:
    """What `clean_text` does; every step on by default except Traditional → Simplified."""

    nfkc: bool = True
    remove_control: bool = True
    normalise_whitespace: bool = True
    remove_repeated_lines: bool = True
    repeated_line_min_count: int = 3
    repeated_line_max_chars: int = 60
    remove_page_numbers: bool = True
    traditional_to_simplified: bool = False

    def __post_init__(self) -> None:
        if self.repeated_line_min_count < 2:
            raise ValueError("repeated_line_min_count must be >= 2")


def nfkc_keep_chinese_punctuation(text: str) -> str:
    """NFKC (full-width letters/digits/space → ASCII) except Chinese full-width punctuation."""
    parts = _KEEP_RE.split(text)
    return "".join(p if k % 2 else unicodedata.normalize("NFKC", p) for k, p in enumerate(parts))


def normalise_whitespace(text: str) -> str:
    """Unify newlines, collapse spaces, strip lines, drop spaces between CJK characters, ≤ 1 blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_CJK_GAP_RE.sub("", _SPACES_RE.sub(" ", line).strip()) for line in text.split("\n")]
    return _BLANKS_RE.sub("\n\n", "\n".join(lines)).strip()


def remove_repeated_lines(text: str, min_count: int = 3, max_chars: int = 60, page_numbers: bool = True) -> str:
    """Drop short lines that repeat ≥ `min_count` times in a document (running headers/footers) and
    page-number lines such as "第 3 页", "- 12 -", "Page 2 of 9"."""
    lines = text.split("\n")
    counts = Counter(line.strip() for line in lines if line.strip())
    keep = []
    for line in lines:
        s = line.strip()
        if s and counts[s] >= min_count and len(s) <= max_chars:
            continue
        if page_numbers and s and PAGE_NUMBER_RE.match(s):
            continue
        keep.append(line)
    return _BLANKS_RE.sub("\n\n", "\n".join(keep)).strip()


@lru_cache(maxsize=1)
def _t2s() -> object:
    import opencc

    return opencc.OpenCC("t2s")


def traditional_to_simplified(text: str) -> str:
    """Traditional → Simplified Chinese (OpenCC t2s tables, pure-Python implementation)."""
    return _t2s().convert(text)  # type: ignore[attr-defined]


def clean_text(text: str, config: CleanConfig = CleanConfig()) -> str:
    """Apply the configured cleaning steps in a fixed order; returns the cleaned text (possibly empty)."""
    if config.nfkc:
        text = nfkc_keep_chinese_punctuation(text)
    if config.remove_control:
        text = _CONTROL_RE.sub("", text)
    if config.traditional_to_simplified:
        text = traditional_to_simplified(text)
    if config.normalise_whitespace:
        text = normalise_whitespace(text)
    if config.remove_repeated_lines or config.remove_page_numbers:
        text = remove_repeated_lines(text, config.repeated_line_min_count if config.remove_repeated_lines else 10**9,
                                     config.repeated_line_max_chars, config.remove_page_numbers)
    return text
