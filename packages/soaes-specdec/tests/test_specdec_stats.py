"""`SpecStats` addition / `merge`: every counter summed, per-position counts element-wise across widths."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from soaes_specdec import PromptLookupDecoder, SpecStats, SpeculativeDecoder


def _stats(seed: int, width: int) -> SpecStats:
    g = torch.Generator().manual_seed(seed)
    ints = [int(x) for x in torch.randint(0, 50, (7,), generator=g)]
    pos_p = [int(x) for x in torch.randint(5, 20, (width,), generator=g)]
    return SpecStats(*ints, wall_time_s=0.1 * (seed + 1), position_proposed=pos_p,
                     position_accepted=[p // 2 for p in pos_p])


def test_merge_sums_every_field() -> None:
    parts = [_stats(0, 3), _stats(1, 0), _stats(2, 5), _stats(3, 2)]
    total = SpecStats.merge(parts)
    for name in ("proposed", "accepted", "target_calls", "draft_calls", "new_tokens", "decode_row_calls",
                 "decode_tokens"):
        assert getattr(total, name) == sum(getattr(p, name) for p in parts), name
    assert total.wall_time_s == pytest.approx(sum(p.wall_time_s for p in parts))
    assert len(total.position_proposed) == 5
    for i in range(5):
        assert total.position_proposed[i] == sum(p.position_proposed[i] for p in parts if i < len(p.position_proposed))
        assert total.position_accepted[i] == sum(p.position_accepted[i] for p in parts if i < len(p.position_accepted))
    assert total.acceptance_rate == total.accepted / total.proposed
    assert parts[0] + parts[1] == SpecStats.merge(parts[:2])
    assert parts[0].position_proposed == _stats(0, 3).position_proposed  # the operands are not modified
    assert SpecStats.merge([]) == SpecStats()
    with pytest.raises(TypeError):
        parts[0] + 1  # type: ignore[operator]


def _old_bench_sum(stats: list[SpecStats]) -> dict[str, Any]:
    """The summing bench.py had before `SpecStats.merge` (kept here as the reference the numbers must match)."""
    proposed = sum(s.proposed for s in stats)
    accepted = sum(s.accepted for s in stats)
    width = max((len(s.position_proposed) for s in stats), default=0)
    pos_p = [sum(s.position_proposed[i] for s in stats if i < len(s.position_proposed)) for i in range(width)]
    pos_a = [sum(s.position_accepted[i] for s in stats if i < len(s.position_accepted)) for i in range(width)]
    decode_tokens = sum(s.decode_tokens for s in stats)
    decode_calls = sum(s.decode_row_calls for s in stats)
    return {"acceptance_rate": accepted / proposed if proposed else None,
            "acceptance_by_position": [a / p if p else 0.0 for a, p in zip(pos_a, pos_p, strict=False)],
            "mean_accepted_length": decode_tokens / decode_calls if decode_calls else None,
            "target_calls": sum(s.target_calls for s in stats)}


def test_bench_summary_of_real_runs_is_unchanged(qwen2_factory: Callable[..., Any]) -> None:
    from soaes_specdec.bench import _stats_fields

    target, draft = qwen2_factory(0), qwen2_factory(1, layers=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (1, n), generator=g) for n in (5, 9, 14)]
    prompts.append(torch.tensor([[7, 8, 9, 7, 8, 9, 7, 8]]))  # repeats: prompt lookup drafts of varying width
    for decoder in (SpeculativeDecoder(target, draft, 3, draft_confidence=0.4), PromptLookupDecoder(target, 4)):
        outs = [decoder.generate(p, max_new_tokens=12) for p in prompts]
        assert _stats_fields(SpecStats.merge(o.stats for o in outs)) == _old_bench_sum([o.stats for o in outs])


def test_lookup_fields_split_the_acceptance_by_source() -> None:
    from soaes_specdec.bench import _lookup_fields

    total = SpecStats(proposed=10, accepted=6, lookup_proposed=4, lookup_accepted=3)
    assert _lookup_fields(total) == {"lookup_share_of_proposed": 0.4, "lookup_acceptance": 0.75,
                                     "draft_acceptance": 0.5}
    only_lookup = SpecStats(proposed=4, accepted=1, lookup_proposed=4, lookup_accepted=1)
    assert _lookup_fields(only_lookup)["draft_acceptance"] is None
    assert _lookup_fields(SpecStats())["lookup_acceptance"] is None
