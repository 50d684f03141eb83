"""Acceptance 2: soaes_cmmlu / soaes_ceval on the sample files give exactly the accuracy of an independent
loglikelihood comparison (same prompt as lm-eval's own cmmlu / ceval-valid YAMLs), and run offline."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from soaes_core import load_tokenizer
from soaes_eval.tasks import SAMPLES_DIR, TASK_NAMES, TASKS_DIR, task_manager

LM_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"


def _lm_eval_descriptions(bench: str) -> dict[str, str]:
    """Subject -> description, read from the installed lm-eval package's own task YAMLs."""
    pattern = "cmmlu/cmmlu_*.yaml" if bench == "cmmlu" else "ceval/ceval-valid_*.yaml"
    out = {}
    for f in LM_TASKS.glob(pattern):
        cfg = yaml.load(f.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
        out[cfg["dataset_name"]] = cfg["description"]
    return out


def _items(bench: str) -> list[tuple[str, str, str, str, str, str, str]]:
    """(subject, question, A, B, C, D, answer) for every sample item, read with the csv module."""
    rows = []
    split, q, a = ("test", "Question", "Answer") if bench == "cmmlu" else ("val", "question", "answer")
    for path in sorted((SAMPLES_DIR / bench / split).glob("*.csv")):
        subject = path.stem.removesuffix("_val")
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append((subject, row[q], row["A"], row["B"], row["C"], row["D"], row[a]))
    return rows


@torch.no_grad()
def _independent_correct(model: Any, tok: Any, bench: str) -> dict[str, list[int]]:
    """Subject -> 1/0 per item: is the gold letter the argmax of log p(" X" | prompt)?"""
    desc = _lm_eval_descriptions(bench)
    correct: dict[str, list[int]] = {}
    items = _items(bench)
    for subject, question, a, b, c, d, answer in items:
        context = f"{desc[subject]}{question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案："
        ctx_ids = tok(context, add_special_tokens=False)["input_ids"]
        conts = []
        for letter in "ABCD":  # log p(continuation | context), splitting the jointly tokenised string
            whole = tok(context + " " + letter, add_special_tokens=False)["input_ids"]
            assert whole[: len(ctx_ids)] == ctx_ids
            conts.append(whole[len(ctx_ids):])
        if all(len(c) == 1 for c in conts):  # one forward of the context scores every one-token choice
            logp = torch.log_softmax(model(torch.tensor([ctx_ids]), logits_to_keep=1).logits[0, -1].float(), -1)
            scores = [logp[c[0]].item() for c in conts]
        else:
            scores = []
            for cont in conts:
                whole = ctx_ids + cont
                logits = model(torch.tensor([whole])).logits[0].float()
                logp = torch.log_softmax(logits[len(ctx_ids) - 1: len(whole) - 1], dim=-1)
                scores.append(sum(logp[i, t].item() for i, t in enumerate(cont)))
        correct.setdefault(subject, []).append(int(max(range(4), key=lambda i: scores[i]) == "ABCD".index(answer)))
    return correct


def test_tasks_registered_via_include_path() -> None:
    tm = task_manager(SAMPLES_DIR)
    for name in TASK_NAMES:
        assert name in tm.all_tasks
    # every shipped subject task has lm-eval's own description and a sample file
    for bench, prefix in (("cmmlu", "soaes_cmmlu_"), ("ceval", "soaes_ceval_")):
        desc = _lm_eval_descriptions(bench)
        ours = {p.stem.removeprefix(prefix): yaml.load(p.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
                for p in (TASKS_DIR / bench).glob(f"{prefix}*.yaml")}
        assert set(ours) == set(desc)
        assert all(ours[s]["description"] == desc[s] for s in desc)


def test_accuracy_equals_independent_loglikelihood(tiny_mc_run: tuple[Path, dict[str, Any]], tiny_qwen2: Any,
                                                   tiny_qwen2_dir: Path) -> None:
    _, results = tiny_mc_run
    tok = load_tokenizer(str(tiny_qwen2_dir))
    for bench, task in (("cmmlu", "soaes_cmmlu"), ("ceval", "soaes_ceval")):
        per_subject = _independent_correct(tiny_qwen2, tok, bench)
        for subject, hits in per_subject.items():  # every subject task, item by item (one item each)
            assert results["results"][f"{task}_{subject}"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
        expected = sum(sum(h) for h in per_subject.values()) / sum(len(h) for h in per_subject.values())
        got = results["results"][task]
        assert got["acc,none"] == pytest.approx(expected, abs=1e-12)
        assert got["acc_norm,none"] == pytest.approx(expected, abs=1e-12)  # one-letter choices: same lengths
        assert results["soaes"]["num_items"][task] == len(_items(bench))
    assert results["soaes"]["num_items"] == {**results["soaes"]["num_items"], "soaes_cmmlu": 67, "soaes_ceval": 52}


@pytest.mark.slow
def test_embedded_model_runs_offline(embedded_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from soaes_eval.runner import EvalRunConfig, run_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = ["soaes_cmmlu_agronomy", "soaes_cmmlu_world_history", "soaes_ceval_law", "soaes_ceval_logic"]
    res = run_eval(EvalRunConfig(tasks=tasks, model="embedded:smollm2-135m", data_dir=str(SAMPLES_DIR),
                                 output_dir=str(tmp_path), batch_size=4))
    for t in tasks:
        assert 0.0 <= res["results"][t]["acc,none"] <= 1.0
        assert res["soaes"]["num_items"][t] == 1
