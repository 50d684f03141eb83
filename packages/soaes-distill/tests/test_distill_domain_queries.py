"""Domain query synthesis: jieba terms, template fills, passage prompts, dedup and held-out decontamination."""

from __future__ import annotations

import pytest

from soaes_core.errors import InvalidArgumentError
from soaes_distill.domain_queries import (
    DomainQueryConfig,
    build_domain_queries,
    domain_terms,
    passage_prompts,
    template_queries,
)

TEXTS = [
    "国有资产监督管理机构依照法律法规履行出资人职责，指导推进国有企业改革和重组，对所监管企业国有资产的保值增值进行监督。",
    "国有资本投资运营公司是国有资本市场化运作的专业平台，主要以服务国家战略、优化国有资本布局为目标。",
    "企业名称、组织形式、国有资本额等发生变动时，应当办理变动产权登记。",
]


def test_domain_terms_are_chinese_keywords() -> None:
    terms = domain_terms(TEXTS, top_k=10)
    assert 3 <= len(terms) <= 10
    assert all(len(t) >= 2 and not t.isdigit() for t in terms)
    assert any("国有" in t or "资本" in t or "资产" in t for t in terms)


def test_template_queries_fill_single_then_distinct_pairs() -> None:
    terms = ["国有资本", "产权登记", "董事会"]
    one = template_queries(terms, ["什么是{a}？"], max_queries=100)
    assert sorted(one) == sorted(f"什么是{t}？" for t in terms)
    both = template_queries(terms, ["什么是{a}？", "{a}和{b}有什么区别？"], max_queries=7, seed=1)
    assert len(both) == len(set(both)) == 7
    pairs = [q for q in both if "区别" in q]
    assert len(pairs) == 4 and all(q.split("和")[0] != q.split("和")[1].split("有")[0] for q in pairs)
    assert len(template_queries(terms, ["什么是{a}？"], max_queries=2)) == 2
    with pytest.raises(InvalidArgumentError, match="no domain terms"):
        template_queries([], ["什么是{a}？"], 5)


def test_passage_prompts_cover_each_text() -> None:
    text = "一二三四五六七八九十" * 3  # 30 characters
    out = passage_prompts([text], chars=12, stride=6, instructions=("A:", "B:"))
    assert [p[:2] for p in out[:3]] == ["A:", "B:", "A:"]
    bodies = [p[2:] for p in out]
    assert bodies[0] == text[:12] and bodies[-1].endswith(text[-1])
    assert all(len(b) <= 12 for b in bodies)


def test_build_domain_queries_accounts_for_every_candidate() -> None:
    held = ["国有资本投资公司和运营公司有什么区别？", "什么是国有资本？"]
    cfg = DomainQueryConfig(num_terms=12, max_queries=200, passage_chars=40, passage_stride=20, decontam_ngram=6)
    res = build_domain_queries(TEXTS, held, cfg)
    assert res.prompts and all(p["source"] == "domain-template" for p in res.prompts)
    kept = [p["prompt"] for p in res.prompts]
    assert len(kept) == len(set(kept))
    assert "什么是国有资本？" not in kept  # the held-out prompt itself
    assert any(r["reason"].startswith("overlaps held-out prompt") for r in res.rejects)
    for q in kept:  # no kept query shares a 6-character span with a held-out prompt
        assert not any(q[i:i + 6] in h for h in held for i in range(len(q) - 5))
    passages = passage_prompts(TEXTS, 40, 20)
    assert len(kept) + len(res.rejects) == len(template_queries(res.terms, cfg.templates, 200)) + len(passages)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_terms": 0}, "num_terms"),
    ({"decontam_ngram": 3}, "decontam_ngram"),
    ({"templates": ("没有槽位",)}, "slot"),
])
def test_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        DomainQueryConfig(**kwargs)


def test_cli_writes_prompts_and_rejects(tmp_path) -> None:
    from click.testing import CliRunner

    from soaes_core import read_jsonl, write_jsonl
    from soaes_distill.cli import main

    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [{"text": t} for t in TEXTS])
    held = tmp_path / "held.jsonl"
    held_prompt = "国有资本投资运营公司是国有资本市场化运作的专业平台吗？"  # shares 8-grams with a passage
    write_jsonl(held, [{"messages": [{"role": "user", "content": held_prompt}]}])
    out = tmp_path / "prompts.jsonl"
    res = CliRunner().invoke(main, ["domain-queries", str(corpus), "--held-out", str(held), "--out", str(out),
                                    "--max-queries", "50", "--num-terms", "8"])
    assert res.exit_code == 0, res.output
    prompts = read_jsonl(out)
    rejects = read_jsonl(f"{out}.rejects.jsonl")
    assert prompts and rejects and "kept" in res.output
    assert all(r["reason"].startswith("overlaps held-out prompt 0") for r in rejects)
    assert not any("国有资本市场化运作的专业平台" in p["prompt"] for p in prompts)


def test_short_held_out_prompt_is_rejected_by_exact_match() -> None:
    cfg = DomainQueryConfig(num_terms=12, max_queries=400, templates=("什么是{a}？",), decontam_ngram=8)
    terms = domain_terms(TEXTS, 12)
    held = [f"什么是{terms[0]}？"]  # shorter than 8 characters after normalisation for short terms
    res = build_domain_queries(TEXTS, held, cfg)
    assert held[0] not in {p["prompt"] for p in res.prompts}
    assert any(r["prompt"] == held[0] and r["reason"] == "overlaps held-out prompt 0" for r in res.rejects)
