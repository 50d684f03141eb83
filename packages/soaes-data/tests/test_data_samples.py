"""The shipped sample corpus is present, small, and reads back to the known strings."""

from __future__ import annotations

import json

import make_samples
import pytest

from soaes_core.errors import InvalidArgumentError
from soaes_data.samples import sample_dir, sample_path


def test_layout_and_size() -> None:
    for name in ["corpus/articles.jsonl", "corpus/notice_gb18030.txt", "corpus/news.html", "corpus/guideline.docx",
                 "corpus/briefing.pdf", "sft/dialog_pool.jsonl", "sft/expert_pool.jsonl", "README.md", "recipe.yaml"]:
        assert sample_path(name).is_file()
    total = sum(p.stat().st_size for p in sample_dir().rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 1_000_000
    assert "not SOAEs-DataSuite" in sample_path("README.md").read_text(encoding="utf-8")
    with pytest.raises(InvalidArgumentError):
        sample_path("nope.txt")


def test_pools_have_expected_fields() -> None:
    dialog = [json.loads(x) for x in sample_path("sft/dialog_pool.jsonl").read_text(encoding="utf-8").splitlines()]
    cats = {d["category"] for d in dialog}
    assert {"finance", "law", "business", "politics", "mathematics", "arts"} <= cats
    expert = [json.loads(x) for x in sample_path("sft/expert_pool.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {e["task"] for e in expert} == {"qa", "report"}
    assert all(e["messages"][-1]["role"] == "assistant" for e in expert + dialog)


def test_gb18030_file_is_really_gb18030() -> None:
    raw = sample_path("corpus/notice_gb18030.txt").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    assert make_samples.KNOWN_GB18030 in raw.decode("gb18030")
