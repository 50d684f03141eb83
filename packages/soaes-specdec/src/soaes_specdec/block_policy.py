"""Choosing the speculative block size n each step: the n in 0..n_max with the most expected tokens per ms, from the
host's measured pass costs and a running acceptance estimate; n = 0 (plain decoding) when no n pays.

Pure functions and one small stateful tracker; no model, no torch. The API the decoder uses:

- `expected_tokens(n, acceptance)`: expected tokens one step emits for one row (accepted drafts + the bonus).
- `expected_tokens_per_ms(n, acceptance, pass_ms, draft_ms, batch=1)`: tokens per ms of a step with block size n.
- `choose_block_size(acceptance, pass_ms, draft_ms, n_max, batch, min_gain) -> int`: the best n, 0 unless some
  n >= 1 beats plain decoding by more than `min_gain` (a fraction), so estimation noise does not cost speed.
- `draft_cost(per_step_ms, fixed_ms)`: the draft's cost of proposing n tokens, as `draft_ms` wants it.
- `AcceptanceTracker`: per-row, per-draft-position acceptance over a window, shrunk towards a prior; `update` after
  each verify, `choose` before each step (it probes n >= 1 now and then after choosing 0, so it can recover).

Costs: `pass_ms(rows)` is the target's ms for one forward pass of `rows` rows (a verify of n drafts in a batch of B
rows is B*(n+1) rows; plain decoding is B rows, one token each); `draft_ms(n)` the draft's ms to propose n tokens
per row (0 for n = 0). `acceptance` is a float (every row, every position) or one entry per row, each a float
(i.i.d. acceptance) or a list of per-position conditional acceptance rates (position i accepted given 1..i-1 were;
positions past the list reuse its last rate).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Union

from soaes_core.errors import InvalidArgumentError

from .cost_model import expected_accepted_length

DEFAULT_N_MAX = 5
"""The largest block size the decoder considers by default (a batch-1 verify then has at most 6 rows)."""

RowAcceptance = Union[float, Sequence[float]]
Acceptance = Union[float, Sequence[RowAcceptance]]
PassCost = Callable[[int], float]
DraftCost = Callable[[int], float]


def draft_cost(per_step_ms: float, fixed_ms: float = 0.0) -> DraftCost:
    """`draft_ms` for a draft that costs `per_step_ms` per proposed token (per step over the whole batch) plus
    `fixed_ms` once per block (its catch-up, say); nothing for n = 0."""
    if per_step_ms < 0 or fixed_ms < 0:
        raise InvalidArgumentError(f"draft costs must be >= 0 ms, got per_step_ms={per_step_ms}, fixed_ms={fixed_ms}")
    return lambda n: 0.0 if n <= 0 else fixed_ms + n * per_step_ms


def _check_rate(a: float) -> float:
    if not 0.0 <= a <= 1.0:
        raise InvalidArgumentError(f"acceptance rates must lie in [0, 1], got {a}")
    return float(a)


def expected_tokens(n: int, acceptance: RowAcceptance) -> float:
    """Expected tokens one row emits in a step with n drafts: 1 + sum_k prod_{i<=k} a_i (the bonus token always;
    draft k only when drafts 1..k are accepted). A float is i.i.d. acceptance (`expected_accepted_length`)."""
    if n < 0:
        raise InvalidArgumentError(f"block size n must be >= 0, got {n}")
    if isinstance(acceptance, (int, float)):
        return expected_accepted_length(_check_rate(acceptance), n)
    rates = [_check_rate(a) for a in acceptance]
    if not rates:
        raise InvalidArgumentError("per-position acceptance needs at least one rate")
    total, reach = 1.0, 1.0
    for k in range(n):
        reach *= rates[min(k, len(rates) - 1)]
        total += reach
    return total


def _rows(acceptance: Acceptance, batch: int) -> list[RowAcceptance]:
    if isinstance(acceptance, (int, float)):
        return [float(acceptance)] * batch
    return list(acceptance)


def expected_tokens_per_ms(n: int, acceptance: Acceptance, pass_ms: PassCost, draft_ms: DraftCost,
                           batch: int = 1) -> float:
    """Expected tokens per ms of one step with block size n over a pass of `batch` rows (n = 0: plain decoding,
    one token per row for one pass of `batch` rows). With per-row `acceptance`, only the rows listed emit tokens
    (pass finished rows as absent) while the pass still costs `batch` rows."""
    rows = _rows(acceptance, batch)
    if n == 0:
        tokens = float(len(rows))
        cost = pass_ms(batch)
    else:
        tokens = sum(expected_tokens(n, a) for a in rows)
        cost = pass_ms(batch * (n + 1)) + draft_ms(n)
    if cost <= 0:
        raise InvalidArgumentError(f"a step with block size {n} must cost > 0 ms, got {cost}")
    return tokens / cost


def choose_block_size(acceptance: Acceptance, pass_ms: PassCost, draft_ms: DraftCost, n_max: int = DEFAULT_N_MAX,
                      batch: int = 1, min_gain: float = 0.02) -> int:
    """The n in 0..n_max with the most expected tokens per ms; 0 (plain decoding) unless the best n >= 1 beats plain
    by more than the fraction `min_gain`. Ties go to the smaller n."""
    if n_max < 0:
        raise InvalidArgumentError(f"n_max must be >= 0, got {n_max}")
    plain = expected_tokens_per_ms(0, acceptance, pass_ms, draft_ms, batch)
    best_n, best = 0, plain * (1.0 + min_gain)
    for n in range(1, n_max + 1):
        rate = expected_tokens_per_ms(n, acceptance, pass_ms, draft_ms, batch)
        if rate > best:
            best_n, best = n, rate
    return best_n


def _as_ints(values: Any) -> list[int]:
    return [int(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


class AcceptanceTracker:
    """Running acceptance per row and draft position over the last `window` outcomes, each estimate shrunk towards
    the row's pooled rate (itself shrunk towards `prior`) with weight `prior_weight`, so early steps are sane.

    After `choose` returns 0 for `probe_start` steps in a row it returns its best n >= 1 once (a probe) to refresh
    the estimate, doubling the interval up to `probe_max` while probes keep losing; it never probes when even
    perfect acceptance could not beat plain decoding.

    Keep one tracker per decoder and `reset(batch)` it per `generate`: the next sequences start from what the last
    one learnt (its per-position rates become their prior) and the probe interval carries on, so a draft that
    cannot pay costs a few steps once, not on every prompt.
    """

    def __init__(self, batch: int, n_max: int = DEFAULT_N_MAX, prior: float = 0.6, prior_weight: float = 4.0,
                 window: int = 64, probe_start: int = 8, probe_max: int = 64) -> None:
        if n_max < 1 or window < 1 or prior_weight <= 0 or probe_start < 1 or probe_max < probe_start:
            raise InvalidArgumentError(
                f"AcceptanceTracker needs n_max >= 1, window >= 1, prior_weight > 0 and 1 <= probe_start <= "
                f"probe_max; got n_max={n_max}, window={window}, prior_weight={prior_weight}, "
                f"probe_start={probe_start}, probe_max={probe_max}")
        self.n_max, self.prior, self.prior_weight, self.window = n_max, _check_rate(prior), prior_weight, window
        self.probe_start, self.probe_max = probe_start, probe_max
        self.chosen: dict[int, int] = {}
        self.probes = 0
        self._carried: list[float] | None = None  # per-position rates learnt by earlier sequences
        self._outcomes: list[list[deque[int]]] = []
        self._hits: list[list[int]] = []
        self._plain_run, self._interval = 0, probe_start
        self.reset(batch)

    def reset(self, batch: int, forget: bool = False) -> None:
        """Start new sequences in `batch` rows; their prior becomes the rates learnt so far (all rows pooled) and the
        probe interval carries on, unless `forget`. `chosen` and `probes` keep counting."""
        if batch < 1:
            raise InvalidArgumentError(f"batch must be >= 1, got {batch}")
        if forget:
            self._carried, self._plain_run, self._interval = None, 0, self.probe_start
        elif any(len(p) for row in self._outcomes for p in row):
            self._carried = self._pooled_positions()
        self.batch = batch
        self._outcomes = [[deque(maxlen=self.window) for _ in range(self.n_max)] for _ in range(batch)]
        self._hits = [[0] * self.n_max for _ in range(batch)]  # running sum of each deque (kept per step)

    def _push(self, r: int, i: int, outcome: int) -> None:
        window = self._outcomes[r][i]
        if len(window) == self.window:
            self._hits[r][i] -= window[0]
        window.append(outcome)
        self._hits[r][i] += outcome

    def _pooled_positions(self) -> list[float]:
        """Per-position rates over every row's outcomes, shrunk towards the current prior."""
        rates = []
        for i in range(self.n_max):
            hits = sum(row[i] for row in self._hits)
            tries = sum(len(row[i]) for row in self._outcomes)
            base = self._carried[i] if self._carried else self.prior
            rates.append((hits + self.prior_weight * base) / (tries + self.prior_weight))
        return rates

    def update(self, num_draft: Any, num_accepted: Any, active: Any = None) -> None:
        """Record one verify: row r proposed num_draft[r] tokens and num_accepted[r] of them were accepted (drafts
        1..a accepted; draft a+1 rejected when a < num_draft). Inactive rows are skipped."""
        drafts, accepted = _as_ints(num_draft), _as_ints(num_accepted)
        live = [True] * self.batch if active is None else [bool(a) for a in _as_ints(active)]
        if not len(drafts) == len(accepted) == len(live) == self.batch:
            raise InvalidArgumentError(f"update needs {self.batch} rows, got {len(drafts)} drafts, {len(accepted)} "
                                       f"accepted, {len(live)} active")
        for r in range(self.batch):
            if not live[r] or drafts[r] <= 0:
                continue
            if not 0 <= accepted[r] <= drafts[r]:
                raise InvalidArgumentError(f"row {r}: {accepted[r]} accepted of {drafts[r]} proposed")
            for i in range(min(accepted[r], self.n_max)):
                self._push(r, i, 1)
            if accepted[r] < drafts[r] and accepted[r] < self.n_max:
                self._push(r, accepted[r], 0)

    def row_estimate(self, r: int) -> list[float]:
        """Row r's conditional acceptance per draft position 1..n_max: each position's outcomes shrunk towards the
        rate carried from earlier sequences, or (none yet) towards the row's pooled rate (shrunk towards `prior`)."""
        tries, hits = [len(p) for p in self._outcomes[r]], self._hits[r]
        if self._carried:
            bases = self._carried
        else:
            bases = [(sum(hits) + self.prior_weight * self.prior) / (sum(tries) + self.prior_weight)] * self.n_max
        w = self.prior_weight
        return [(h + w * b) / (t + w) for h, t, b in zip(hits, tries, bases, strict=True)]

    def estimates(self) -> list[list[float]]:
        """Every row's `row_estimate` (rows x n_max)."""
        return [self.row_estimate(r) for r in range(self.batch)]

    def choose(self, pass_ms: PassCost, draft_ms: DraftCost, active: Any = None, min_gain: float = 0.02) -> int:
        """The block size for the next step (`choose_block_size` on the active rows' estimates), or a probe."""
        live = [True] * self.batch if active is None else [bool(a) for a in _as_ints(active)]
        rows = [self.row_estimate(r) for r in range(self.batch) if live[r]]
        if not rows:
            return 0
        n = choose_block_size(rows, pass_ms, draft_ms, self.n_max, self.batch, min_gain)
        if n > 0:
            self._plain_run, self._interval = 0, self.probe_start
        else:
            self._plain_run += 1
            if self._plain_run >= self._interval:
                probe = choose_block_size(1.0, pass_ms, draft_ms, self.n_max, self.batch, min_gain)
                if probe > 0:  # some n could pay with better acceptance: measure it once
                    n = choose_block_size(rows, pass_ms, draft_ms, self.n_max, self.batch, min_gain=-1.0)
                    self.probes += 1
                self._plain_run = 0
                self._interval = min(2 * self._interval, self.probe_max)
        self.chosen[n] = self.chosen.get(n, 0) + 1
        return n
