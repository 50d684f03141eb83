"""The block-size policy (`block_policy`): expected tokens per ms from costs and acceptance, the n it chooses in
hand-computed cases, n = 0 where no draft pays, and the acceptance tracker's prior, window, probing and recovery."""

from __future__ import annotations

import itertools

import pytest

from soaes_core.errors import InvalidArgumentError
from soaes_specdec.block_policy import (
    AcceptanceTracker,
    choose_block_size,
    draft_cost,
    expected_tokens,
    expected_tokens_per_ms,
)
from soaes_specdec.cost_model import expected_accepted_length

# the issue's host (AMD EPYC Zen 4, 2 threads): ms per target pass by row count
STREAM = {1: 21.8, 2: 21.1, 3: 24.8, 4: 28.5, 5: 36.05, 6: 43.6}
PREPACKED_VERIFY = {1: 21.8, 2: 55.3, 3: 61.0, 4: 66.6, 5: 61.5, 6: 56.4}  # the bench's prepack: on, stream for 1 row


def linear_cost(base: float, per_row: float):
    return lambda rows: base + per_row * (rows - 1)


def test_expected_tokens_reuses_the_cost_model_and_generalises_it_per_position() -> None:
    for alpha in (0.0, 0.3, 0.8, 1.0):
        for n in range(6):
            assert expected_tokens(n, alpha) == pytest.approx(expected_accepted_length(alpha, n))
            assert expected_tokens(n, [alpha]) == pytest.approx(expected_accepted_length(alpha, n))
    assert expected_tokens(2, [0.8, 0.5]) == pytest.approx(1 + 0.8 + 0.8 * 0.5)
    assert expected_tokens(3, [0.8, 0.5]) == pytest.approx(1 + 0.8 + 0.4 + 0.2)  # the last rate carries on
    assert expected_tokens(0, [0.9]) == 1.0


def test_tokens_per_ms_by_hand() -> None:
    pass_ms, draft = linear_cost(20.0, 1.0), draft_cost(3.0, fixed_ms=1.0)
    assert expected_tokens_per_ms(0, 0.8, pass_ms, draft) == pytest.approx(1 / 20)
    assert expected_tokens_per_ms(2, 0.8, pass_ms, draft) == pytest.approx(2.44 / (22 + 1 + 6))
    # two rows, one never accepted: the pass costs 2 x (n+1) rows, the tokens come from both rows
    assert expected_tokens_per_ms(1, [0.0, 1.0], pass_ms, draft, batch=2) == pytest.approx((1 + 2) / (23 + 1 + 3))
    # only the listed (active) rows emit tokens, the pass still costs the whole batch
    assert expected_tokens_per_ms(0, [0.5], pass_ms, draft, batch=2) == pytest.approx(1 / 21)


def test_choose_block_size_picks_the_argmax_computed_by_hand() -> None:
    pass_ms, draft = linear_cost(20.0, 1.0), draft_cost(3.0)
    # alpha 0.8: n=2 2.44/28=.0871, n=3 2.952/32=.0923, n=4 3.3616/36=.0934, n=5 3.6893/40=.0922; plain 1/20=.05
    assert choose_block_size(0.8, pass_ms, draft, n_max=5) == 4
    assert choose_block_size(0.8, pass_ms, draft, n_max=3) == 3
    # a cheaper draft makes longer blocks pay: with 1 ms per token n=5 (3.689/30) beats n=4 (3.362/28)
    assert choose_block_size(0.8, pass_ms, draft_cost(1.0), n_max=5) == 5
    assert choose_block_size(0.8, pass_ms, draft, n_max=0) == 0


def test_the_issues_host_speculates_with_streamed_verifies_and_not_with_prepacked_ones() -> None:
    draft = draft_cost(3.0)
    # acceptance 0.46: stream n=1 1.46/24.1=.0606 > plain 1/21.8=.0459; n=2 1.6716/30.8=.0543
    assert choose_block_size(0.46, STREAM.__getitem__, draft) == 1
    # prepacked 2-row verify at 55.3 ms: n=1 gives 1.46/58.3=.025, no n pays: plain decoding
    assert choose_block_size(0.46, PREPACKED_VERIFY.__getitem__, draft) == 0


def test_zero_when_the_draft_cannot_pay() -> None:
    assert choose_block_size(0.0, STREAM.__getitem__, draft_cost(0.5)) == 0  # nothing is ever accepted
    assert choose_block_size(0.3, linear_cost(20.0, 20.0), draft_cost(2.0)) == 0  # verify costs 2x a step
    assert choose_block_size(0.9, STREAM.__getitem__, draft_cost(25.0)) == 0  # the draft costs a target pass


def test_min_gain_keeps_plain_decoding_on_a_marginal_win() -> None:
    pass_ms = {1: 20.0, 2: 20.0}.__getitem__
    draft = draft_cost(0.0, fixed_ms=0.2 * 20.0)  # n=1 costs 24 ms
    # alpha 0.21: 1.21/24 = 0.0504 vs plain 0.05: a 0.8 % gain
    assert choose_block_size(0.21, pass_ms, draft, n_max=1, min_gain=0.0) == 1
    assert choose_block_size(0.21, pass_ms, draft, n_max=1) == 0


