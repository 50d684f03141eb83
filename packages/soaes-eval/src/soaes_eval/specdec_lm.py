"""lm-eval model ``soaes-specdec``: loglikelihood through the target (lm-eval's HFLM), generation through
``soaes_specdec.SpeculativeDecoder``, so any lm-eval generation task runs with speculative decoding.

model_args: ``pretrained`` (target: HF dir or soaes spec such as ``embedded:smollm2-135m``), ``draft`` (a model
spec, ``layers:N`` for the target's first N layers via ``make_layer_draft``, or ``none`` for plain autoregressive
decoding with the same stats), ``num_speculative_tokens`` (n, default 3), and ``do_sample`` / ``temperature`` /
``top_p`` / ``top_k`` / ``seed`` which, when given, override the task's generation kwargs.
Acceptance rate and tokens/s accumulated over all requests are in ``.spec_stats()``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import lm_eval.models  # noqa: F401  (registers the built-in models first, so `hf` stays in the registry)
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from soaes_core import resolve_model_dir
from soaes_core.errors import InvalidArgumentError, ModelLoadError
from soaes_core.progress import progress

_log = logging.getLogger(__name__)
MODEL_NAME = "soaes-specdec"


@dataclass
class SpecTotals:
    """Speculative-decoding counters summed over every generate request of a run (by `SpecStats` addition)."""

    stats: Any  # a soaes_specdec.SpecStats; soaes-specdec is an optional dependency, so it is passed in
    requests: int = 0

    def add(self, stats: Any) -> None:
        self.requests += 1
        self.stats = self.stats + stats

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        d: dict[str, Any] = {"requests": self.requests, "proposed": s.proposed, "accepted": s.accepted,
                             "target_calls": s.target_calls, "new_tokens": s.new_tokens,
                             "decode_tokens": s.decode_tokens, "decode_row_calls": s.decode_row_calls,
                             "wall_time_s": s.wall_time_s}
        d["acceptance_rate"] = s.acceptance_rate if s.proposed else None
        d["mean_accepted_length"] = s.mean_accepted_length if s.decode_row_calls else None
        d["tokens_per_s"] = s.tokens_per_s if s.wall_time_s > 0 else None
        return d


def _opt_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise InvalidArgumentError(f"expected a boolean, got {value!r}")


@register_model(MODEL_NAME)
class SpecDecLM(HFLM):
    """HFLM whose ``generate_until`` decodes one request at a time with a ``SpeculativeDecoder``."""

    def __init__(self, pretrained: Any, draft: str | None = None, num_speculative_tokens: int = 3,
                 do_sample: Any = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int = 0, **kwargs: Any) -> None:
        self.target_name = pretrained if isinstance(pretrained, str) else type(pretrained).__name__
        if isinstance(pretrained, str):
            pretrained = str(resolve_model_dir(pretrained))
        super().__init__(pretrained=pretrained, **kwargs)
        try:
            from soaes_specdec import SpecStats, SpeculativeDecoder, autoregressive_generate
        except ImportError:
            raise ModelLoadError("the soaes-specdec lm-eval model needs soaes-specdec: "
                                 "pip install 'soaes-eval[specdec]'") from None

        self.draft_spec = None if draft in (None, "", "none", "None") else str(draft)
        self.num_speculative_tokens = int(num_speculative_tokens)
        self.draft_model = self._load_draft(self.draft_spec)
        self._autoregressive = autoregressive_generate
        self.decoder = None
        if self.draft_model is not None:
            self.decoder = SpeculativeDecoder(self.model, self.draft_model,
                                              num_speculative_tokens=self.num_speculative_tokens)
        self.sampling_overrides = {k: v for k, v in {
            "do_sample": _opt_bool(do_sample), "temperature": None if temperature is None else float(temperature),
            "top_p": None if top_p is None else float(top_p), "top_k": None if top_k is None else int(top_k),
        }.items() if v is not None}
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.totals = SpecTotals(SpecStats())

    def _load_draft(self, spec: str | None) -> Any:
        if spec is None:
            return None
        if spec.startswith("layers:"):
            from soaes_specdec.draft import make_layer_draft

            try:
                n = int(spec.split(":", 1)[1])
            except ValueError:
                raise InvalidArgumentError(f"draft {spec!r}: expected layers:N with an integer N") from None
            return make_layer_draft(self.model, n)
        try:
            from soaes_specdec.draft import load_any_draft

            draft = load_any_draft(spec, dtype=self.model.dtype, device=str(self.device), target=self.target_name,
                                   target_tokenizer=self.tokenizer)  # a draft with another tokenizer is refused
        except ModelLoadError:
            raise
        except Exception as exc:  # a spec that soaes_core could not turn into a model
            raise ModelLoadError(f"cannot load draft model {spec!r}: {exc}") from exc
        draft.eval()
        return draft

    def spec_stats(self) -> dict[str, Any]:
        """Totals plus the configuration that produced them (draft, n, sampling overrides)."""
        out = self.totals.to_dict()
        out.update(draft=self.draft_spec, num_speculative_tokens=self.num_speculative_tokens if self.decoder else None,
                   sampling_overrides=dict(self.sampling_overrides))
        return out

    def _decode_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        kwargs = normalize_gen_kwargs({**gen_kwargs, **self.sampling_overrides}, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.tok_decode(self.eot_token_id, skip_special_tokens=False))
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.get("do_sample", False))
        ids = self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        sampling = {"do_sample": do_sample, "eos_token_id": self.eot_token_id, "generator": self.generator}
        if do_sample:
            sampling.update(temperature=float(kwargs.get("temperature", 1.0)) or 1.0,
                            top_p=float(kwargs.get("top_p", 1.0) or 1.0), top_k=int(kwargs.get("top_k", 0) or 0))
        start = time.perf_counter()
        with torch.no_grad():
            if self.decoder is not None:
                out = self.decoder.generate(input_ids, max_gen_toks, **sampling)
            else:
                out = self._autoregressive(self.model, input_ids, max_gen_toks, **sampling)
        _log.debug("request decoded in %.3fs", time.perf_counter() - start)
        self.totals.add(out.stats)
        new = out.new_tokens(0) if hasattr(out, "new_tokens") else out.sequences[0, len(ids):].tolist()
        text = self.tok_decode(new)
        return postprocess_generated_text(generation=text, stop=until, think_end_token=None)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results = []
        for req in progress(requests, desc="soaes-specdec generate_until", total=len(requests)):
            context, gen_kwargs = req.args
            text = self._decode_one(context, dict(gen_kwargs))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        stats = self.totals.to_dict()
        _log.info("soaes-specdec: %d requests, acceptance %s, %s tokens/s", stats["requests"],
                  stats["acceptance_rate"], stats["tokens_per_s"])
        return results
