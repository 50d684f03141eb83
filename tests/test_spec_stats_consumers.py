"""Every summary of speculative-decoding runs goes through `SpecStats.merge` and keeps its old numbers.

The lm-eval model's totals and the distill experiment (`benchmarks/distill/experiment.py`) each summed the counters
themselves before; their former formulas are kept here as references, checked on real runs of a tiny target and
layer draft.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from soaes_specdec import SpecStats, SpeculativeDecoder, make_layer_draft


@pytest.fixture(scope="module")
def runs(tiny_qwen2: Any) -> tuple[Any, Any, list[list[int]], list[SpecStats]]:
    draft = make_layer_draft(tiny_qwen2, 1)
    prompts = [[5, 9, 31, 2, 77], [100, 200, 300], [7, 8, 9, 7, 8, 9, 7]]
    dec = SpeculativeDecoder(tiny_qwen2, draft, 3)
    g = torch.Generator().manual_seed(0)
    stats = [dec.generate(torch.tensor([p]), max_new_tokens=10, do_sample=True, generator=g).stats for p in prompts]
    return tiny_qwen2, draft, prompts, stats


def test_eval_totals(runs: tuple[Any, Any, list[list[int]], list[SpecStats]]) -> None:
    pytest.importorskip("lm_eval")
    from soaes_eval.specdec_lm import SpecTotals

    stats = runs[3]
    totals = SpecTotals(SpecStats())
    for s in stats:
        totals.add(s)
    keys = ("proposed", "accepted", "target_calls", "new_tokens", "decode_tokens", "decode_row_calls")
    sums = {k: sum(getattr(s, k) for s in stats) for k in keys}
    wall = 0.0
    for s in stats:
        wall += s.wall_time_s
    assert totals.to_dict() == {
        "requests": len(stats), **sums, "wall_time_s": wall,
        "acceptance_rate": sums["accepted"] / sums["proposed"] if sums["proposed"] else None,
        "mean_accepted_length": sums["decode_tokens"] / sums["decode_row_calls"] if sums["decode_row_calls"] else None,
        "tokens_per_s": sums["new_tokens"] / wall if wall > 0 else None}
    assert SpecTotals(SpecStats()).to_dict()["acceptance_rate"] is None  # nothing proposed: no rate, not 0


def test_experiment_speed(runs: tuple[Any, Any, list[list[int]], list[SpecStats]],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "distill" / "experiment.py"
    spec = importlib.util.spec_from_file_location("soaes_distill_experiment_script", script)
    assert spec is not None and spec.loader is not None
    experiment = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, experiment)  # its dataclasses look their module up there
    spec.loader.exec_module(experiment)

    target, draft, prompts, _ = runs
    recorded: list[SpecStats] = []
    real = SpeculativeDecoder.generate

    def spy(self: SpeculativeDecoder, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        recorded.append(out.stats)
        return out

    monkeypatch.setattr(SpeculativeDecoder, "generate", spy)
    got = experiment._speed(target, draft, prompts, 10, [1], do_sample=True)
    assert len(recorded) == len(prompts)
    proposed, accepted = sum(s.proposed for s in recorded), sum(s.accepted for s in recorded)
    tokens, wall = 0, 0.0
    for s in recorded:
        tokens += s.new_tokens
        wall += s.wall_time_s
    assert got == {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
                   "acceptance_rate": accepted / proposed if proposed else 0.0}
