"""soaes-specdec as installed: its version is the distribution's, its CLI entry point works, and the decoders keep
the contract of design.md."""

from __future__ import annotations

import inspect

import soaes_specdec
from soaes_core.testing.installed import check_installed_distribution
from soaes_specdec import (
    PromptLookupDecoder,
    SpecDecodeOutput,
    SpecStats,
    SpeculativeDecoder,
    autoregressive_generate,
)

SAMPLING = ["do_sample", "temperature", "top_p", "top_k", "eos_token_id", "generator"]
SAMPLING_DEFAULTS = [False, 1.0, 1.0, 0, None, None]


def test_installed_distribution_and_console_script() -> None:
    check_installed_distribution("soaes-specdec", soaes_specdec, {"bench", "generate"})


def _params(fn: object) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_decoder_signatures() -> None:
    spec = _params(SpeculativeDecoder)
    assert list(spec)[:3] == ["target", "draft", "num_speculative_tokens"]
    assert spec["num_speculative_tokens"].default is None  # unset: the decoder chooses n each step
    lookup = _params(PromptLookupDecoder)
    assert list(lookup)[:3] == ["target", "num_speculative_tokens", "max_ngram"]
    assert [lookup[k].default for k in ("num_speculative_tokens", "max_ngram")] == [3, 3]
    for generate, head in ((SpeculativeDecoder.generate, ["self", "input_ids", "max_new_tokens"]),
                           (PromptLookupDecoder.generate, ["self", "input_ids", "max_new_tokens"]),
                           (autoregressive_generate, ["model", "input_ids", "max_new_tokens"])):
        params = _params(generate)
        assert list(params)[: len(head) + len(SAMPLING)] == head + SAMPLING, generate
        assert [params[k].default for k in SAMPLING] == SAMPLING_DEFAULTS, generate


def test_stats_definitions() -> None:
    assert {"sequences", "stats"} <= set(SpecDecodeOutput.__dataclass_fields__)
    stats = SpecStats(proposed=12, accepted=9, target_calls=5, new_tokens=14, decode_row_calls=4, decode_tokens=13,
                      wall_time_s=2.0)
    assert stats.acceptance_rate == 9 / 12
    # new tokens per row per decode-phase target call (the prefill call is not counted)
    assert stats.mean_accepted_length == 13 / 4
    assert stats.tokens_per_s == 14 / 2.0
