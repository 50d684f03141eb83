"""Prepacked verification (`CachedCausalLM.prepack`, `SpeculativeDecoder(prepack=True)`): packed passes give the
unpacked logits up to float rounding, only the packed row counts use the packs, padding is measured and never
verified, greedy output still equals plain decoding (with lookup blocks padded to a packed count), and the
combinations that cannot work are refused in one line. Packing changes only how the logits are rounded, not the
verification math that the chi-square tests cover (test_specdec_decoding_chisq.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from soaes_core.errors import InvalidArgumentError
from soaes_specdec import runner as runner_mod
from soaes_specdec.decoding import (
    PromptLookupDecoder,
    SpeculativeDecoder,
    autoregressive_generate,
    padded_block_width,
    prepack_rows,
)
from soaes_specdec.runner import CachedCausalLM, prepack_available
from soaes_specdec.testing import identity_feature_draft as feature_draft
from soaes_specdec.testing import mixed_lookup_prompts

needs_mkl_pack = pytest.mark.skipif(not prepack_available(torch.device("cpu"), torch.float32),
                                    reason="this torch has no MKL packed GEMM (torch.ops.mkl._mkl_linear)")
NEW = 40


@pytest.fixture(scope="module")
def target(qwen2_factory: Any) -> Any:
    return qwen2_factory(0, layers=2)


def test_prepack_rows_are_batch_times_block() -> None:
    assert prepack_rows(1, (1, 5)) == [2, 6]
    assert prepack_rows(3, (2, 2, 0)) == [9]


@needs_mkl_pack
def test_packed_passes_equal_unpacked_logits(target: Any) -> None:
    plain, packed = CachedCausalLM(target), CachedCausalLM(target)
    assert packed.prepack([3, 6]) == [3, 6]
    assert packed.prepacked_bytes() == 2 * sum(m.weight.numel() * 4 for m in packed._packable())
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, 512, (1, 12), generator=g)
    for runner in (plain, packed):
        runner.start(1, 32)
        runner.forward(prompt, torch.zeros(1, dtype=torch.long), need_logits=False)
    for rows in (1, 2, 3, 6):
        block = torch.randint(2, 512, (1, rows), generator=g)
        start = torch.full((1,), 12, dtype=torch.long)
        a, b = plain.forward(block, start), packed.forward(block, start)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@needs_mkl_pack
def test_only_packed_row_counts_use_the_packs(target: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CachedCausalLM(target)
    runner.prepack([4])
    calls: list[int] = []
    real = runner_mod.packed_linear

    def counting(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(args[-1])
        return real(x, *args)

    monkeypatch.setattr(runner_mod, "packed_linear", counting)
    runner.start(1, 16)
    runner.forward(torch.tensor([[5, 6, 7]]), torch.zeros(1, dtype=torch.long))
    assert calls == []
    runner.forward(torch.tensor([[5, 6, 7, 8]]), torch.full((1,), 3, dtype=torch.long))
    projections = sum(1 for m in runner._packable())
    assert calls == [4] * projections  # every layer's projections and the head


@needs_mkl_pack
def test_padding_follows_the_measured_table(target: Any) -> None:
    runner = CachedCausalLM(target)
    runner.prepack([2, 6])
    assert runner.pass_rows(2) == 2 and runner.pass_rows(6) == 6 and runner.pass_rows(7) == 7
    runner._pad_to = {4: 6, 5: 6}  # what the reference box measured (docs/benchmarks.md)
    assert padded_block_width(runner, 1, 3, 5) == 5  # 4 rows run as 6
    assert padded_block_width(runner, 1, 3, 4) == 3  # never wider than the cache's block
    assert padded_block_width(runner, 1, 1, 5) == 1 and padded_block_width(runner, 1, 0, 5) == 0
    assert padded_block_width(runner, 2, 1, 5) == 2  # batch 2 x 2 rows = 4 -> 6 rows = 2 x 3
    runner.clear_prepack()
    assert runner.packed_rows == [] and runner.pass_rows(4) == 4


@needs_mkl_pack
@pytest.mark.parametrize("kind", ["layer", "feature"])
def test_prepacked_greedy_equals_plain(target: Any, qwen2_factory: Any, kind: str) -> None:
    draft = feature_draft(target, 0.02) if kind == "feature" else qwen2_factory(4, layers=1)
    batch = mixed_lookup_prompts()
    reference = [autoregressive_generate(target, p, NEW).new_tokens() for p in batch]
    runner = CachedCausalLM(target)
    decoder = SpeculativeDecoder(runner, draft, 1, lookup_tokens=5, lookup_min_ngram=2, prepack=True)
    for i, p in enumerate(batch):
        assert decoder.generate(p, NEW).new_tokens() == reference[i]
    runner._pad_to = {r: 6 for r in range(3, 6)}  # force padded lookup blocks whatever this machine measured
    for i, p in enumerate(batch):
        out = decoder.generate(p, NEW)
        assert out.new_tokens() == reference[i]
    assert runner.packed_rows == [2, 6]
    out = decoder.generate(batch[:2], NEW)
    assert [out.new_tokens(i) for i in range(2)] == reference[:2]
    assert runner.packed_rows == [2, 4, 6, 12]  # batch 2: 2 x 2 and 2 x 6 rows
    out = decoder.generate(batch, NEW)
    assert [out.new_tokens(i) for i in range(3)] == reference
    assert runner.packed_rows == [2, 4, 6, 12]  # batch 3: 6 rows packed already, 18 is over STREAM_MAX_ROWS
    lookup = PromptLookupDecoder(runner, 3, prepack=True)
    assert [lookup.generate(p, NEW).new_tokens() for p in batch] == reference
    assert 4 in runner.packed_rows


def test_prepack_is_refused_in_one_line_where_it_cannot_work(qwen2_factory: Any) -> None:
    bf16 = qwen2_factory(0, layers=1).to(torch.bfloat16)
    draft = qwen2_factory(4, layers=1).to(torch.bfloat16)
    checks = [(lambda: SpeculativeDecoder(bf16, draft, 2, prepack=True), "prepack needs float32 weights"),
              (lambda: PromptLookupDecoder(bf16, 2, prepack=True), "prepack needs float32 weights"),
              (lambda: CachedCausalLM(bf16).prepack([2]), "prepack needs float32 weights"),
              (lambda: SpeculativeDecoder(qwen2_factory(0, layers=1), qwen2_factory(4, layers=1), 2,
                                          batch_invariant=True, prepack=True), "batch-invariant"),
              (lambda: SpeculativeDecoder(bf16, draft, 2, prepack="yes"), "prepack must be true or false")]
    for make, words in checks:
        with pytest.raises(InvalidArgumentError) as err:
            make()
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
