"""Synthetic Q&A: parsing, grounding, both real backends (local model, OpenAI-compatible HTTP server on
127.0.0.1), and the review round trip keeping only approved rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import make_samples
import pytest

from soaes_core.errors import DataError
from soaes_data.synth import (
    LocalHFGenerator,
    OpenAICompatGenerator,
    SynthConfig,
    SynthError,
    export_review,
    grounding_score,
    import_review,
    parse_qa_json,
    synthesize,
)
from soaes_data.synth_server import BackgroundServer, make_app

DOCS = [{"id": f"d{k}", "text": text} for k, (_t, text) in enumerate(make_samples.DOMAIN_DOCS[:2])]
EN_TEMPLATE = ("Read the document and write {n} question-answer pairs about it, formatted as\n"
               "Question: ...\nAnswer: ...\n\nDocument:\n{document}")


@pytest.mark.parametrize("raw", [
    '[{"question": "什么是产权登记？", "answer": "对企业产权状况进行登记。"}]',
    '好的，结果如下：\n```json\n[{"question": "什么是产权登记？", "answer": "对企业产权状况进行登记。"},]\n```',
    '输出：{“question”: “什么是产权登记？”, “answer”: “对企业产权状况进行登记。”} 希望有帮助',
    '[{"问题": "什么是产权登记？", "答案": "对企业产权状况进行登记。"}]',
    "问题：什么是产权登记？\n答案：对企业产权状况进行登记。",
    "Question: 什么是产权登记？\n\nAnswer: 对企业产权状况进行登记。",
])
def test_parse_variants(raw: str) -> None:
    assert parse_qa_json(raw) == [{"question": "什么是产权登记？", "answer": "对企业产权状况进行登记。"}]


def test_parse_garbage_and_multi() -> None:
    assert parse_qa_json("我不知道。") == []
    assert parse_qa_json('[{"question": "x"}]') == []
    text = "问1：甲？\n答1：乙。\n问2：丙？\n答2：丁。"
    assert parse_qa_json(text) == [{"question": "甲？", "answer": "乙。"}, {"question": "丙？", "answer": "丁。"}]


def test_grounding() -> None:
    doc = DOCS[1]["text"]
    assert grounding_score("企业设立时应当办理占有产权登记", doc) == 1.0
    assert grounding_score("红烧肉要小火慢炖", doc) < 0.2
    assert grounding_score("", doc) == 0.0


class _Replay:
    """A real `Generator` over fixed replies: exercises the pipeline logic around generation."""

    def __init__(self, replies: list[str]) -> None:
        self.replies = replies

    def generate(self, conversations: Any, max_new_tokens: int = 256, temperature: float = 0.0) -> list[str]:
        assert len(conversations) <= len(self.replies)
        out, self.replies = self.replies[:len(conversations)], self.replies[len(conversations):]
        return out


def test_synthesize_accounting_and_dedup() -> None:
    replies = [
        '[{"question": "产权登记包括哪些？", "answer": "占有产权登记、变动产权登记和注销产权登记。"},'
        ' {"question": "红烧肉怎么做？", "answer": "小火慢炖一小时左右。"}]',
        "无法回答",
    ]
    items, rejects = synthesize([DOCS[1], DOCS[0]], _Replay(replies), SynthConfig(per_document=2))
    assert [i["question"] for i in items] == ["产权登记包括哪些？"]
    assert items[0]["status"] == "pending" and items[0]["source_id"] == "d1"
    assert sorted(r["reason"].split(":")[0] for r in rejects) == ["ungrounded", "unparseable_output"]
    dup = [replies[0], replies[0]]
    items, rejects = synthesize([DOCS[1], DOCS[1]], _Replay(dup), SynthConfig(), batch_size=1)
    assert len(items) == 1 and [r["reason"] for r in rejects].count("duplicate_question") == 1


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_review_round_trip(tmp_path: Path, suffix: str) -> None:
    items = [{"id": f"q{k}", "task": "qa", "source_id": "d1", "question": f"问题{k}？", "answer": f"答案{k}。",
              "grounding": 1.0, "status": "pending"} for k in range(4)]
    path = export_review(items, tmp_path / f"review{suffix}")
    if suffix == ".csv":
        rows = list(csv.DictReader(path.open(encoding="utf-8-sig")))
        rows[0]["status"], rows[1]["status"], rows[2]["status"] = "approved", "rejected", "通过"
        rows[2]["answer"] = "审核后修改的答案。"
        with path.open("w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
        rows[0]["status"], rows[1]["status"], rows[2]["status"] = "approved", "rejected", "通过"
        rows[2]["answer"] = "审核后修改的答案。"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    kept, counts = import_review(path)
    assert [k["id"] for k in kept] == ["q0", "q2"]
    assert kept[1]["messages"][1]["content"] == "审核后修改的答案。"
    assert counts == {"approved": 1, "rejected": 1, "通过": 1, "pending": 1}


def test_review_errors(tmp_path: Path) -> None:
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"status": "approved", "question": "q"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"r.jsonl:1: field 'answer'"):
        import_review(bad)
    with pytest.raises(DataError, match=r"csv or \.jsonl"):
        export_review([], tmp_path / "r.txt")


def test_http_backend_errors() -> None:
    gen = OpenAICompatGenerator("http://127.0.0.1:9/v1", "m", timeout=2)
    with pytest.raises(SynthError, match="request failed"):
        gen.generate([[{"role": "user", "content": "hi"}]], 4)


def test_local_and_server_backends_agree(tiny_qwen2_dir: Path) -> None:
    """Greedy generation through the HTTP server equals the local backend token for token."""
    local = LocalHFGenerator(tiny_qwen2_dir)
    conv = [[{"role": "user", "content": "国有资产监督管理是什么？"}]]
    direct = local.generate(conv, max_new_tokens=12)
    with BackgroundServer(make_app(local, model_name="tiny")) as server:
        remote = OpenAICompatGenerator(server.base_url, "tiny")
        assert remote.generate(conv, max_new_tokens=12) == direct
        with pytest.raises(SynthError, match="HTTP 404"):
            OpenAICompatGenerator(server.base_url, "other").generate(conv, 4)
        items, rejects = synthesize(DOCS, remote, SynthConfig(max_new_tokens=8))
    assert len(items) + len({r["source_id"] for r in rejects}) >= len(DOCS)


@pytest.mark.slow
def test_embedded_model_local_and_server_review(tmp_path: Path) -> None:
    """The embedded SmolLM2 generates Q&A locally and through the localhost server; approved rows survive."""
    local = LocalHFGenerator("embedded:smollm2-135m")
    cfg = SynthConfig(per_document=1, max_new_tokens=32, min_grounding=0.0, prompt_template=EN_TEMPLATE)
    items, rejects = synthesize(DOCS[:1], local, cfg)
    with BackgroundServer(make_app(local, model_name="smollm2")) as server:
        remote_items, remote_rejects = synthesize(DOCS[:1], OpenAICompatGenerator(server.base_url, "smollm2"), cfg)
    assert (items, rejects) == (remote_items, remote_rejects)  # greedy: same text either way
    assert items, f"embedded model produced nothing parseable: {rejects}"
    path = export_review(items, tmp_path / "review.jsonl")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    rows[0]["status"] = "approved"
    rows.append({**rows[0], "id": "extra", "status": "rejected"})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    kept, counts = import_review(path)
    assert [k["id"] for k in kept] == [items[0]["id"]] and counts["rejected"] == 1
