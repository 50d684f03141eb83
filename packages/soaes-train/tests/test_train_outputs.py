"""Loss-curve outputs: the whole-run mean loss a manifest records, resumed runs included."""

from __future__ import annotations

import pytest

from soaes_train.outputs import loss_curve, mean_logged_loss


def _curve(points: list[tuple[int, float]]) -> dict[str, list[float]]:
    return loss_curve([{"step": s, "loss": v, "learning_rate": 1e-3} for s, v in points] + [{"train_loss": 9.0}])


def test_mean_logged_loss_weights_each_point_by_the_steps_it_covers() -> None:
    assert mean_logged_loss(_curve([(1, 3.0), (2, 2.0), (3, 1.0)]), 3) == pytest.approx(2.0)
    # logging every 2 steps: a point is the mean of the steps since the previous one
    assert mean_logged_loss(_curve([(2, 3.0), (4, 1.0), (5, 4.0)]), 5) == pytest.approx((6 + 2 + 4) / 5)


def test_mean_logged_loss_is_none_when_the_curve_misses_steps() -> None:
    assert mean_logged_loss(_curve([(2, 3.0), (4, 1.0)]), 5) is None  # the last step was never logged
    assert mean_logged_loss(_curve([]), 3) is None
