"""`soaes-eval run` reports the ROUGE/BLEU that lm-eval aggregated (no second scoring), with their provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from soaes_core import read_jsonl
from soaes_eval import runner
from soaes_eval.metrics import text_metrics


def test_text_metrics_are_lm_eval_aggregates(domain_runs: dict[str, tuple[Path, dict[str, Any]]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out, payload = domain_runs["hf"]
    task = "soaes_domain_qa"
    lm_eval_scores = payload["results"][task]
    block = payload["soaes"]["text_metrics"][task]
    rows = read_jsonl(out / f"predictions_{task}.jsonl")
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    for conv, names in runner.TEXT_SCORES.items():
        expect = text_metrics(preds, refs, convention=conv).to_dict()  # scored independently from the predictions
        assert set(block[conv]) == set(expect)
        for key, value in expect.items():
            assert block[conv][key] == (pytest.approx(value) if isinstance(value, float) else value), key
        for key, metric in names.items():
            assert block[conv][key] == lm_eval_scores[f"{metric},none"]  # the very numbers lm-eval aggregated

    # The runner only copies lm-eval's numbers: it never scores predictions itself.
    def no_rescoring(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the runner rescored predictions")

    monkeypatch.setattr("soaes_eval.metrics.rouge", no_rescoring)
    monkeypatch.setattr("soaes_eval.metrics.bleu4", no_rescoring)
    again = runner._text_metrics(lm_eval_scores, len(rows))
    assert again == block
