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


def test_fewshot_uses_same_subject_dev_items() -> None:
    from lm_eval.tasks import get_task_dict

    tasks = get_task_dict(["soaes_cmmlu_agronomy"], task_manager(SAMPLES_DIR))
    task = tasks["soaes_cmmlu_agronomy"]
    prompt = task.fewshot_context(task.eval_docs[0], num_fewshot=1)
    with (SAMPLES_DIR / "cmmlu" / "dev" / "agronomy.csv").open(encoding="utf-8", newline="") as fh:
        dev = next(csv.DictReader(fh))
    shot = f"{dev['Question']}\nA. {dev['A']}\nB. {dev['B']}\nC. {dev['C']}\nD. {dev['D']}\n答案： {dev['Answer']}\n\n"
    assert prompt.startswith(_lm_eval_descriptions("cmmlu")["agronomy"] + shot)
    assert prompt.endswith("\n答案：")


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
def test_embedded_model_runs_offline(embedded_model_dir: Path, tmp_path: Path) -> None:
    """The real embedded model through the CLI in a fresh process with the hubs forced offline."""
    import json
    import os
    import subprocess
    import sys

    # A fresh, single-process run: drop the launcher variables an in-process DeepSpeed test may have set
    # (RANK, MASTER_PORT, ...), or accelerate would try to join that process group's port.
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "soaes_eval.cli", "run", "--model", "embedded:smollm2-135m",
           "--tasks", "soaes_cmmlu,soaes_ceval,soaes_domain_qa", "--data-dir", str(SAMPLES_DIR),
           "--limit", "2", "--max-gen-toks", "16", "--batch-size", "16", "-o", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "soaes_cmmlu: n=67" in proc.stdout and "soaes_ceval: n=52" in proc.stdout
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    for task in ("soaes_cmmlu", "soaes_ceval"):
        assert 0.0 <= res["results"][task]["acc,none"] <= 1.0
    assert res["soaes"]["num_items"]["soaes_domain_qa"] == 2
    assert res["results"]["soaes_domain_qa"]["rouge1,none"] >= 0.0
