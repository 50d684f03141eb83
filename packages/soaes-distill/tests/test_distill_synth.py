"""Black-box SFT data and Magpie-style synthetic queries from a (tiny) target; filters account for all."""

from __future__ import annotations

import torch

from soaes_core import encode_chat_prompt
from soaes_distill.synth import (
    QueryFilter,
    blackbox_sft_records,
    chat_records_to_examples,
    filter_queries,
    magpie_generate,
    pre_query_prefix,
)
from soaes_specdec.decoding import autoregressive_generate


def test_pre_query_prefix_is_chatml_user_start(embedded_tokenizer) -> None:
    prefix = pre_query_prefix(embedded_tokenizer, system="You are an expert on state-owned assets.")
    assert prefix.endswith("<|im_start|>user\n")
    assert "state-owned assets" in prefix


def test_blackbox_records_are_target_greedy_outputs(tiny_qwen2, embedded_tokenizer) -> None:
    prompts = [{"id": "a", "prompt": "什么是国有资产？"}, {"id": "b", "prompt": "Explain dividends."}]
    records = blackbox_sft_records(tiny_qwen2, embedded_tokenizer, prompts, max_new_tokens=8)
    assert [r["id"] for r in records] == ["a", "b"]
    ids = encode_chat_prompt(embedded_tokenizer, "什么是国有资产？")
    ref = autoregressive_generate(tiny_qwen2, torch.tensor([ids]), max_new_tokens=8, eos_token_id=[2])
    assert records[0]["messages"][1]["content"] == embedded_tokenizer.decode(
        [t for t in ref.new_tokens(0) if t != 2], skip_special_tokens=True).strip()
    rejects: list = []
    examples = chat_records_to_examples(embedded_tokenizer, records, max_length=64, rejects=rejects)
    assert len(examples) + len(rejects) == 2
    for ex in examples:
        assert ex.labels[0] == -100 and any(lab != -100 for lab in ex.labels)


def test_query_filters_account_for_every_query() -> None:
    queries = ["hi", "什么是国有资本投资公司？请详细说明。", "什么是国有资本投资公司？请详细说明！",
               "How are dividends paid to the state?", "x" * 500]
    kept, rejects = filter_queries(queries, QueryFilter(min_chars=5, max_chars=100, language="zh"))
    assert kept == ["什么是国有资本投资公司？请详细说明。"]
    reasons = sorted(r["reason"].split(" ")[0] for r in rejects)
    assert reasons == ["near-duplicate", "not", "too", "too"]
    kept_any, _ = filter_queries(queries, QueryFilter(min_chars=5, max_chars=100, language="any"))
    assert len(kept_any) == 2


def test_magpie_generation_accounts_for_all(tiny_qwen2, embedded_tokenizer) -> None:
    res = magpie_generate(tiny_qwen2, embedded_tokenizer, num_queries=4, max_query_tokens=12, max_answer_tokens=6,
                          flt=QueryFilter(min_chars=1, language="any", dedup_jaccard=1.0), seed=3)
    assert res.generated == 4
    assert len(res.records) + len(res.rejects) == 4
    assert all(r["source"] == "magpie" and r["messages"][0]["role"] == "user" for r in res.records)
