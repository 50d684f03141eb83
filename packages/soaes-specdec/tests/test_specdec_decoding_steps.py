"""The step API (`session.DecodeSession`): rows joining and leaving between steps decode exactly as batch-1 plain
decoding (greedy), a sampling row's tokens depend only on its seed (not on the other rows), and sampled rows follow
the target's distribution (chi-square, as test_specdec_decoding_chisq)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from soaes_core.errors import InvalidArgumentError
from soaes_specdec import session as session_module
from soaes_specdec.decoding import SpeculativeDecoder, autoregressive_generate
from soaes_specdec.draft import make_layer_draft
from soaes_specdec.sampling import SamplingParams
from soaes_specdec.session import DecodeSession
from soaes_specdec.testing import identity_feature_draft


@pytest.fixture(scope="module")
def target(qwen2_factory: Any) -> Any:
    return qwen2_factory(0, layers=3)


def prompts(lengths: tuple[int, ...], seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 512, (n,), generator=g) for n in lengths]


def decoder_of(kind: str, target: Any) -> Any:
    if kind == "plain":
        return target
    if kind == "layer":
        return SpeculativeDecoder(target, make_layer_draft(target, 1), 3)
    if kind == "feature":
        return SpeculativeDecoder(target, identity_feature_draft(target, 0.5), 3)
    return SpeculativeDecoder(target, make_layer_draft(target, 1), 2, lookup_tokens=4)  # "lookup"


def run_schedule(session: DecodeSession, joins: dict[int, list[tuple[torch.Tensor, int, SamplingParams, int]]],
                 cancel: dict[int, int] | None = None) -> dict[int, list[int]]:
    """Add rows at the given step numbers, cancel row ids at others; step until every row is done."""
    out: dict[int, list[int]] = {}
    step, cancel = 0, cancel or {}
    while step <= max(joins) or session.num_rows:
        for prompt, new, params, seed in joins.get(step, []):
            out[session.add_row(prompt, new, params, seed)] = []
        if step in cancel and cancel[step] in session.row_ids:
            session.remove_row(cancel[step])
        for row, update in session.step().items():
            out[row].extend(update.tokens)
        step += 1
    return out


@pytest.mark.parametrize("kind", ["plain", "layer", "feature", "lookup"])
def test_rows_joining_and_leaving_decode_as_plain_greedy(target: Any, kind: str) -> None:
    lookup_prompt = torch.tensor([7, 8, 9, 10] * 3)
    ps = [*prompts((3, 9, 5, 6)), lookup_prompt]
    news = [20, 7, 15, 11, 18]
    session = DecodeSession(decoder_of(kind, target), max_rows=3, max_tokens=64)
    greedy = SamplingParams()
    joins = {0: [(ps[0], news[0], greedy, 0)], 2: [(ps[1], news[1], greedy, 0), (ps[2], news[2], greedy, 0)],
             5: [(ps[3], news[3], greedy, 0)], 9: [(ps[4], news[4], greedy, 0)]}
    out = run_schedule(session, joins, cancel={4: 2})  # row 2 is cancelled mid-way; rows 3 and 4 reuse its slot
    for row in (0, 1, 3, 4):
        assert out[row] == autoregressive_generate(target, ps[row], news[row]).new_tokens(), (kind, row)
    reference = autoregressive_generate(target, ps[2], news[2]).new_tokens()
    assert 0 < len(out[2]) < news[2] and out[2] == reference[:len(out[2])]
    if kind != "plain":
        assert session.stats.proposed > 0 and session.last_block_size > 0


def test_rows_stop_at_eos_with_their_reason(target: Any) -> None:
    p = prompts((4,))[0]
    plain = autoregressive_generate(target, p, 12).new_tokens()
    eos = plain[5]
    cut = plain.index(eos) + 1
    session = DecodeSession(decoder_of("layer", target), max_rows=2, max_tokens=40, eos_token_id=eos)
    a, b = session.add_row(p, 12), session.add_row(prompts((6,), seed=9)[0], 3)
    tokens: dict[int, list[int]] = {a: [], b: []}
    reasons = {}
    while session.num_rows:
        for row, update in session.step().items():
            tokens[row].extend(update.tokens)
            if update.finished:
                reasons[row] = update.finish_reason
    assert tokens[a] == plain[:cut] and reasons[a] == "stop"
    assert len(tokens[b]) == 3 and (reasons[b] == "length" or tokens[b][-1] == eos)
    assert session.free_rows == 2


@pytest.mark.parametrize("kind", ["plain", "layer", "feature", "lookup"])
def test_sampled_row_depends_on_its_seed_only(target: Any, kind: str) -> None:
    p, others = torch.tensor([5, 6, 7, 5, 6, 7, 5, 6]), prompts((4, 7))
    hot = SamplingParams(True, 1.0, 0.95)
    alone = run_schedule(DecodeSession(decoder_of(kind, target), 4, 64), {0: [(p, 24, hot, 11)]})[0]
    crowd = run_schedule(DecodeSession(decoder_of(kind, target), 4, 64), {
        0: [(others[0], 10, SamplingParams(True, 0.7, 0.8), 3)],
        1: [(p, 24, hot, 11)],
        3: [(others[1], 30, SamplingParams(), 0)]})[1]
    again = run_schedule(DecodeSession(decoder_of(kind, target), 4, 64), {0: [(p, 24, hot, 12)]})[0]
    assert alone == crowd
    assert len(alone) == 24 and again != alone


def test_bad_rows_are_refused(target: Any) -> None:
    session = DecodeSession(target, max_rows=1, max_tokens=16)
    with pytest.raises(InvalidArgumentError, match="exceeds"):
        session.add_row(torch.arange(2, 12), 7)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        session.add_row(torch.arange(2, 5), 0)
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        session.add_row(torch.tensor([2, 10_000]), 3)
    session.add_row(torch.arange(2, 5), 3)
    with pytest.raises(InvalidArgumentError, match="full"):
        session.add_row(torch.arange(2, 5), 3)
    with pytest.raises(InvalidArgumentError, match="no row"):
        session.remove_row(99)
    with pytest.raises(InvalidArgumentError, match="context"):
        DecodeSession(target, max_rows=1, max_tokens=10_000)


# ------------------------------------------------------------------------------------------- distribution

def _chisq_module() -> Any:
    """The chi-square helpers of test_specdec_decoding_chisq.py (its 3-token exact joint and pooled test)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("chisq", Path(__file__).with_name("test_specdec_decoding_chisq.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CHISQ = _chisq_module()
VOCAB, NEW, PROMPT = _CHISQ.VOCAB, _CHISQ.NEW, _CHISQ.PROMPT
SAMPLES = 1500  # rows joined one by one: fewer than the batched test's
exact_joint, chi_square_p = _CHISQ.exact_joint, _CHISQ.chi_square_p
pair = _CHISQ.pair


def sample_session(target: Any, draft: Any, params: SamplingParams) -> torch.Tensor:
    """SAMPLES rows of NEW tokens, each its own request (seed = its index), all in one session."""
    session = DecodeSession(SpeculativeDecoder(target, draft, 2), max_rows=SAMPLES, max_tokens=16)
    rows = {session.add_row(PROMPT, NEW, params, seed=i): [] for i in range(SAMPLES)}
    while session.num_rows:
        for row, update in session.step().items():
            rows[row].extend(update.tokens)
    return torch.tensor([rows[r] for r in sorted(rows)])


@pytest.mark.parametrize("top_p", [0.8])
def test_session_sampling_matches_target_distribution(pair: tuple[Any, Any], top_p: float) -> None:
    target, draft = pair
    params = SamplingParams(True, 1.0, top_p)
    assert chi_square_p(sample_session(target, draft, params), exact_joint(target, params)) > 1e-3


def test_per_step_seeds_that_ignore_the_position_fail_the_same_test(pair: tuple[Any, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    target, draft = pair
    params = SamplingParams(True, 1.0, 1.0)
    real = session_module.row_stream_seed
    monkeypatch.setattr(session_module, "row_stream_seed", lambda seed, position, stream: real(seed, 0, stream))
    assert chi_square_p(sample_session(target, draft, params), exact_joint(target, params)) < 1e-3
