"""Shared fixtures of the soaes-distill tests: a small tokenized dataset of real text."""

from __future__ import annotations

from pathlib import Path

import pytest

from soaes_distill.token_data import TokenExample, write_token_jsonl

TEXTS = [
    "State-owned enterprises report their assets to the supervision commission every quarter.",
    "The board approved the annual budget after a long discussion about risk control.",
    "国有资产监督管理委员会负责监管中央企业。",
    "Speculative decoding uses a small draft model to propose tokens.",
    "Knowledge distillation trains a student to match a teacher's distribution.",
    "The audit found no material weaknesses in internal controls.",
    "Mixed-ownership reform introduces private capital into state firms.",
    "A temperature above one softens the teacher's probabilities.",
    "企业应当建立健全内部控制制度。",
    "Dividends are paid to the state shareholder according to the rules.",
    "The draft model shares the target's tokenizer and output head.",
    "Quarterly revenue grew by eight percent compared with last year.",
]


def make_examples(tokenizer, texts=TEXTS, start_id: int = 0) -> list[TokenExample]:
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        labels = list(ids)
        labels[:2] = [-100, -100]
        out.append(TokenExample(start_id + i, ids, labels))
    return out


@pytest.fixture(scope="session")
def distill_texts() -> list[str]:
    """The shared real sentences (English and Chinese) the tests tokenize."""
    return list(TEXTS)


@pytest.fixture(scope="session")
def token_dataset(tmp_path_factory: pytest.TempPathFactory, embedded_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("distill-data") / "tokens.jsonl"
    return write_token_jsonl(path, make_examples(embedded_tokenizer))
