"""Stats: length summaries of corpora and packed datasets, histogram PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soaes_data.samples import sample_path
from soaes_data.stats import corpus_stats, dumps, plot_length_histogram
from soaes_data.tokenize_pack import pack_sft_file


def test_corpus_and_packed_stats(tmp_path: Path, embedded_tokenizer: Any) -> None:
    src = sample_path("sft/expert_pool.jsonl")
    s = corpus_stats(src, tokenizer=embedded_tokenizer)
    assert s["documents"] == 22 and s["tokens"]["count"] == 22 and s["tokens"]["total"] > s["chars"]["total"] / 2
    assert s["chars"]["min"] <= s["chars"]["p50"] <= s["chars"]["max"]
    assert plot_length_histogram(s, tmp_path / "h.png").stat().st_size > 1000
    assert "lengths" not in dumps(s)
    packed = pack_sft_file(src, tmp_path / "p", embedded_tokenizer, 1024)
    p = corpus_stats(packed)
    assert p["kind"] == "packed" and p["sequence_tokens"]["count"] == 22 and 0 < p["utilisation"] <= 1
