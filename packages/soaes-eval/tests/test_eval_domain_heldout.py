"""The committed held-out domain Q&A split: at least 200 valid items, each reference a span of its passage, no
overlap (exact or n-gram) with any training set the pipeline uses, and what its generator rebuilds."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from soaes_eval.tasks.loaders import HELDOUT_QA, read_domain_jsonl

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "make_domain_eval.py"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """scripts/make_domain_eval.py (not in the wheel: it needs soaes-data and soaes-distill)."""
    spec = importlib.util.spec_from_file_location("make_domain_eval", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_domain_eval", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def items() -> list[dict[str, Any]]:
    return [json.loads(line) for line in HELDOUT_QA.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def training(gen: ModuleType) -> dict[str, list[str]]:
    return gen.training_sets()


def test_size_and_fields(items: list[dict[str, Any]]) -> None:
    assert len(items) >= 200
    assert read_domain_jsonl(HELDOUT_QA) == [{k: it[k] for k in ("id", "prompt", "reference")} for it in items]
    assert len({it["id"] for it in items}) == len(items)
    for it in items:
        assert set(it) == {"id", "prompt", "reference", "question", "passage_id"}
        assert all(isinstance(v, str) and v.strip() for v in it.values())


def test_every_reference_is_a_span_of_its_passage(gen: ModuleType, items: list[dict[str, Any]]) -> None:
    passages = {}
    for line in (HELDOUT_QA.parent / "passages.jsonl").read_text(encoding="utf-8").splitlines():
        p = json.loads(line)
        passages[p["passage_id"]] = p["text"]
    assert {it["passage_id"] for it in items} == set(passages)
    for it in items:
        text = passages[it["passage_id"]]
        assert it["reference"] in text, it["id"]
        assert it["prompt"] == gen.make_prompt(text, it["question"])


def test_no_overlap_with_any_training_set(gen: ModuleType, items: list[dict[str, Any]],
                                          training: dict[str, list[str]]) -> None:
    assert {"cpt_corpus", "sft_stage1", "sft_stage2", "teacher_domain_queries", "distill_heldout_prompts"} <= set(
        training)
    assert all(training.values())
    assert gen.contamination(items, training) == {}
    assert gen.internal_duplicates(items) == {}
    # the check finds what it should: a training text holding a span of a passage (which every item of that
    # passage shows in its prompt), or repeating a question
    planted = {"planted": ["前言" + items[3]["reference"][2:2 + gen.NGRAM] + "后记", items[10]["question"]]}
    found = gen.contamination(items, planted)
    same_passage = {i for i, it in enumerate(items) if it["passage_id"] == items[3]["passage_id"]}
    assert set(found) == same_passage | {10} and any("exact" in r for r in found[10])


def test_committed_files_are_what_the_generator_builds(gen: ModuleType) -> None:
    built = gen.build()
    for name, text in built.items():
        assert (HELDOUT_QA.parent / name).read_text(encoding="utf-8") == text, name
    checks = json.loads(built["checks.json"])
    assert checks["items"] >= 200 and checks["ngram"] == gen.NGRAM


def test_task_loads_the_split_by_name(items: list[dict[str, Any]]) -> None:
    from lm_eval.tasks import get_task_dict

    from soaes_eval.tasks import task_manager

    task = get_task_dict(["soaes_domain_qa_heldout"], task_manager())["soaes_domain_qa_heldout"]
    docs = list(task.test_docs())
    assert len(docs) == len(items)
    assert task.doc_to_text(docs[0]) == items[0]["prompt"] + "\n回答："
    assert task.doc_to_target(docs[0]) == items[0]["reference"]
