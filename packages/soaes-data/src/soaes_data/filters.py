"""Document filters and scorers: CJK-ratio language id, PII masking, length bounds, Chinese quality
heuristics, SOAE domain relevance (lexicon or a plugged-in classifier), Infinity-Instruct category filter.

Each `check_*` returns None to keep a document or a short reason string to drop it.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from soaes_core.errors import ConfigError, DataError

_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_LATIN_RE = re.compile(r"[A-Za-z]")
_DIGIT_RE = re.compile(r"\d")
_SYMBOL_RE = re.compile(r"[^\w\s\u3000-\u303f\uff00-\uffef“”‘’…—·]")


# ---- language -------------------------------------------------------------------------------------------
_SLICE = 1 << 18  # characters (or n-grams) a long text is processed at a time, so memory per document is bounded


def _count(char_class: re.Pattern[str], text: str) -> int:
    """Matches of a one-character pattern, without building a list of them (a 20 MB text would make millions
    of string objects), slice by slice (`re.sub` holds 8 bytes per match while it works)."""
    return sum(len(p) - len(char_class.sub("", p)) for p in (text[a:a + _SLICE] for a in range(0, len(text), _SLICE)))


def _nonspace(text: str) -> int:
    """Number of characters that are not whitespace (`str.split` splits on exactly `str.isspace`)."""
    return sum(map(len, text.split()))


def cjk_ratio(text: str) -> float:
    """Fraction of non-space characters that are CJK ideographs."""
    chars = _nonspace(text)
    return _count(_CJK_RE, text) / chars if chars else 0.0


def detect_language(text: str, min_cjk_ratio: float = 0.3) -> str:
    """'zh' when CJK ideographs make up at least `min_cjk_ratio` of the letters-ish characters, 'en' when Latin
    letters dominate, else 'other'. Needs no model download."""
    cjk = _count(_CJK_RE, text)
    latin = _count(_LATIN_RE, text)
    nonspace = _nonspace(text) or 1
    if cjk / nonspace >= min_cjk_ratio:
        return "zh"
    if latin / nonspace >= 0.5:
        return "en"
    return "other"


@dataclass
class LanguageConfig:
    """Languages to keep; CJK-ratio detection by default, or `detector: "module:function"` (text → code),
    e.g. a fastText/lingua model that ships inside its own package."""

    keep: list[str] = field(default_factory=lambda: ["zh"])
    min_cjk_ratio: float = 0.3
    detector: str | None = None


def check_language(text: str, config: LanguageConfig = LanguageConfig()) -> str | None:
    lang = str(load_classifier(config.detector)(text)) if config.detector else detect_language(text,
                                                                                               config.min_cjk_ratio)
    return None if lang in config.keep else f"language:{lang}"


# ---- PII ------------------------------------------------------------------------------------------------
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
ID_CARD_RE = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
BANK_CARD_RE = re.compile(r"(?<![0-9A-Za-z])\d{16,19}(?![0-9A-Za-z])")
PHONE_RE = re.compile(r"(?<![0-9A-Za-z])(?:\+?86[- ]?)?1[3-9]\d[- ]?\d{4}[- ]?\d{4}(?![0-9A-Za-z])")
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_DIGITS3_RE = re.compile(r"\d{3}")


def valid_id_card(number: str) -> bool:
    """GB 11643 check digit of an 18-character resident ID number."""
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return "10X98765432"[total % 11] == number[17].upper()


def luhn_valid(number: str) -> bool:
    """Luhn checksum (bank cards)."""
    total = 0
    for k, ch in enumerate(reversed(number)):
        d = int(ch)
        if k % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass
class PiiConfig:
    email: bool = True
    id_card: bool = True
    bank_card: bool = True
    phone: bool = True


def mask_pii(text: str, config: PiiConfig = PiiConfig()) -> tuple[str, Counter[str]]:
    """Replace e-mail addresses, ID-card numbers (check digit valid), bank-card numbers (Luhn valid) and
    mainland mobile numbers with [EMAIL], [ID_CARD], [BANK_CARD], [PHONE]; returns (text, counts)."""
    counts: Counter[str] = Counter()

    def sub(pattern: re.Pattern[str], tag: str, valid: Callable[[str], bool] | None = None) -> None:
        nonlocal text

        def repl(m: re.Match[str]) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            counts[tag] += 1
            return f"[{tag}]"
        text = pattern.sub(repl, text)

    if config.email and "@" in text:  # each pattern needs "@" or three digits in a row: skip scans that cannot match
        sub(EMAIL_RE, "EMAIL")
    if not _DIGITS3_RE.search(text):
        return text, counts
    if config.id_card:
        sub(ID_CARD_RE, "ID_CARD", valid_id_card)
    if config.bank_card:
        sub(BANK_CARD_RE, "BANK_CARD", luhn_valid)
    if config.phone:
        sub(PHONE_RE, "PHONE")
    return text, counts


# ---- length and quality ---------------------------------------------------------------------------------
@dataclass
class LengthConfig:
    min_chars: int = 20
    max_chars: int = 200_000

    def __post_init__(self) -> None:
        if not 0 <= self.min_chars <= self.max_chars:
            raise ValueError("need 0 <= min_chars <= max_chars")


def check_length(text: str, config: LengthConfig = LengthConfig()) -> str | None:
    n = len(text)
    if n < config.min_chars:
        return f"too_short:<{config.min_chars}"
    if n > config.max_chars:
        return f"too_long:>{config.max_chars}"
    return None


@dataclass
class QualityConfig:
    """Heuristics adapted to Chinese (Gopher-style rules with CJK-aware ratios)."""

    min_cjk_ratio: float = 0.3
    max_symbol_ratio: float = 0.2
    max_digit_ratio: float = 0.3
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_ngram_fraction: float = 0.4
    ngram: int = 5


def quality_signals(text: str, ngram: int = 5) -> dict[str, float]:
    """Ratios used by `check_quality` (over non-space characters / non-empty lines / character n-grams)."""
    compact = "".join(text.split())
    n = len(compact) or 1
    lines = [s.strip() for s in text.split("\n") if s.strip()]
    line_counts = Counter(lines)
    dup_lines = sum(c for c in line_counts.values() if c > 1)
    n_grams, dup_grams = _repeated_ngrams(compact, ngram)
    return {
        "cjk_ratio": _count(_CJK_RE, compact) / n,
        "symbol_ratio": _count(_SYMBOL_RE, compact) / n,
        "digit_ratio": _count(_DIGIT_RE, compact) / n,
        "duplicate_line_fraction": dup_lines / len(lines) if lines else 0.0,
        "duplicate_ngram_fraction": dup_grams / n_grams if n_grams else 0.0,
    }


def _repeated_ngrams(s: str, n: int) -> tuple[int, int]:
    """(number of character n-grams, how many of them occur more than once), from 64-bit polynomial hashes
    of the n-grams (vectorised, 8 bytes per n-gram instead of a string each): the hashes are computed and
    compared slice by slice and sorted in place, so a long text costs those 8 bytes per character and little
    more."""
    m = len(s) - n + 1
    if m <= 0:
        return 0, 0
    h = np.empty(m, dtype=np.uint64)
    for a in range(0, m, _SLICE):
        b = min(m, a + _SLICE)
        cps = np.frombuffer(s[a:b + n - 1].encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        g = np.zeros(b - a, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                g = g * np.uint64(0x100000001B3) + cps[k:k + b - a] + np.uint64(1)
        h[a:b] = g
    h.sort()
    singles = 0  # hashes that differ from both neighbours (occur once)
    for a in range(0, m, _SLICE):
        b = min(m, a + _SLICE)
        ext = h[max(a - 1, 0):min(b + 1, m)]
        ne = np.concatenate([[True] if a == 0 else [], ext[1:] != ext[:-1], [True] if b == m else []]).astype(bool)
        singles += int(np.count_nonzero(ne[:-1] & ne[1:]))
    return m, m - singles


def check_quality(text: str, config: QualityConfig = QualityConfig()) -> str | None:
    s = quality_signals(text, config.ngram)
    if s["cjk_ratio"] < config.min_cjk_ratio:
        return "quality:low_cjk_ratio"
    if s["symbol_ratio"] > config.max_symbol_ratio:
        return "quality:symbol_ratio"
    if s["digit_ratio"] > config.max_digit_ratio:
        return "quality:digit_ratio"
    if s["duplicate_line_fraction"] > config.max_duplicate_line_fraction:
        return "quality:duplicate_lines"
    if s["duplicate_ngram_fraction"] > config.max_duplicate_ngram_fraction:
        return "quality:duplicate_ngrams"
    return None


# ---- domain relevance -----------------------------------------------------------------------------------
def default_lexicon_path() -> Path:
    """The shipped, editable SOAE lexicon (TSV: term, weight)."""
    return Path(str(resources.files("soaes_data.lexicon").joinpath("soae_lexicon.tsv")))


@lru_cache(maxsize=8)
def load_lexicon(path: str | None = None) -> tuple[tuple[str, float], ...]:
    """Read a lexicon TSV (`term<TAB>weight`, `#` comments; weight defaults to 1)."""
    p = Path(path) if path else default_lexicon_path()
    if not p.is_file():
        raise DataError("lexicon file not found", path=str(p))
    terms = []
    for k, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            weight = float(parts[1]) if len(parts) > 1 else 1.0
        except ValueError:
            raise DataError(f"weight {parts[1]!r} is not a number", path=str(p), line=k) from None
        terms.append((parts[0], weight))
    if not terms:
        raise DataError("lexicon has no terms", path=str(p))
    # longest first so "国有资本投资运营公司" is counted once, not also as "国有资本"
    return tuple(sorted(terms, key=lambda t: -len(t[0])))


def lexicon_relevance(text: str, lexicon: Iterable[tuple[str, float]], scale: float = 10.0) -> float:
    """Relevance in [0, 1): 1 - exp(-h / scale), h = weighted term hits per 100 characters (a short text
    counts as 100). Longer terms mask their substrings so a phrase counts once. With the shipped lexicon,
    supervision articles score ~0.8-1, texts that touch the domain in passing ~0.1-0.5, others 0."""
    if not text:
        return 0.0
    remaining = text
    hits = 0.0
    for term, weight in lexicon:
        c = remaining.count(term)
        if c:
            hits += c * weight
            remaining = remaining.replace(term, "\x00")
    density = hits * 100 / max(len(text), 100)
    return 1.0 - math.exp(-density / scale)


@dataclass
class RelevanceConfig:
    """Domain relevance: the shipped lexicon by default, or `classifier: "module:function"` returning a
    float in [0, 1] for a text (e.g. a fastText or BERT classifier you load in that module)."""

    lexicon: str | None = None
    classifier: str | None = None
    min_score: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError("min_score must be in [0, 1]")


@lru_cache(maxsize=16)
def load_classifier(spec: str) -> Callable[[str], Any]:
    """Import `module:function` (a text → score or label function). This runs that module's code: a recipe
    naming one is as trusted as a script (docs/security.md)."""
    module, _, name = spec.partition(":")
    if not name:
        raise ConfigError(f"classifier {spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"classifier {spec!r}: {err}") from None
    if not callable(fn):
        raise ConfigError(f"classifier {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


def relevance_scorer(config: RelevanceConfig = RelevanceConfig()) -> Callable[[str], float]:
    """A text → relevance function from the config (classifier if set, else the lexicon)."""
    if config.classifier:
        return load_classifier(config.classifier)
    lexicon = load_lexicon(os.fspath(config.lexicon) if config.lexicon else None)
    return lambda text: lexicon_relevance(text, lexicon)


# ---- Infinity-Instruct-style categories -----------------------------------------------------------------
PAPER_INCLUDE = ["finance", "financial", "law", "legal", "business", "politic", "economic", "management"]
PAPER_EXCLUDE = ["math", "arts", "art ", "poetry", "literature", "music", "painting"]


@dataclass
class CategoryConfig:
    """Keep records whose category matches an `include` keyword and no `exclude` keyword (case-insensitive
    substring). Defaults follow the paper: finance, law, business, politics in; mathematics, arts out."""

    fields: list[str] = field(default_factory=lambda: ["category", "label.cate_ability_en", "label.cate_ability_zh",
                                                       "label"])
    include: list[str] = field(default_factory=lambda: list(PAPER_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(PAPER_EXCLUDE))


def record_categories(record: Mapping[str, Any], fields: Iterable[str]) -> list[str]:
    """All category strings found under the dotted `fields` of a record (strings or lists of strings)."""
    out: list[str] = []
    for dotted in fields:
        node: Any = record
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, list):
            out += [x for x in node if isinstance(x, str)]
    return out


def check_category(record: Mapping[str, Any], config: CategoryConfig = CategoryConfig()) -> str | None:
    cats = [c.lower() for c in record_categories(record, config.fields)]
    if not cats:
        return "category:missing"
    for c in cats:
        for kw in config.exclude:
            if kw.lower() in c + " ":
                return f"category:excluded:{c}"
    if config.include and not any(kw.lower() in c for c in cats for kw in config.include):
        return f"category:not_included:{cats[0]}"
    return None
