"""Speculative decoding with prompt lookup beside the draft (`SpeculativeDecoder(lookup_tokens=...)`): greedy output
equals plain decoding with layer and feature drafts in batches whose rows mix lookup and draft blocks; the layer
draft's cache stays right after lookup blocks (its proposals equal uncached greedy drafting); the lookup counters;
the bench method; refusals. (Sampling exactness with lookup: test_specdec_decoding_chisq.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from soaes_core.errors import InvalidArgumentError
from soaes_specdec.bench import BenchConfig
from soaes_specdec.decoding import SpecStats, SpeculativeDecoder, autoregressive_generate
from soaes_specdec.proposers import LayerDraftProposer
from soaes_specdec.testing import identity_feature_draft as feature_draft
from soaes_specdec.testing import mixed_lookup_prompts

NEW = 40




@pytest.fixture(scope="module")
def target(qwen2_factory: Any) -> Any:
    return qwen2_factory(0, layers=1)


@pytest.mark.parametrize("kind", ["layer", "feature"])
@pytest.mark.parametrize(("n", "lookup", "min_ngram"), [(1, 3, 1), (3, 2, 2), (2, 4, 2)])
def test_lookup_greedy_equals_plain(target: Any, qwen2_factory: Any, kind: str, n: int, lookup: int,
                                    min_ngram: int) -> None:
    draft = feature_draft(target, 0.02) if kind == "feature" else qwen2_factory(4, layers=1)
    batch = mixed_lookup_prompts()
    reference = [autoregressive_generate(target, p, NEW).new_tokens() for p in batch]
    decoder = SpeculativeDecoder(target, draft, n, lookup_tokens=lookup, lookup_min_ngram=min_ngram)
    for i, p in enumerate(batch):
        assert decoder.generate(p, NEW).new_tokens() == reference[i]
    out = decoder.generate(batch, NEW)
    assert [out.new_tokens(i) for i in range(3)] == reference
    stats = out.stats
    assert 0 < stats.lookup_proposed < stats.proposed  # both sources proposed in this batch
    assert 0 <= stats.lookup_accepted <= stats.lookup_proposed and stats.accepted <= stats.proposed
    assert len(stats.acceptance_by_position) == max(n, lookup)
    plain = SpeculativeDecoder(target, draft, n).generate(batch, NEW).stats
    assert plain.lookup_proposed == 0 and plain.lookup_accepted == 0


@pytest.mark.parametrize("kind", ["layer", "feature"])
@pytest.mark.parametrize(("n", "lookup"), [(1, 4), (2, 3)])
def test_lookup_extending_the_draft_greedy_equals_plain(target: Any, qwen2_factory: Any, kind: str, n: int,
                                                        lookup: int) -> None:
    """`lookup_extend`: draft tokens followed by lookup tokens where text + drafts repeats an n-gram (1-grams here,
    so extensions are frequent); the layer draft's cache catches up on accepted extension tokens it never saw."""
    draft = feature_draft(target, 0.02) if kind == "feature" else qwen2_factory(4, layers=1)
    batch = mixed_lookup_prompts()
    reference = [autoregressive_generate(target, p, NEW).new_tokens() for p in batch]
    decoder = SpeculativeDecoder(target, draft, n, lookup_tokens=lookup, lookup_min_ngram=1, lookup_extend=True)
    for i, p in enumerate(batch):
        assert decoder.generate(p, NEW).new_tokens() == reference[i]
    out = decoder.generate(batch, NEW)
    assert [out.new_tokens(i) for i in range(3)] == reference
    plain = SpeculativeDecoder(target, draft, n, lookup_tokens=lookup, lookup_min_ngram=1).generate(batch, NEW)
    assert out.stats.proposed > plain.stats.proposed  # the extensions proposed more tokens
    # under sampling the extension and the mixture both apply (exactness: test_specdec_decoding_chisq.py)
    sampled = SpeculativeDecoder(target, draft, n, lookup_tokens=lookup, lookup_min_ngram=1, lookup_extend=True,
                                 lookup_mix=0.5).generate(batch, NEW, do_sample=True, top_p=0.7,
                                                          generator=torch.Generator().manual_seed(0))
    assert all(len(sampled.new_tokens(i)) == NEW for i in range(3))


