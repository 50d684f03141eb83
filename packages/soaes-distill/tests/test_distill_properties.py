"""Property-based tests (hypothesis) of the teacher-logit store: whatever the settings (top-k or dense, value
dtype, compression, temperatures, tail samples, shard size), what a dump writes is what training reads back."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soaes_core import write_manifest
from soaes_distill.dump import capture_example
from soaes_distill.store import VALUE_DTYPES, CaptureSettings, TeacherLogitStore, write_shard, write_state

FAST = settings(max_examples=25, deadline=None)


@st.composite
def stores(draw: Any) -> tuple[CaptureSettings, dict[int, torch.Tensor]]:
    vocab = draw(st.sampled_from([2, 3, 7, 64, 255, 256, 257, 1000]))
    top_k = draw(st.integers(0, min(vocab, 9)))
    tail = draw(st.integers(0, 3)) if 0 < top_k < vocab else 0
    temps = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 4.0]), min_size=1, max_size=3, unique=True))
    cs = CaptureSettings(model="m", model_fingerprint="f", tokenizer_sha256="t", dataset_sha256="d",
                         vocab_size=vocab, top_k=top_k, dtype=draw(st.sampled_from(list(VALUE_DTYPES))),
                         temperatures=temps, compression=draw(st.sampled_from(["none", "zstd"])),
                         examples_per_shard=draw(st.integers(1, 4)), tail_samples=tail)
    # example ids need not be contiguous or sorted (a dataset's own ids)
    ids = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=7, unique=True))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    log_probs = {}
    for eid in ids:
        length = draw(st.integers(1, 5))
        log_probs[eid] = torch.log_softmax(torch.randn(length, vocab, generator=g) * 3, -1)
    return cs, log_probs


def _write_store(out: Path, cs: CaptureSettings, log_probs: dict[int, torch.Tensor]) -> dict[int, dict[str, Any]]:
    """Write the store the way `dump` does: captured shards, store.json after each, manifest last."""
    ids = list(log_probs)
    per = cs.examples_per_shard
    captured = {eid: capture_example(log_probs[eid], cs, eid) for eid in ids}
    shards: dict[str, Any] = {}
    for s in range(math.ceil(len(ids) / per)):
        chunk = ids[s * per:(s + 1) * per]
        shards[str(s)] = write_shard(out, cs, s, chunk, [captured[e] for e in chunk])
        write_state(out, cs, len(ids), shards)
    write_manifest(out, "distill.dump", counts={"examples": len(ids)})
    return captured


@FAST
@given(stores())
def test_store_round_trip(case: tuple[CaptureSettings, dict[int, torch.Tensor]]) -> None:
    cs, log_probs = case
    dtype = VALUE_DTYPES[cs.dtype]
    with tempfile.TemporaryDirectory() as d:
        captured = _write_store(Path(d), cs, log_probs)
        store = TeacherLogitStore(d, cache_shards=2)  # a small cache: shards are evicted and re-read
        store.verify()
        assert store.example_ids() == sorted(log_probs)
        assert store.stats()["positions"] == sum(lp.shape[0] for lp in log_probs.values())
        for eid, want in captured.items():
            got = store.example(eid)
            # ids exactly, values exactly as stored in the value dtype, logsumexps exactly in fp32
            assert torch.equal(got["values"], want["values"].to(dtype))
            assert torch.equal(got["logsumexp"], want["logsumexp"].float())
            for name in ("indices", "tail_indices", "tail_values"):
                assert (name in got) == (name in want)
                if name in want:
                    assert torch.equal(got[name], want[name].to(got[name].dtype))
            if cs.dense:
                assert got["values"].shape == log_probs[eid].shape
            else:  # the stored ids are the teacher's top-k, distinct, inside the vocabulary
                assert got["indices"].shape == (log_probs[eid].shape[0], cs.top_k)
                top = torch.topk(log_probs[eid], cs.top_k, -1).values
                assert torch.equal(log_probs[eid].gather(-1, got["indices"]), top)
                if cs.tail_samples:  # tail samples lie outside the top-k
                    overlap = (got["tail_indices"].unsqueeze(-1) == got["indices"].unsqueeze(-2)).any()
                    assert not bool(overlap)


@FAST
@given(stores(), st.data())
def test_lookup_matches_the_examples_under_any_batch_layout(case: tuple[CaptureSettings, dict[int, torch.Tensor]],
                                                            data: st.DataObject) -> None:
    cs, log_probs = case
    ids = list(log_probs)
    # a (B, L) grid of (example id, position) pairs in any order, with padding (id -1)
    cells = data.draw(st.lists(st.one_of(st.just((-1, 0)), st.sampled_from(ids).flatmap(
        lambda e: st.tuples(st.just(e), st.integers(0, log_probs[e].shape[0] - 1)))), min_size=1, max_size=12))
    ex_ids = torch.tensor([c[0] for c in cells]).view(1, -1)
    pos = torch.tensor([c[1] for c in cells]).view(1, -1)
    tau = data.draw(st.sampled_from(cs.temperatures))
    with tempfile.TemporaryDirectory() as d:
        _write_store(Path(d), cs, log_probs)
        store = TeacherLogitStore(d)
        out = store.lookup(ex_ids, pos, temperature=tau)
        for j, (eid, t) in enumerate(cells):
            if eid < 0:
                continue
            ex = store.example(eid)
            if cs.dense:
                assert torch.equal(out[0, j], ex["values"][t].float())
                continue
            assert torch.equal(out.values[0, j], ex["values"][t].float())
            assert torch.equal(out.indices[0, j], ex["indices"][t])
            assert math.isclose(float(out.logsumexp[0, j]), float(torch.logsumexp(log_probs[eid][t] / tau, -1)),
                                rel_tol=1e-5, abs_tol=1e-5)
