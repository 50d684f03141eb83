"""The decoder choosing its block size each step (`SpeculativeDecoder` with no `num_speculative_tokens`): greedy output
equals plain greedy decoding whatever n each step takes (0 = a plain step) for every proposer, a calibration file
sets the target's projection path per row count, and the steps' block sizes are counted. Settings are checked once
(`DecodingSettings.validate`), whichever way they are given."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch

from soaes_core.errors import InvalidArgumentError
from soaes_specdec import DecodingSettings
from soaes_specdec.decoding import SpeculativeDecoder, autoregressive_generate
from soaes_specdec.draft import make_layer_draft
from soaes_specdec.session import DecodeSession
from soaes_specdec.testing import STREAM_WINS_COST_TABLE, identity_feature_draft, mixed_lookup_prompts

NEW = 20



@pytest.fixture(scope="module")
def target(qwen2_factory: Any) -> Any:
    return qwen2_factory(0, layers=2)


def plain(target: Any, batch: list[torch.Tensor]) -> list[list[int]]:
    return [autoregressive_generate(target, p, NEW).new_tokens() for p in batch]


@pytest.mark.parametrize("kind", ["layer", "feature", "layer+lookup", "feature+lookup"])
def test_greedy_equals_plain_with_the_block_size_changing_every_step(target: Any, monkeypatch: pytest.MonkeyPatch,
                                                                      kind: str) -> None:
    steps = itertools.count()
    schedule = (0, 3, 1, 0, 0, 2)
    monkeypatch.setattr(SpeculativeDecoder, "_choose_block_size",
                        lambda self, rows: schedule[next(steps) % len(schedule)])
    draft = identity_feature_draft(target, 0.5) if kind.startswith("feature") else make_layer_draft(target, 1)
    lookup = {"lookup_tokens": 4, "lookup_min_ngram": 2} if kind.endswith("lookup") else {}
    batch = mixed_lookup_prompts()
    out = SpeculativeDecoder(target, draft, 3, **lookup).generate(batch, NEW)
    assert [out.new_tokens(i) for i in range(len(batch))] == plain(target, batch)
    sizes = out.stats.block_sizes
    assert sizes.get(0, 0) > 0 and sum(c for n, c in sizes.items() if n > 0) > 0  # plain and speculative steps
    assert sum(sizes.values()) == out.stats.target_calls - 1  # one count per decode step (not the prefill)


def test_a_calibration_file_sets_the_paths_and_the_decoder_chooses_n(target: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Fed a table where streaming wins at every row count, the target streams 1-6 rows (no packing); the policy
    then picks n from the table and the draft's measured costs, and the output stays plain greedy decoding's."""
    monkeypatch.setenv("SOAES_CACHE", str(tmp_path / "cache"))  # the draft's table is measured and cached here
    (tmp_path / "host.yaml").write_text(STREAM_WINS_COST_TABLE, encoding="utf-8")
    decoder = SpeculativeDecoder(target, make_layer_draft(target, 1), calibration_file=str(tmp_path / "host.yaml"))
    assert decoder.settings.adaptive and decoder.num_speculative_tokens is None
    batch = mixed_lookup_prompts()[:2]
    out = decoder.generate(batch, NEW)
    assert [decoder.target.path_for_rows(r) for r in range(1, 7)] == ["stream"] * 6
    assert decoder.target.packed_rows == []
    assert [out.new_tokens(i) for i in range(2)] == plain(target, batch)
    assert sum(out.stats.block_sizes.values()) == out.stats.target_calls - 1
    assert set(out.stats.block_sizes) <= set(range(decoder.settings.max_speculative_tokens + 1))
    assert decoder.tracker is not None and sum(decoder.tracker.chosen.values()) == sum(out.stats.block_sizes.values())


def test_settings_are_one_dataclass_checked_once(target: Any) -> None:
    draft = make_layer_draft(target, 1)
    settings = DecodingSettings(num_speculative_tokens=2, lookup_tokens=3)
    assert SpeculativeDecoder(target, draft, settings=settings).settings is settings
    assert SpeculativeDecoder(target, draft, 2, lookup_tokens=3).settings == settings  # the keywords build one
    for kwargs, message in [({"num_speculative_tokens": 0}, "num_speculative_tokens must be an int >= 1"),
                            ({"lookup_tokens": -1}, "lookup_tokens must be an int >= 0"),
                            ({"lookup_mix": 0.5}, "needs lookup_tokens > 0"),
                            ({"num_speculative_tokens": 3, "lookup_tokens": 3, "lookup_extend": True},
                             r"lookup_tokens \(3\) must exceed num_speculative_tokens \(3\)"),
                            ({"lookup_min_ngram": 4}, "lookup_min_ngram <= lookup_max_ngram")]:
        with pytest.raises(InvalidArgumentError, match=message):
            DecodingSettings(**kwargs)
        n = kwargs.pop("num_speculative_tokens", None)
        with pytest.raises(InvalidArgumentError, match=message):
            SpeculativeDecoder(target, draft, n, **kwargs)
    with pytest.raises(InvalidArgumentError, match="not both"):
        SpeculativeDecoder(target, draft, 2, settings=settings)
    with pytest.raises(InvalidArgumentError, match="unexpected keyword argument 'lookup_tokenz'"):
        SpeculativeDecoder(target, draft, lookup_tokenz=3)


@pytest.mark.parametrize("kind", ["layer", "feature"])
@pytest.mark.parametrize("choice", ["policy", "schedule"])
def test_a_step_session_choosing_n_decodes_as_plain_greedy(target: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, kind: str,
                                                           choice: str) -> None:
    """A `DecodeSession` over the decoder choosing n (the policy with per-slot acceptance, or a forced schedule with
    plain steps): rows joining mid-way still decode as plain greedy decoding."""
    monkeypatch.setenv("SOAES_CACHE", str(tmp_path))  # the measured cost tables are cached here
    if choice == "schedule":
        steps = itertools.count()
        monkeypatch.setattr(SpeculativeDecoder, "_choose_block_size", lambda self, rows: (0, 2, 0, 1)[next(steps) % 4])
    draft = identity_feature_draft(target, 0.5) if kind == "feature" else make_layer_draft(target, 1)
    session = DecodeSession(SpeculativeDecoder(target, draft), max_rows=2, max_tokens=64)
    batch = mixed_lookup_prompts()
    out: dict[int, list[int]] = {session.add_row(batch[0], NEW): []}
    prompt_of = {0: batch[0]}
    step = 0
    while session.num_rows or step < 3:
        if step == 2:  # a row joins a running batch
            row = session.add_row(batch[1], NEW)
            out[row], prompt_of[row] = [], batch[1]
        for row, update in session.step().items():
            out[row].extend(update.tokens)
        step += 1
    for row, tokens in out.items():
        assert tokens == autoregressive_generate(target, prompt_of[row], NEW).new_tokens(), (kind, choice, row)
    assert sum(session.stats.block_sizes.values()) > 0
    if choice == "schedule":
        assert session.stats.block_sizes.get(0, 0) > 0
