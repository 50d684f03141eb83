"""Curriculum: stage 1 = kept-category Chinese dialog, stage 2 = relevant expert Q&A/reports; PNG report."""

from __future__ import annotations

import json
from pathlib import Path

from soaes_data.curriculum import CurriculumConfig, plot_histograms, stratify
from soaes_data.samples import sample_path


def _pool() -> list[dict]:
    return [json.loads(x) for f in ("sft/dialog_pool.jsonl", "sft/expert_pool.jsonl")
            for x in sample_path(f).read_text(encoding="utf-8").splitlines()]


def test_stratify_sample_pool(tmp_path: Path) -> None:
    pool = _pool()
    result = stratify(pool)
    counts = result.counts()
    assert counts["in"] == len(pool) == counts["stage1"] + counts["stage2"] + counts["dropped"]
    assert all(r.get("task") in ("qa", "report") and r["relevance"] >= 0.3 for r in result.stage2)
    assert counts["stage2_by_task"]["report"] == 4
    stage1_dialog = [r for r in result.stage1 if "category" in r]
    assert {r["category"] for r in stage1_dialog} == {"finance", "law", "business", "politics"}
    reasons = {r["id"]: r["reason"] for r in result.rejects}
    assert all(reasons[r["id"]].startswith("category:") for r in pool if r.get("category") in ("mathematics", "arts"))
    assert reasons["dlg-021"] == "language:en"
    png = plot_histograms(result, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_thresholds_move_records() -> None:
    pool = [r for r in _pool() if "task" in r]
    strict = stratify(pool, CurriculumConfig(stage2_min_relevance=0.99))
    assert not strict.stage2 and len(strict.stage1) == len(pool)
    loose = stratify(pool, CurriculumConfig(stage2_min_relevance=0.0))
    assert len(loose.stage2) == len(pool)
