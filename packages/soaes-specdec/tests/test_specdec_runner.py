"""The cached forward equals the HF forward, per row and across blocks; rollback is a pointer move."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from soaes_core.errors import InvalidArgumentError
from soaes_specdec.draft import RestrictedLMHead
from soaes_specdec.kv_cache import StaticKVCache
from soaes_specdec.runner import STREAM_MAX_ROWS, CachedCausalLM, default_linear_mode, stream_linear


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, STREAM_MAX_ROWS, STREAM_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_stream_linear_equals_f_linear(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(300, 64, generator=g)
    b = torch.randn(300, generator=g) if bias else None
    x = torch.randn(rows, 64, generator=g)
    out = stream_linear(x, weight, b)
    assert out.shape == (rows, 300) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, rows, 64, generator=g)[:, :, :]  # batch x time x hidden, as the runner calls it
    torch.testing.assert_close(stream_linear(x3, weight, b), F.linear(x3, weight, b), rtol=1e-5, atol=1e-5)


def test_restricted_head_through_stream_linear() -> None:
    head = RestrictedLMHead(torch.randn(100, 16), [3, 50, 7, 99])
    x = torch.randn(1, 2, 16)
    torch.testing.assert_close(head(x, linear=stream_linear), head(x))
    assert torch.isinf(head(x, linear=stream_linear)[..., 0]).all()


def test_linear_mode_choice(qwen2_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_linear_mode(torch.device("cpu"), torch.float32) == (
        "stream" if torch.backends.mkl.is_available() else "module")
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    assert default_linear_mode(torch.device("cpu"), torch.float32) == "module"
    monkeypatch.undo()
    assert default_linear_mode(torch.device("cpu"), torch.bfloat16) == "module"
    assert default_linear_mode(torch.device("cuda"), torch.float32) == "module"
    with pytest.raises(InvalidArgumentError, match="linear must be"):
        CachedCausalLM(qwen2_factory(0, layers=1), linear="fast")


def test_auto_linear_mode_is_the_measured_faster_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """`calibrate_linear_mode` times both projection paths and keeps the faster (a slowed path loses)."""
    import soaes_specdec.runner as runner_mod

    weights = [torch.randn(64, 32) for _ in range(4)]
    slow_stream = runner_mod.stream_linear

    def slower(*args: Any, **kwargs: Any) -> torch.Tensor:
        time.sleep(0.002)
        return slow_stream(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "_CALIBRATED", {})
    monkeypatch.setattr(runner_mod, "stream_linear", slower)
    assert runner_mod.calibrate_linear_mode(weights) == "module"
    monkeypatch.setattr(runner_mod, "_CALIBRATED", {})
    monkeypatch.setattr(runner_mod, "stream_linear", slow_stream)
    monkeypatch.setattr(runner_mod.F, "linear", lambda x, w, b=None: (time.sleep(0.002), x @ w.t())[1])
    assert runner_mod.calibrate_linear_mode(weights) == "stream"


@pytest.mark.parametrize("linear", ["auto", "stream", "module"])
def test_blocks_and_rows_match_full_forward(qwen2_factory: Any, linear: str) -> None:
    model = qwen2_factory(0, layers=2)
    runner = CachedCausalLM(model, linear=linear)
    if linear == "auto":  # stream is a candidate on CPU fp32 with MKL, then the faster of the two measured
        assert runner.linear_mode in (("stream", "module") if default_linear_mode(torch.device("cpu"), torch.float32)
                                      == "stream" else ("module",))
    else:
        assert runner.linear_mode == linear
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids).logits
        runner.start(2, 32)
        runner.forward(ids[:, :12], torch.tensor([0, 0]), need_logits=False)
        # Row 0 continues at 12; row 1 is rolled back to 8 and continues from there with different tokens.
        block = torch.stack([ids[0, 12:16], ids[1, 8:12]])
        out = runner.forward(block, torch.tensor([12, 8]))
        torch.testing.assert_close(out[0], full[0, 12:16], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1], full[1, 8:12], rtol=1e-4, atol=1e-4)
        last = runner.forward(ids[:, 16:17], torch.tensor([16, 16]), logits_at=torch.zeros(2, dtype=torch.long))
        torch.testing.assert_close(last[0], full[0, 16], rtol=1e-4, atol=1e-4)
    assert runner.num_parameter_bytes() == sum(p.numel() * 4 for p in model.parameters())


def test_cache_reuse_and_rollback() -> None:
    cache = StaticKVCache.allocate(2, 3, 2, 16, 4, torch.float32, torch.device("cpu"))
    assert cache.fits(3, 10, torch.float32, torch.device("cpu")) and not cache.fits(3, 17, torch.float32,
                                                                                       torch.device("cpu"))
    cache.set_lengths(torch.tensor([9, 5, 7]))
    keys_before = cache.keys[0].clone()
    cache.rollback(torch.tensor([6, 6, 6]))
    assert cache.lengths.tolist() == [6, 5, 6]
    assert torch.equal(cache.keys[0], keys_before)
    cache.reset()
    assert cache.lengths.tolist() == [0, 0, 0]
    with pytest.raises(AttributeError):  # the pointers move only through the cache's methods
        cache.lengths = torch.tensor([1, 1, 1])  # type: ignore[misc]
    with pytest.raises(InvalidArgumentError, match="shape"):
        cache.set_lengths(torch.tensor([1, 1]))
    src = torch.tensor([4, 4, 4])
    cache.set_lengths(src)
    src += 1  # the cache keeps its own copy
    assert cache.lengths.tolist() == [4, 4, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("linear", ["stream", "module"])
def test_batch_invariant_block_logits_are_bit_identical_to_one_token_steps(qwen2_factory: Any, dtype: torch.dtype,
                                                                           linear: str) -> None:
    """A verify block through a batch-invariant runner gives, at every position and row, exactly (torch.equal) the
    logits plain decoding computes one token at a time at batch 1, and leaves the same K/V in the cache."""
    model = qwen2_factory(0, layers=2).to(dtype)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        block_runner = CachedCausalLM(model, linear=linear, batch_invariant=True)
        block_runner.start(2, 32)
        block_runner.forward(ids[:, :10], torch.tensor([0, 0]), need_logits=False)
        block = torch.stack([ids[0, 10:15], ids[1, 7:12]])  # row 1 rolled back to 7
        out = block_runner.forward(block, torch.tensor([10, 7]))
        at = block_runner.forward(block[:, :3], torch.tensor([10, 7]), logits_at=torch.tensor([2, 0]))
        for row, start in ((0, 10), (1, 7)):
            step = CachedCausalLM(model, linear=linear)
            step.start(1, 32)
            step.forward(ids[row:row + 1, :10], torch.tensor([0]), need_logits=False)
            for i in range(5):
                logits = step.forward(block[row:row + 1, i:i + 1], torch.tensor([start + i]),
                                      logits_at=torch.zeros(1, dtype=torch.long))
                assert torch.equal(out[row, i], logits[0]), (row, i)
            for layer in range(2):
                end = start + 5
                assert torch.equal(block_runner.cache.keys[layer][row, :, :end], step.cache.keys[layer][0, :, :end])
        assert torch.equal(at[0], out[0, 2]) and torch.equal(at[1], out[1, 0])
    assert block_runner.with_batch_invariance() is block_runner
    plain = CachedCausalLM(model, linear=linear)
    assert plain.with_batch_invariance().batch_invariant and not plain.batch_invariant


def test_a_block_wider_than_the_cache_is_refused_in_one_line(qwen2_factory: Any) -> None:
    runner = CachedCausalLM(qwen2_factory(0, layers=1))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    with pytest.raises(InvalidArgumentError, match="before start"):
        runner.forward(ids, torch.tensor([0]))
    runner.start(1, 10)
    with pytest.raises(InvalidArgumentError) as err:
        runner.forward(ids, torch.tensor([0]))
    assert "a block of 12 tokens at position 0 needs 12 cache slots but the cache holds 10" in str(err.value)
    assert "\n" not in str(err.value)
    runner.forward(ids[:, :8], torch.tensor([0]), need_logits=False)
    with pytest.raises(InvalidArgumentError, match="needs 11 cache slots"):
        runner.forward(ids[:, :3], torch.tensor([8]))  # a verify of 3 rows at 8 runs past the 10-slot cache