def test_bad_policy_arguments_are_refused_in_one_line() -> None:
    cases = [(lambda: expected_tokens(-1, 0.5), "block size n must be >= 0"),
             (lambda: expected_tokens(2, 1.5), "acceptance rates must lie in [0, 1]"),
             (lambda: expected_tokens(2, []), "at least one rate"),
             (lambda: choose_block_size(0.5, STREAM.__getitem__, draft_cost(1.0), n_max=-1), "n_max must be >= 0"),
             (lambda: draft_cost(-1.0), "draft costs must be >= 0"),
             (lambda: expected_tokens_per_ms(0, 0.5, lambda r: 0.0, draft_cost(1.0)), "must cost > 0 ms"),
             (lambda: AcceptanceTracker(1, n_max=0), "n_max >= 1"),
             (lambda: AcceptanceTracker(0), "batch must be >= 1")]
    for call, message in cases:
        with pytest.raises(InvalidArgumentError, match=message.replace("[", r"\[").replace("]", r"\]")):
            call()


def test_tracker_starts_at_the_prior_and_learns_per_row_and_position() -> None:
    tracker = AcceptanceTracker(2, n_max=3, prior=0.6, prior_weight=4.0, window=8)
    assert tracker.estimates() == [pytest.approx([0.6] * 3)] * 2
    for _ in range(8):  # row 0: drafts 1-2 accepted, 3 rejected; row 1: draft 1 rejected
        tracker.update([3, 3], [2, 0])
    row0, row1 = tracker.estimates()
    assert row0[0] > 0.8 and row0[1] > 0.8 and row0[2] < 0.5
    assert row1[0] < 0.3
    assert row1[1] == pytest.approx(row1[2])  # never tried: the row's pooled rate
    tracker.update([3, 3], [3, 3], active=[True, False])  # an inactive row learns nothing
    assert tracker.estimates()[1] == pytest.approx(row1)
    for _ in range(8):  # the window forgets: row 1 now accepts everything
        tracker.update([3, 3], [3, 3])
    assert min(tracker.estimates()[1]) > 0.8
    with pytest.raises(InvalidArgumentError, match="update needs 2 rows"):
        tracker.update([3], [1])
    with pytest.raises(InvalidArgumentError, match="row 0: 4 accepted of 3 proposed"):
        tracker.update([3, 3], [4, 0])


def test_tracker_drops_to_plain_probes_and_recovers() -> None:
    pass_ms, draft = STREAM.__getitem__, draft_cost(3.0)
    tracker = AcceptanceTracker(1, n_max=5, window=16, probe_start=4, probe_max=16)
    assert tracker.choose(pass_ms, draft) >= 1  # the prior (0.6) pays on this host
    steps, probes_at = 0, []
    for steps in range(1, 200):  # the draft stops matching: everything is rejected
        n = tracker.choose(pass_ms, draft)
        if n:
            tracker.update([n], [0])
            if tracker.estimates()[0][0] < 0.1:
                probes_at.append(steps)
        if len(probes_at) >= 4:
            break
    assert tracker.chosen[0] > 0 and tracker.probes >= 3
    gaps = [b - a for a, b in itertools.pairwise(probes_at)]
    assert gaps == sorted(gaps) and gaps[-1] <= 16 + 1  # probing backs off, up to probe_max plain steps
    recovered = None
    for step in range(200):  # the draft matches again: the next probes see it and speculation resumes
        n = tracker.choose(pass_ms, draft)
        if n:
            tracker.update([n], [n])
        if n and tracker.estimates()[0][0] > 0.5:
            recovered = step
            break
    assert recovered is not None and recovered <= 3 * 16
    assert all(tracker.choose(pass_ms, draft) >= 1 for _ in range(3))


def test_tracker_never_probes_when_even_perfect_acceptance_loses() -> None:
    tracker = AcceptanceTracker(1, n_max=3, probe_start=2, probe_max=4)
    expensive = linear_cost(10.0, 100.0)  # a 2-row verify costs 11 one-row steps
    assert all(tracker.choose(expensive, draft_cost(1.0)) == 0 for _ in range(50))
    assert tracker.probes == 0 and tracker.chosen == {0: 50}


def test_tracker_carries_what_it_learnt_into_the_next_sequences() -> None:
    pass_ms, draft = linear_cost(21.0, 2.0), draft_cost(3.0)
    tracker = AcceptanceTracker(1, n_max=3, prior=0.6, window=16)
    for _ in range(12):  # a draft that never matches
        tracker.update([1], [0])
    tracker.reset(2)  # new prompts, two rows: they start from the learnt rate, not the prior
    assert tracker.batch == 2 and all(e[0] < 0.3 for e in tracker.estimates())
    assert tracker.choose(pass_ms, draft) == 0
    tracker.reset(1, forget=True)
    assert tracker.estimates() == [pytest.approx([0.6] * 3)]
    assert tracker.choose(pass_ms, draft) >= 1