def test_lookup_blocks_leave_the_layer_drafts_cache_right(target: Any, qwen2_factory: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """After blocks proposed by lookup (whose verified tokens the draft never proposed), every draft proposal still
    equals greedy drafting by the uncached draft on the row's true prefix."""
    draft = qwen2_factory(4, layers=1)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = LayerDraftProposer.draft_tokens

    def wrapped(self: Any, rows: Any, *args: Any, **kwargs: Any) -> Any:
        lengths = rows.lengths.clone()
        drafts, probs = original(self, rows, *args, **kwargs)
        seen.append((lengths, drafts.clone()))
        return drafts, probs

    monkeypatch.setattr(LayerDraftProposer, "draft_tokens", wrapped)
    batch = mixed_lookup_prompts()
    out = SpeculativeDecoder(target, draft, 3, lookup_tokens=3, lookup_min_ngram=2).generate(batch, NEW)
    assert out.stats.lookup_proposed > 0
    checked = 0
    with torch.inference_mode():
        for b in range(3):
            seq = out.sequences[b, :out.sequence_lengths[b]].tolist()
            for lengths, drafts in seen:
                length = int(lengths[b])
                if length >= out.sequence_lengths[b]:
                    continue
                ids = seq[:length]
                for j in range(drafts.shape[1]):
                    token = int(draft(torch.tensor([ids])).logits[0, -1].argmax())
                    assert token == int(drafts[b, j]), (b, length, j)
                    ids.append(token)
                    checked += 1
    assert checked > 30


def test_stats_count_lookup_apart_and_add_up() -> None:
    a = SpecStats(proposed=10, accepted=6, lookup_proposed=4, lookup_accepted=3)
    b = SpecStats(proposed=5, accepted=1, lookup_proposed=2, lookup_accepted=0)
    total = a + b
    assert (total.lookup_proposed, total.lookup_accepted) == (6, 3)
    assert total.to_dict()["lookup_proposed"] == 6


def test_lookup_refuses_bad_arguments_in_one_line(target: Any, qwen2_factory: Any) -> None:
    draft = qwen2_factory(4, layers=1)
    for kwargs, words in (({"lookup_tokens": -1}, "lookup_tokens must be an int >= 0"),
                          ({"lookup_tokens": 2, "lookup_min_ngram": 4, "lookup_max_ngram": 3},
                           "lookup_min_ngram <= lookup_max_ngram"),
                          ({"lookup_tokens": 2, "lookup_min_ngram": 0}, "lookup_min_ngram"),
                          ({"lookup_tokens": 2, "lookup_extend": True}, "lookup_tokens (2) must exceed"),
                          ({"lookup_tokens": 3, "lookup_extend": 1}, "lookup_extend must be true or false"),
                          ({"lookup_tokens": 3, "lookup_mix": 1.0}, "lookup_mix must be a number in [0, 1)"),
                          ({"lookup_mix": 0.5}, "it needs lookup_tokens > 0")):
        with pytest.raises(InvalidArgumentError) as err:
            SpeculativeDecoder(target, draft, 2, **kwargs)
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="lookup_min_ngram <= lookup_max_ngram"):  # the same check in the bench
        BenchConfig(methods=["speculative_lookup"], lookup_tokens=2, lookup_min_ngram=4, lookup_max_ngram=3)


@pytest.mark.parametrize("kind", ["layer", "feature"])
def test_lookup_batch_invariant_bfloat16_equals_plain_batch_one(qwen2_factory: Any, kind: str) -> None:
    target = qwen2_factory(0, layers=1).to(torch.bfloat16)
    draft = feature_draft(target, 0.02) if kind == "feature" else qwen2_factory(4, layers=1).to(torch.bfloat16)
    batch = mixed_lookup_prompts()
    reference = [autoregressive_generate(target, p, NEW).new_tokens() for p in batch]
    out = SpeculativeDecoder(target, draft, 2, batch_invariant=True, lookup_tokens=4).generate(batch, NEW)
    assert [out.new_tokens(i) for i in range(len(batch))] == reference
    assert out.stats.lookup_proposed > 0
