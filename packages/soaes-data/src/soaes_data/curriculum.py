"""Curriculum stratification (paper §3.2): stage 1 = weakly related Chinese dialog from kept categories
(finance, law, business, politics); stage 2 = strongly related expert Q&A and reports. Decided by task type
and domain-relevance thresholds; reports counts and score histograms."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .filters import (
    CategoryConfig,
    LanguageConfig,
    RelevanceConfig,
    check_category,
    check_language,
    record_categories,
    relevance_scorer,
)
from .records import record_text


@dataclass
class CurriculumConfig:
    """Records whose `task_field` is in `stage2_tasks` and relevance ≥ `stage2_min_relevance` go to stage 2;
    other records pass the category and language filters and relevance ≥ `stage1_min_relevance` for stage 1."""

    task_field: str = field(default="task", metadata={"help": "Record field holding the task."})
    stage2_tasks: list[str] = field(default_factory=lambda: ["qa", "report"], metadata={
        "help": "Tasks that go to stage 2 (expert Q&A / reports)."})
    stage2_min_relevance: float = field(default=0.3, metadata={"help": "Minimum domain relevance for stage 2."})
    stage1_min_relevance: float = field(default=0.0, metadata={"help": "Minimum domain relevance for stage 1."})
    category: CategoryConfig = field(default_factory=CategoryConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    relevance: RelevanceConfig = field(default_factory=RelevanceConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.stage1_min_relevance <= 1 or not 0 <= self.stage2_min_relevance <= 1:
            raise ValueError("relevance thresholds must be in [0, 1]")


@dataclass
class CurriculumResult:
    stage1: list[dict[str, Any]]
    stage2: list[dict[str, Any]]
    rejects: list[dict[str, Any]]

    def counts(self) -> dict[str, Any]:
        return {"in": len(self.stage1) + len(self.stage2) + len(self.rejects), "stage1": len(self.stage1),
                "stage2": len(self.stage2), "dropped": len(self.rejects),
                "stage2_by_task": dict(Counter(str(r.get("task")) for r in self.stage2)),
                "dropped_by_reason": dict(Counter(r["reason"].split(":")[0] + ":" + r["reason"].split(":")[1]
                                                  if r["reason"].count(":") else r["reason"] for r in self.rejects))}


def stratify(records: Sequence[dict[str, Any]], config: CurriculumConfig = CurriculumConfig()) -> CurriculumResult:
    """Assign each record to stage 1, stage 2 or rejects (with a reason); adds `relevance` to each record."""
    scorer = relevance_scorer(config.relevance)
    out = CurriculumResult([], [], [])
    for r in records:
        text = record_text(r)
        score = round(float(scorer(text)), 4)
        rec = {**r, "relevance": score}
        task = r.get(config.task_field)
        if task in config.stage2_tasks and score >= config.stage2_min_relevance:
            out.stage2.append(rec)
            continue
        reason = check_language(text, config.language)
        if reason is None and record_categories(r, config.category.fields):
            reason = check_category(r, config.category)
        if reason is None and score < config.stage1_min_relevance:
            reason = f"relevance:<{config.stage1_min_relevance}"
        if reason is None:
            out.stage1.append(rec)
        else:
            out.rejects.append({**rec, "reason": reason})
    return out


def plot_histograms(result: CurriculumResult, path: str | os.PathLike[str]) -> Path:
    """PNG of relevance-score histograms per stage (and dropped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [i / 20 for i in range(21)]
    for name, recs in (("stage1", result.stage1), ("stage2", result.stage2), ("dropped", result.rejects)):
        if recs:
            ax.hist([r["relevance"] for r in recs], bins=bins, alpha=0.6, label=f"{name} (n={len(recs)})")
    ax.set_xlabel("domain relevance")
    ax.set_ylabel("records")
    ax.set_title("Curriculum stratification")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
