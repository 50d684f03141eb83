"""The compiled decode step (`compiled_step`): its fixed-shape step gives the eager runner's logits and K/V, greedy
output equals plain decoding token for token (alone, in batches, as a speculative target), passes it does not cover
run the eager forward, and bad input is one clear error. The inductor compile itself (tens of seconds on a shared
2-core machine) runs when SOAES_TEST_COMPILE=1."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from soaes_core.errors import InvalidArgumentError
from soaes_specdec import PromptLookupDecoder, SpeculativeDecoder, autoregressive_generate
from soaes_specdec.compiled_step import CompiledCachedCausalLM, compile_decode_step
from soaes_specdec.runner import CachedCausalLM

PROMPTS = [[3, 17, 250, 9, 41], [7, 7, 99, 120, 7, 7, 99, 5, 300]]
NEW = 24


@pytest.fixture(scope="module")
def model(qwen2_factory: Any) -> Any:
    """A peaky tiny Qwen2 (init 0.2: greedy near-ties are rare, so rounding differences cannot flip a token)."""
    return qwen2_factory(seed=5, layers=2)


def _greedy(runner: Any, prompt: list[int]) -> list[int]:
    return autoregressive_generate(runner, torch.tensor([prompt]), max_new_tokens=NEW).sequences[0].tolist()


@pytest.mark.parametrize("linear", ["stream", "module"])
def test_step_matches_the_eager_forward(model: Any, linear: str) -> None:
    eager, compiled = CachedCausalLM(model, linear=linear), CompiledCachedCausalLM(model, linear=linear,
                                                                                    backend="eager")
    prompt = torch.tensor([PROMPTS[0]])
    for runner in (eager, compiled):
        runner.start(1, 16)
        runner.forward(prompt, torch.zeros(1, dtype=torch.long), logits_at=torch.tensor([4]))
        runner.cache.set_lengths(torch.tensor([5]))
    for pos, token in zip(range(5, 9), [11, 200, 3, 64], strict=True):
        args = (torch.tensor([[token]]), torch.tensor([pos]))
        want, got = eager.forward(*args, logits_at=torch.zeros(1, dtype=torch.long)), compiled.forward(
            *args, logits_at=torch.zeros(1, dtype=torch.long))
        assert got.shape == want.shape == (1, model.config.vocab_size) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled.forward(*args), eager.forward(*args), atol=1e-5, rtol=1e-5)  # [1, 1, V]
        for runner in (eager, compiled):
            runner.cache.set_lengths(torch.tensor([pos + 1]))
    for k_want, k_got in zip(eager.cache.keys + eager.cache.values, compiled.cache.keys + compiled.cache.values,
                             strict=True):
        torch.testing.assert_close(k_got[:, :, :9], k_want[:, :, :9], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("linear", ["stream", "module"])
def test_greedy_equals_plain_decoding(model: Any, linear: str) -> None:
    compiled = CompiledCachedCausalLM(model, linear=linear, backend="eager")
    for prompt in PROMPTS:
        assert _greedy(compiled, prompt) == _greedy(CachedCausalLM(model, linear=linear), prompt)
    assert list(compiled._steps) == [linear]  # the one-token steps ran the fixed-shape step
    # a batch (two rows: the eager forward) and the decoders with the compiled runner as their target
    ids, mask = torch.tensor([PROMPTS[0] + [0] * 4, PROMPTS[1]]), torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    batch = autoregressive_generate(compiled, ids, max_new_tokens=NEW, attention_mask=mask).sequences
    eager = CachedCausalLM(model, linear=linear)
    assert torch.equal(batch, autoregressive_generate(eager, ids, max_new_tokens=NEW, attention_mask=mask).sequences)
    plain = [_greedy(eager, p) for p in PROMPTS]
    lookup = PromptLookupDecoder(compiled, num_speculative_tokens=3)
    spec = SpeculativeDecoder(compiled, CachedCausalLM(model, linear=linear), 2)
    for prompt, want in zip(PROMPTS, plain, strict=True):
        ids = torch.tensor([prompt])
        assert lookup.generate(ids, max_new_tokens=NEW).sequences[0].tolist() == want
        assert spec.generate(ids, max_new_tokens=NEW).sequences[0].tolist() == want


def test_uncovered_passes_and_bad_input(model: Any) -> None:
    compiled = compile_decode_step(CachedCausalLM(model, linear="module"), backend="eager")
    assert isinstance(compiled, CompiledCachedCausalLM) and compiled.path_for_rows(1) == "module"
    assert compile_decode_step(compiled, backend="eager") is compiled
    compiled.start(1, 4)
    assert compiled.cache.capacity == 256  # buckets: one compiled shape for every cache up to 256 tokens
    compiled.start(1, 257)
    assert compiled.cache.capacity == 512
    compiled.forward(torch.tensor([[3, 4, 5, 6]]), torch.zeros(1, dtype=torch.long))
    with pytest.raises(InvalidArgumentError, match="needs 513 cache slots but the cache holds 512"):
        compiled.forward(torch.tensor([[7]]), torch.tensor([512]), logits_at=torch.zeros(1, dtype=torch.long))
    assert compiled._steps == {}  # the full-cache step never reached the compiled path
    logits, hidden = compiled.forward(torch.tensor([[7]]), torch.tensor([3]), return_hidden=True)  # eager forward
    assert logits.shape == (1, 1, model.config.vocab_size) and hidden.shape == (1, 1, model.config.hidden_size)
    assert compiled._steps == {}
    with pytest.raises(InvalidArgumentError, match="backend must be one of inductor, eager, got 'tvm'"):
        CompiledCachedCausalLM(model, backend="tvm")


@pytest.mark.skipif(os.environ.get("SOAES_TEST_COMPILE") != "1",
                    reason="torch.compile (inductor) takes tens of seconds here: set SOAES_TEST_COMPILE=1")
def test_inductor_greedy_equals_plain_decoding(model: Any) -> None:
    compiled = CompiledCachedCausalLM(model, linear="stream", backend="inductor")
    for prompt in PROMPTS:
        assert _greedy(compiled, prompt) == _greedy(CachedCausalLM(model, linear="stream"), prompt)
    assert list(compiled._steps) == ["stream"]
