"""Speed benchmark: plain decoding, prompt lookup, speculative decoding and the transformers peers, side by side.

Every method decodes the same prompts with the same stop rules (EOS or max_new_tokens) at batch size 1.
Reported per method: tokens/s (median over repeats after warm-up), speedup vs plain decoding of the same
target, and for the speculative ones acceptance rate (accepted / proposed draft tokens), per-position
acceptance and mean accepted length (new tokens per target call, bonus included). For our speculative
decoder it also reports the measured cost ratios c (draft step / target step) and c_v (target pass over
n+1 tokens / target step), the theoretical speedup S = E[L] / (n*c + c_v) with E[L] = (1 - a^(n+1)) / (1 - a)
(Leviathan et al. 2023), and measured / S. Plain decoding's achieved bandwidth (weight bytes x tokens/s)
is compared with the machine's, measured by a large matrix-vector product. The draft is a layer draft or a
feature-conditioned one (`config.draft` a `FeatureDraft` directory); for the latter a draft step, and so c, is
fc + its one layer + its norm + its (restricted) head.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from soaes_core import DEFAULT_MODEL, load_model, load_tokenizer
from soaes_core.atomic import atomic_write_json, atomic_write_text
from soaes_core.errors import DataError, InvalidArgumentError
from soaes_core.manifest import write_manifest
from soaes_core.models import resolve_dtype
from soaes_core.progress import progress
from soaes_core.prompts import encode_chat_prompt, read_prompt_records

from .cost_model import break_even_acceptance, expected_accepted_length, theoretical_speedup
from .cost_table import CostTable, load_or_measure
from .decoding import (
    COST_TABLE_MAX_ROWS,
    PromptLookupDecoder,
    SpecDecodeOutput,
    SpecStats,
    SpeculativeDecoder,
    autoregressive_generate,
    prepack_rows,
)
from .draft import check_draft_tokenizer, load_any_draft, make_layer_draft
from .feature_draft import FeatureDraft
from .feature_runner import FeatureDraftRunner
from .hostinfo import format_host, host_info
from .runner import CachedCausalLM
from .settings import DecodingSettings

log = logging.getLogger(__name__)

METHODS = ("plain", "prompt_lookup", "speculative", "speculative_lookup", "hf_assisted", "hf_prompt_lookup")
DEFAULT_METHODS = ("plain", "prompt_lookup", "speculative", "hf_assisted", "hf_prompt_lookup")
REFERENCE = "plain_reference"  # plain decoding in `reference_dtype` (added to the jobs when that is set)
PLAIN = ("plain", REFERENCE)  # no block size, no decoder stats
MODES = ("greedy", "top_p")


@dataclass
class BenchConfig(DecodingSettings):
    """What to benchmark (YAML-loadable; CLI flags override). The decoder's settings are `DecodingSettings`' own fields
    (inherited, so a bench file and the command line name them directly); `num_speculative_tokens` here lists the
    fixed block sizes to time beside the adaptive decoder."""

    num_speculative_tokens: list[int] = field(default_factory=list, metadata={  # type: ignore[assignment]
        "help": "Fixed block sizes to time as well, comma-separated (e.g. 1,3,5), beside the decoder that chooses n "
                "each step (adaptive)."})
    adaptive: bool = field(default=True, metadata={
        "help": "Time the decoder that chooses its block size each step from this host's cost table (the default "
                "decoder); off = only the fixed num_speculative_tokens."})
    target: str = field(default=DEFAULT_MODEL, metadata={"help": "Target model spec."})
    draft: str | None = field(default=None, metadata={
        "help": "Draft model spec (a layer draft or a feature-draft directory); unset = the target's first "
                "--draft-layers layers."})
    draft_layers: int = field(default=4, metadata={"help": "Layers kept when deriving the draft from the target."})
    prompts: str | None = field(default=None, metadata={
        "help": 'JSONL of {"messages": [...]} or {"prompt": "..."} per line; unset = the packaged prompts.'})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts; unset = all."})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={
        "help": f"Decoding modes, comma-separated subset of {','.join(MODES)}."})
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS), metadata={
        "help": f"Methods, comma-separated subset of {','.join(METHODS)} (speculative_lookup: the draft, with "
                "prompt lookup's proposals wherever the text repeats an earlier n-gram, lookup_tokens of them)."})
    top_p: float = field(default=0.7, metadata={"help": "Top-p of the sampling mode (the paper's 0.7)."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature of the sampling mode."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per prompt."})
    warmup: int = field(default=1, metadata={"help": "Warm-up passes (first prompt only) before the timed repeats."})
    repeats: int = field(default=3, metadata={"help": "Timed passes; the median is reported."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling mode."})
    sampling_seeds: int = field(default=1, metadata={
        "help": "Sampling mode: decode every prompt under this many seeds (seed, seed + 1, ...) per timed pass; "
                "sampled continuations differ per seed, so more seeds average out their spread in acceptance."})
    dtype: str = field(default="float32", metadata={"help": "Target and draft dtype: float32, bfloat16, float16."})
    device: str = field(default="auto", metadata={
        "help": "Where target and draft run: auto (a GPU when one is present, else the CPU), cpu, cuda, cuda:N."})
    # plain decoding of the target in this dtype, interleaved with the rest, so that a speedup in `dtype` can be
    # read against the fastest baseline (e.g. bfloat16 runs against float32 plain decoding)
    reference_dtype: str | None = field(default=None, metadata={
        "help": "Also time plain decoding of the target in this dtype (e.g. float32), for a speedup against the "
                "fastest baseline."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads; unset = torch's choice."})

    @property
    def block_sizes(self) -> list[int | None]:
        """The block sizes timed: None (the adaptive decoder) first when `adaptive`, then the fixed ones."""
        return ([None] if self.adaptive else []) + list(dict.fromkeys(self.num_speculative_tokens))

    def decoding_settings(self, n: int | None, lookup: bool) -> DecodingSettings:
        """The `DecodingSettings` of one speculative job: block size `n` (None = chosen per step), with prompt lookup
        beside the draft (`speculative_lookup`) or without it (`speculative`)."""
        values = {f.name: getattr(self, f.name) for f in fields(DecodingSettings)}
        values["num_speculative_tokens"] = n
        if not lookup:
            values.update(lookup_tokens=0, lookup_extend=False, lookup_mix=0.0)
        return DecodingSettings(**values)

    def validate(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}")
        if sorted(set(self.modes) - set(MODES)):
            raise ValueError(f"modes: choose from {list(MODES)}, got {self.modes}")
        if min(self.num_speculative_tokens, default=1) < 1:
            raise ValueError("num_speculative_tokens: give ints >= 1 (fixed block sizes)")
        if not self.block_sizes:
            raise ValueError("nothing to time: set adaptive or give fixed num_speculative_tokens")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens < 1 or self.repeats < 1 or self.warmup < 0 or self.draft_layers < 1:
            raise ValueError("max_new_tokens, repeats and draft_layers must be >= 1 and warmup >= 0")
        if self.sampling_seeds < 1:
            raise ValueError(f"sampling_seeds must be >= 1, got {self.sampling_seeds}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 (or null for all prompts), got {self.max_prompts}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or null for torch's choice), got {self.threads}")
        if "speculative_lookup" in self.methods and not self.lookup_tokens:
            raise ValueError("methods: speculative_lookup needs lookup_tokens > 0 (the tokens prompt lookup proposes)")
        for n in self.block_sizes:  # every job's decoder settings (lookup's included), checked where they are defined
            self.decoding_settings(n, lookup=True)


def compare_greedy(reference: list[list[int]], outputs: list[list[int]]) -> dict[str, Any]:
    """Token-for-token agreement of each prompt's output with the reference (plain greedy decoding, same dtype).

    A prompt differs at its first unequal new token, or where the shorter output ends; positions are 0-based
    indices into the new tokens. Returns exact_match, mismatch_rate (prompts that differ / prompts),
    first_difference ({"min", "median", "max", "prompts"} over the differing prompts, or None).
    """
    if len(reference) != len(outputs) or not reference:
        raise InvalidArgumentError(f"compare_greedy needs one output per reference prompt, got {len(outputs)} "
                                   f"outputs for {len(reference)} prompts")
    firsts: dict[int, int] = {}
    for i, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        if ref != out:
            firsts[i] = next((j for j, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b),
                             min(len(ref), len(out)))
    positions = sorted(firsts.values())
    return {"exact_match": not firsts, "mismatch_rate": len(firsts) / len(reference),
            "first_difference": {"min": positions[0], "median": statistics.median(positions), "max": positions[-1],
                                 "prompts": sorted(firsts)} if firsts else None}


def synchronize() -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (kernels launch asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of `fn()`, queued GPU work included."""
    synchronize()
    t0 = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - t0, result


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def measure_bandwidth(megabytes: int = 256, repeats: int = 7, device: str | torch.device = "cpu") -> float:
    """Memory bandwidth in GB/s of `device` as read by a large fp32 matrix-vector product (weights >> cache)."""
    n = int((megabytes * 1e6 / 4) ** 0.5)
    weight = torch.randn(n, n, device=device)
    vec = torch.randn(n, device=device)
    seconds = median_time(lambda: torch.mv(weight, vec), repeats, warmup=2)
    return weight.numel() * weight.element_size() / seconds / 1e9


@torch.inference_mode()
def measure_costs(target: CachedCausalLM, draft: CachedCausalLM | FeatureDraftRunner, n: int, context: int,
                  repeats: int = 15, warmup: int = 3) -> dict[str, float]:
    """Seconds of one target step, one draft step and one target pass over n+1 tokens at `context` tokens.

    The three are timed in interleaved rounds (after `warmup` untimed rounds), so a slow start or a load
    change shifts all three alike instead of biasing the ratios c and c_v. A feature draft's step is what the
    decoder runs per speculative token: fc on (embedding, feature) + its layer + norm + head, returning g; with a
    feature draft the target's verify also returns its hidden states, as the decoder asks.
    """
    vocab = min(target.vocab_size, draft.vocab_size)
    prompt = torch.randint(0, vocab, (1, context), device=target.device)
    starts = torch.zeros(1, dtype=torch.long, device=target.device)
    at_end = torch.full((1,), context, dtype=torch.long, device=target.device)
    last = torch.zeros(1, dtype=torch.long, device=target.device)
    target.start(1, context + n + 2)
    target.forward(prompt, starts, need_logits=False)
    one = prompt[:, -1:]
    block = prompt[:, -(n + 1):]
    feature = isinstance(draft, FeatureDraftRunner)
    draft.start(1, context + n + 2)
    if isinstance(draft, FeatureDraftRunner):
        features = torch.randn(1, context, draft.hidden_size, device=draft.device, dtype=draft.dtype)
        draft.step(features, prompt, starts, logits_at=torch.full_like(starts, context - 1))
        state = features[:, -1:]

        def draft_step() -> Any:
            return draft.step(state, one, at_end, logits_at=last)
    else:
        draft.forward(prompt, starts, need_logits=False)

        def draft_step() -> Any:
            return draft.forward(one, at_end, logits_at=last)
    calls = {"target_step_s": lambda: target.forward(one, at_end, logits_at=last),
             "draft_step_s": draft_step,
             "verify_step_s": lambda: target.forward(block, at_end, return_hidden=feature)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for round_ in range(warmup + repeats):
        for key, fn in calls.items():
            seconds, _ = timed(fn)
            if round_ >= warmup:
                times[key].append(seconds)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["c"] = out["draft_step_s"] / out["target_step_s"]
    out["c_v"] = out["verify_step_s"] / out["target_step_s"]
    return out


def default_prompts_path() -> Path:
    return Path(str(resources.files("soaes_specdec") / "data" / "bench_prompts.jsonl"))


def load_prompts(path: str | os.PathLike[str] | None, tokenizer: Any, limit: int | None = None,
                 ) -> list[torch.Tensor]:
    """Token ids of each prompt (`soaes_core.read_prompt_records`): chat `messages` through the tokenizer's
    template (`encode_chat_prompt`), or a plain `prompt` string as raw text.

    Trailing assistant turns are dropped, so SFT or held-out records (prompt + answer) serve as prompts directly.
    """
    path = Path(path) if path is not None else default_prompts_path()
    prompts = []
    for record in read_prompt_records(path, limit):
        if record.messages is not None:
            try:
                ids = encode_chat_prompt(tokenizer, record.as_messages())
            except Exception as err:  # template errors come in many types; report the record
                raise DataError(f"cannot apply the chat template: {err}", path=str(path), line=record.line,
                                field="messages") from None
        else:
            ids = tokenizer(record.text)["input_ids"]
        if not ids:
            raise DataError("prompt tokenises to nothing", path=str(path), line=record.line)
        prompts.append(torch.tensor(list(ids), dtype=torch.long))
    if not prompts:
        raise DataError("no prompts", path=str(path))
    return prompts


# ----------------------------------------------------------------------------------------- running


@dataclass
class MethodResult:
    """One method in one mode: median tokens/s and the stats of the median repeat."""

    method: str
    mode: str
    n: int | None
    tokens_per_s: float
    new_tokens: int
    wall_time_s: float
    repeats_tokens_per_s: list[float]
    acceptance_rate: float | None = None
    acceptance_by_position: list[float] | None = None
    mean_accepted_length: float | None = None
    target_calls: int | None = None
    speedup_vs_plain: float | None = None
    speedup_vs_reference: float | None = None  # over plain decoding in `reference_dtype`, same run and mode
    # greedy output vs plain greedy decoding of the target in the same dtype (None: sampling mode, or the baseline)
    exact_match: bool | None = None
    mismatch_rate: float | None = None
    first_difference: dict[str, Any] | None = None
    adaptive: bool = False  # the decoder chose n each step (n is None then)
    block_sizes: dict[str, int] | None = None  # decode steps per block size (our speculative decoders)
    extra: dict[str, Any] = field(default_factory=dict)


def _stats_fields(total: SpecStats) -> dict[str, Any]:
    """The result fields of a method's summed decoder counters (None where nothing was proposed)."""
    return {"acceptance_rate": total.acceptance_rate if total.proposed else None,
            "acceptance_by_position": total.acceptance_by_position,
            "mean_accepted_length": total.mean_accepted_length if total.decode_row_calls else None,
            "target_calls": total.target_calls}


def _lookup_fields(total: SpecStats) -> dict[str, Any]:
    """How much of the proposing prompt lookup did beside the draft, and how well each source was accepted."""
    return {"lookup_share_of_proposed": total.lookup_proposed / max(total.proposed, 1),
            "lookup_acceptance": total.lookup_accepted / total.lookup_proposed if total.lookup_proposed else None,
            "draft_acceptance": ((total.accepted - total.lookup_accepted) / (total.proposed - total.lookup_proposed)
                                 if total.proposed > total.lookup_proposed else None)}


class BenchRunner:
    """Holds the loaded models and runs each method over the prompts."""

    def __init__(self, config: BenchConfig, target: Any, draft: Any, tokenizer: Any,
                 prompts: list[torch.Tensor], reference: Any | None = None) -> None:
        self.config, self.target, self.draft, self.tokenizer, self.prompts = config, target, draft, tokenizer, prompts
        self.reference = reference  # the target in `config.reference_dtype`, or None
        if isinstance(draft, FeatureDraft) and "hf_assisted" in config.methods:
            raise InvalidArgumentError(
                f"methods: hf_assisted needs a layer draft (a causal LM transformers can run), but the draft "
                f"{config.draft or ''!r} is a feature-conditioned draft: drop hf_assisted from methods")
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def _prompts(self, warmup: bool) -> list[torch.Tensor]:
        """Warm-up passes use the first prompt only: they exist to fault in weights and code paths."""
        return self.prompts[:1] if warmup else self.prompts

    def _sampling(self, mode: str) -> dict[str, Any]:
        if mode == "greedy":
            return {"do_sample": False}
        return {"do_sample": True, "top_p": self.config.top_p, "temperature": self.config.temperature}

    def _ours(self, method: str, mode: str, n: int | None) -> Callable[[], tuple[int, Any]]:
        cfg = self.config
        if method in PLAIN:
            runner = self.target_runner if method == "plain" else self.reference_runner

            def gen(p: torch.Tensor, **kw: Any) -> SpecDecodeOutput:
                return autoregressive_generate(runner, p, **kw)
        elif method == "prompt_lookup":
            gen = PromptLookupDecoder(self.target_runner, n or cfg.max_speculative_tokens, cfg.lookup_max_ngram,
                                      batch_invariant=cfg.batch_invariant, prepack=cfg.prepack).generate
        else:
            settings = cfg.decoding_settings(n, lookup=method == "speculative_lookup")
            gen = SpeculativeDecoder(self.target_runner, self.draft_runner, settings=settings).generate
        sampling = self._sampling(mode)

        def run_all(warmup: bool = False) -> tuple[int, Any]:
            outs = []
            for seed in self._seeds(mode, warmup):
                g = torch.Generator().manual_seed(seed)
                outs += [gen(p, max_new_tokens=cfg.max_new_tokens, eos_token_id=self.eos, generator=g, **sampling)
                         for p in self._prompts(warmup)]
            return sum(o.stats.new_tokens for o in outs), outs
        return run_all

    def _seeds(self, mode: str, warmup: bool) -> list[int]:
        """The seeds one pass decodes every prompt under: `sampling_seeds` of them when sampling, else one."""
        count = 1 if (mode == "greedy" or warmup) else self.config.sampling_seeds
        return [self.config.seed + i for i in range(count)]

    def _hf(self, method: str, mode: str, n: int | None) -> Callable[[], tuple[int, Any]]:
        cfg = self.config
        kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "eos_token_id": self.eos,
                                  "pad_token_id": self.pad, **self._sampling(mode)}
        if not kwargs["do_sample"]:
            kwargs.update(top_p=None, top_k=None, temperature=None)
        else:
            kwargs["top_k"] = 0
        if method == "hf_assisted":
            gc = self.draft.generation_config
            if n is None:  # transformers' own adaptive schedule beside ours
                gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = cfg.max_speculative_tokens, "heuristic"
            else:
                gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = n, "constant"
                gc.assistant_confidence_threshold = 0.0  # fixed n, like ours
            kwargs["assistant_model"] = self.draft
        elif method == "hf_prompt_lookup":
            kwargs.update(prompt_lookup_num_tokens=n or cfg.max_speculative_tokens,
                          max_matching_ngram_size=cfg.lookup_max_ngram)

        @torch.inference_mode()
        def run_all(warmup: bool = False) -> tuple[int, Any]:
            total, new = 0, []
            for seed in self._seeds(mode, warmup):
                torch.manual_seed(seed)
                for p in self._prompts(warmup):
                    ids = p.unsqueeze(0).to(self.target.device)
                    out = self.target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
                    total += out.shape[1] - ids.shape[1]
                    new.append(out[0, ids.shape[1]:].tolist())
            return total, new
        return run_all

    @property
    def target_runner(self) -> CachedCausalLM:
        if not hasattr(self, "_target_runner"):
            self._target_runner = CachedCausalLM(self.target)
        return self._target_runner

    @property
    def reference_runner(self) -> CachedCausalLM:
        if self.reference is None:
            raise InvalidArgumentError("no reference target: set reference_dtype")
        if not hasattr(self, "_reference_runner"):
            self._reference_runner = CachedCausalLM(self.reference)
        return self._reference_runner

    def verify_widths(self) -> list[int]:
        """Every block width a verify of the jobs may have (batch 1): the fixed sizes, the adaptive bound, lookup's."""
        cfg = self.config
        widths = [n if n is not None else cfg.max_speculative_tokens for n in cfg.block_sizes]
        if "speculative_lookup" in cfg.methods:
            widths.append(cfg.lookup_tokens)
        return widths

    def choose_paths(self) -> tuple[CostTable | None, list[int]]:
        """Set the target's projection path per row count before anything is timed: with `prepack`, MKL-packed for
        every verify row count (forced); else the fastest path per row count of this host's cost table (measured
        once and cached, or `calibration_file`), packing only where packing wins. Returns (table, packed rows)."""
        cfg, runner = self.config, self.target_runner
        if cfg.prepack:
            return None, runner.prepack(prepack_rows(1, self.verify_widths()))
        if cfg.batch_invariant:
            return None, []
        rows = range(1, min(max(self.verify_widths()) + 1, COST_TABLE_MAX_ROWS) + 1)
        table = load_or_measure(runner, rows=rows, calibration_file=cfg.calibration_file)
        runner.apply_cost_table(table)
        return table, runner.packed_rows

    @property
    def draft_kind(self) -> str:
        return "feature" if isinstance(self.draft, FeatureDraft) else "layer"

    @property
    def draft_runner(self) -> CachedCausalLM | FeatureDraftRunner:
        """The draft's cached runner: a `CachedCausalLM` (layer draft) or a `FeatureDraftRunner`."""
        if not hasattr(self, "_draft_runner"):
            self._draft_runner = (FeatureDraftRunner(self.draft) if isinstance(self.draft, FeatureDraft)
                                  else CachedCausalLM(self.draft))
        return self._draft_runner

    def closure(self, method: str, mode: str, n: int | None) -> Callable[..., tuple[int, Any]]:
        """A callable that decodes every prompt once with `method`; returns (new tokens, outputs): our decoders'
        `SpecDecodeOutput`s, or the transformers peers' new-token lists."""
        return self._hf(method, mode, n) if method.startswith("hf_") else self._ours(method, mode, n)

    def run_jobs(self, jobs: list[tuple[str, int | None, str]]) -> list[MethodResult]:
        """Time every (mode, n, method) job, interleaving the repeats (job 1, job 2, ..., job 1, job 2, ...).

        Interleaving spreads slow periods of a shared machine over all methods instead of one.
        """
        cfg = self.config
        runs = [self.closure(method, mode, n) for mode, n, method in jobs]
        for run_all in runs:
            for _ in range(cfg.warmup):
                run_all(warmup=True)
        samples: list[list[tuple[float, int, float, Any]]] = [[] for _ in jobs]
        for _ in progress(range(cfg.repeats), desc="bench repeats"):
            for i, run_all in enumerate(runs):
                wall, (tokens, outs) = timed(run_all)
                samples[i].append((tokens / wall, tokens, wall, outs))
        results, new_tokens = [], []
        for (mode, n, method), runs_of_job in zip(jobs, samples, strict=True):
            rates = [s[0] for s in runs_of_job]
            median_rate = statistics.median(rates)
            _, tokens, wall, outs = min(runs_of_job, key=lambda s: abs(s[0] - median_rate))
            result = MethodResult(method=method, mode=mode, n=None if method in PLAIN else n,
                                  tokens_per_s=median_rate, new_tokens=tokens, wall_time_s=wall,
                                  repeats_tokens_per_s=rates, adaptive=method not in PLAIN and n is None)
            if method not in PLAIN and not method.startswith("hf_"):
                total = SpecStats.merge(o.stats for o in outs)  # the counters of the median repeat's runs
                for key, value in _stats_fields(total).items():
                    setattr(result, key, value)
                if method != "prompt_lookup":
                    result.block_sizes = {str(k): v for k, v in sorted(total.block_sizes.items())}
                if method == "speculative_lookup":
                    result.extra = _lookup_fields(total)
            results.append(result)
            new_tokens.append([_new_tokens(o) for o in outs])
        self._record_exactness(results, new_tokens)
        return results

    def _record_exactness(self, results: list[MethodResult], new_tokens: list[list[list[int]]]) -> None:
        """Compare every greedy method's outputs with plain greedy decoding of the target in the same dtype
        (the `plain` job's, or one untimed plain pass when `plain` is not benchmarked)."""
        greedy = [(r, toks) for r, toks in zip(results, new_tokens, strict=True)
                  if r.mode == "greedy" and r.method not in PLAIN]
        if not greedy:
            return
        plain = next((toks for r, toks in zip(results, new_tokens, strict=True)
                      if r.method == "plain" and r.mode == "greedy"), None)
        if plain is not None:
            reference = plain
        else:
            reference = [autoregressive_generate(self.target_runner, p, max_new_tokens=self.config.max_new_tokens,
                                                 eos_token_id=self.eos).new_tokens() for p in self.prompts]
        for r, toks in greedy:
            check = compare_greedy(reference, toks)
            r.exact_match, r.mismatch_rate, r.first_difference = (check["exact_match"], check["mismatch_rate"],
                                                                   check["first_difference"])


def _new_tokens(output: Any) -> list[int]:
    """New tokens of one prompt's output: a `SpecDecodeOutput` (batch 1) or a transformers peer's token list."""
    return output.new_tokens() if isinstance(output, SpecDecodeOutput) else list(output)


def load_bench_models(config: BenchConfig) -> tuple[Any, Any, Any]:
    """Target, draft (loaded, of either kind, or derived from the target's first layers) and the target's
    tokenizer."""
    tokenizer = load_tokenizer(config.target)
    if config.draft:  # a draft with another tokenizer is refused before any model is loaded
        check_draft_tokenizer(config.target, config.draft, target_tokenizer=tokenizer)
    from soaes_core.placement import Placement

    target = load_model(config.target, dtype=config.dtype, device=Placement(device=config.device).resolve().device)
    if config.draft:  # restricted head applied; a feature-draft directory loads as a FeatureDraft
        draft = load_any_draft(config.draft, dtype=config.dtype, device=target.device)
    else:
        draft = make_layer_draft(target, config.draft_layers)
    return target, draft, tokenizer


def run_benchmark(config: BenchConfig, out_dir: str | os.PathLike[str], models: tuple[Any, Any, Any] | None = None,
                  ) -> dict[str, Any]:
    """Run every (mode, n, method), write bench.json, bench.md, bench.png and a manifest; return the report."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    target, draft, tokenizer = models if models is not None else load_bench_models(config)
    prompts = load_prompts(config.prompts, tokenizer, config.max_prompts)
    reference = None
    if config.reference_dtype and resolve_dtype(config.reference_dtype) != target.dtype:
        reference = load_model(config.target, dtype=config.reference_dtype, device=target.device)
    runner = BenchRunner(config, target, draft, tokenizer, prompts, reference)
    device = runner.target_runner.device
    bandwidth = measure_bandwidth(megabytes=256 if device.type == "cpu" else 4096, device=device)
    target_bytes = runner.target_runner.num_parameter_bytes()
    context = int(statistics.median(p.numel() for p in prompts)) + config.max_new_tokens // 2
    table, packed_rows = runner.choose_paths()
    verifier = runner.target_runner.with_batch_invariance() if config.batch_invariant else runner.target_runner
    costs = {n: measure_costs(verifier, runner.draft_runner, n, context)  # c_v of the verify the decoders run
             for n in config.num_speculative_tokens}
    blocks = config.block_sizes
    jobs = [(mode, n, m) for mode in config.modes for n in blocks for m in config.methods
            if not (m == "plain" and n != blocks[0])]
    if reference is not None:
        jobs += [(mode, blocks[0], REFERENCE) for mode in config.modes]
    log.info("bench: %d jobs x %d repeats (interleaved) over %d prompts", len(jobs), config.repeats, len(prompts))
    results = runner.run_jobs(jobs)
    rows = []
    for r in results:
        plain = next((p for p in results if p.method == "plain" and p.mode == r.mode), None)
        if plain is not None and plain.tokens_per_s > 0:
            r.speedup_vs_plain = r.tokens_per_s / plain.tokens_per_s
        ref = next((p for p in results if p.method == REFERENCE and p.mode == r.mode), None)
        if ref is not None and ref.tokens_per_s > 0:
            r.speedup_vs_reference = r.tokens_per_s / ref.tokens_per_s
        if r.method == "speculative" and r.acceptance_rate is not None and r.n in costs:
            cost = costs[r.n]
            bound = theoretical_speedup(r.acceptance_rate, r.n, cost["c"], cost["c_v"])
            r.extra = {"c": cost["c"], "c_v": cost["c_v"],
                       "break_even_acceptance": break_even_acceptance(r.n, cost["c"], cost["c_v"]),
                       "expected_accepted_length": expected_accepted_length(r.acceptance_rate, r.n),
                       "theoretical_speedup": bound,
                       "measured_over_theoretical": (r.speedup_vs_plain or 0.0) / bound if bound > 0 else None}
        if r.method == "plain":
            achieved = target_bytes * r.tokens_per_s / 1e9
            r.extra = {"achieved_bandwidth_gb_s": achieved, "fraction_of_machine_bandwidth": achieved / bandwidth}
        rows.append(asdict(r))
    for mode in config.modes:
        ours = next((r for r in results if r.method == "speculative" and r.mode == mode), None)
        peer = next((r for r in results if r.method == "hf_assisted" and r.mode == mode and ours
                     and r.n == ours.n and r.adaptive == ours.adaptive), None)
        if ours and peer and peer.tokens_per_s > 0:
            ours.extra["vs_hf_assisted"] = ours.tokens_per_s / peer.tokens_per_s
            next(row for row in rows if row["method"] == "speculative" and row["mode"] == mode)["extra"] = ours.extra
    report = {
        "config": asdict(config),
        "host": host_info(),
        "cost_table": table.to_dict() if table is not None else None,
        "projection_paths": {str(r): runner.target_runner.path_for_rows(r)
                             for r in range(1, max([max(runner.verify_widths()) + 1, *(table.rows if table else [])])
                                            + 1)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": str(runner.target_runner.device), "matvec_bandwidth_gb_s": bandwidth,
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "target_weight_bytes": target_bytes,
        "prepacked_rows": packed_rows,
        "prepacked_bytes": runner.target_runner.prepacked_bytes(),
        "padded_rows": {str(r): runner.target_runner.pass_rows(r) for r in range(2, max(packed_rows, default=0))
                        if runner.target_runner.pass_rows(r) != r},
        "draft_kind": runner.draft_kind,
        "draft_weight_bytes": runner.draft_runner.num_parameter_bytes(),
        "num_prompts": len(prompts),
        "context_for_costs": context,
        "costs": {str(n): c for n, c in costs.items()},
        "definitions": {
            "acceptance_rate": "accepted draft tokens / proposed draft tokens",
            "mean_accepted_length": "new tokens per decode-phase target call (bonus token included)",
            "speedup_vs_plain": "tokens/s divided by plain autoregressive tokens/s of the same target and mode",
            "speedup_vs_reference": "tokens/s divided by plain decoding of the target in reference_dtype "
                                    "(same run and mode)",
            "theoretical_speedup": "S = E[L] / (n*c + c_v), E[L] = (1 - a^(n+1)) / (1 - a)",
            "exact_match": "greedy mode: every prompt's new tokens equal plain greedy decoding of the target in the "
                           "same dtype, token for token (null for sampling rows and the plain baselines)",
            "mismatch_rate": "prompts whose greedy output differs from plain greedy decoding / prompts",
            "first_difference": "0-based new-token index of the first difference: min / median / max over the "
                                "differing prompts, and their indices",
        },
        "results": rows,
        "wall_time_s": time.perf_counter() - t_start,
    }
    atomic_write_json(out / "bench.json", report)
    atomic_write_text(out / "bench.md", render_markdown(report))
    plot_results(report, out / "bench.png")
    write_manifest(out, "specdec-bench", config=config, counts={"prompts": len(prompts), "results": len(rows)},
                   timings={"total_s": report["wall_time_s"]})
    return report


# ----------------------------------------------------------------------------------------- reporting


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _exactness_cell(row: dict[str, Any]) -> str:
    """'yes', 'no: k/N prompts, first difference at token i..j', 'baseline' or 'N/A' (sampling)."""
    if row["mode"] != "greedy":
        return "N/A (sampling)"
    if row.get("exact_match") is None:
        return "baseline"
    if row["exact_match"]:
        return "yes"
    first = row["first_difference"]
    return (f"no: {row['mismatch_rate']:.0%} of prompts ({len(first['prompts'])}), first difference at new token "
            f"{first['min']}–{first['max']} (median {first['median']:g})")


def _n_cell(row: dict[str, Any]) -> str:
    """The block size column: the fixed n, 'auto' for the decoder choosing n, '–' for plain decoding."""
    return "auto" if row.get("adaptive") else _fmt(row["n"])


def _label(row: dict[str, Any]) -> str:
    return row["method"] if row["n"] is None and not row.get("adaptive") else f"{row['method']} n={_n_cell(row)}"


def _histogram(sizes: dict[str, int] | None) -> str:
    """Steps per block size as 'n:steps' pairs (0 = a plain step)."""
    return " ".join(f"{n}:{c}" for n, c in sorted((sizes or {}).items(), key=lambda kv: int(kv[0]))) or "–"


def render_markdown(report: dict[str, Any]) -> str:
    """A readable table per mode plus the cost model and bandwidth lines."""
    cfg, machine = report["config"], report["machine"]
    draft = cfg["draft"] or f"first {cfg['draft_layers']} layers of the target"
    kind = " (feature-conditioned)" if report.get("draft_kind") == "feature" else ""
    load = ", ".join(f"{x:.1f}" for x in machine["load_average"] or ())
    lines = [
        "# Speculative decoding benchmark", "",
        f"target `{cfg['target']}`, draft `{draft}`{kind}, "
        f"{report['num_prompts']} prompts, max_new_tokens {cfg['max_new_tokens']}, batch 1, {cfg['dtype']}, "
        f"warm-up {cfg['warmup']}, median of {cfg['repeats']} interleaved repeats; "
        f"{machine['torch_threads']} threads on {machine['cpu_count']} CPUs (load average at end {load}).", "",
        f"Host: {format_host(report['host'])}." if report.get("host") else "", "",
        "acceptance = accepted / proposed draft tokens; mean length = new tokens per target call (bonus included); "
        "S = E[L]/(n·c + c_v); output = plain: greedy output equal, token for token on every prompt, to plain greedy "
        f"decoding of the target in {cfg['dtype']}"
        f"{' (batch-invariant verification)' if cfg.get('batch_invariant') else ''}.", "",
    ]
    for mode in cfg["modes"]:
        title = "greedy" if mode == "greedy" else f"top-p {cfg['top_p']} (T={cfg['temperature']})"
        lines += [f"## {title}", "",
                  "| method | n | tokens/s | speedup vs plain | acceptance | per-position acceptance | mean length "
                  "| c | c_v | S | measured/S | block sizes (n:steps) | output = plain |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["results"]:
            if r["mode"] != mode:
                continue
            x = r.get("extra") or {}
            per_pos = ", ".join(f"{a:.2f}" for a in (r.get("acceptance_by_position") or [])) or "–"
            lines.append(
                f"| {r['method']} | {_n_cell(r)} | {_fmt(r['tokens_per_s'], 1)} | {_fmt(r['speedup_vs_plain'])}× "
                f"| {_fmt(r['acceptance_rate'], 3)} | {per_pos} | {_fmt(r['mean_accepted_length'])} "
                f"| {_fmt(x.get('c'), 3)} | {_fmt(x.get('c_v'), 3)} | {_fmt(x.get('theoretical_speedup'))} "
                f"| {_fmt(x.get('measured_over_theoretical'))} | {_histogram(r.get('block_sizes'))} "
                f"| {_exactness_cell(r)} |")
        ours = next((r for r in report["results"] if r["method"] == "speculative" and r["mode"] == mode), None)
        if ours and (ours.get("extra") or {}).get("break_even_acceptance") is not None:
            lines += ["", f"Break-even acceptance for n={ours['n']} at the measured c and c_v: "
                          f"{ours['extra']['break_even_acceptance']:.2f} (measured {ours['acceptance_rate']:.3f})."]
        ref = next((r for r in report["results"] if r["method"] == REFERENCE and r["mode"] == mode), None)
        if ref is not None:
            vs = ", ".join(f"{_label(r)} {r['speedup_vs_reference']:.2f}×" for r in report["results"]
                           if r["mode"] == mode and r["method"] != REFERENCE)
            lines += ["", f"Against plain decoding of the target in {cfg['reference_dtype']} "
                          f"({ref['tokens_per_s']:.1f} tokens/s, same run): {vs}."]
        if ours and (ours.get("extra") or {}).get("vs_hf_assisted") is not None:
            lines += ["", f"Our speculative decoder vs transformers assisted generation (same models, n): "
                          f"{ours['extra']['vs_hf_assisted']:.2f}×."]
        lines.append("")
    paths = report.get("projection_paths") or {}
    if paths:
        table = report.get("cost_table") or {}
        source = table.get("source", "prepack forced" if report.get("prepacked_rows") else "none")
        lines += ["## Projection paths", "",
                  "The target's projection path per pass row count (cost table: " + source + "): "
                  + ", ".join(f"{r} rows {p}" for r, p in paths.items()) + ".", ""]
    plain = [r for r in report["results"] if r["method"] == "plain"]
    if plain:
        p = plain[0]["extra"]
        lines += ["## Bandwidth", "",
                  f"Plain decoding reads {report['target_weight_bytes'] / 1e6:.0f} MB of weights per token: "
                  f"{p['achieved_bandwidth_gb_s']:.1f} GB/s achieved vs {machine['matvec_bandwidth_gb_s']:.1f} GB/s "
                  f"for a large matrix-vector product ({100 * p['fraction_of_machine_bandwidth']:.0f}%).", ""]
    return "\n".join(lines)


def plot_results(report: dict[str, Any], path: Path) -> None:
    """Grouped bars of tokens/s per method, one group per mode (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["config"]["modes"]
    order = (*METHODS, REFERENCE)
    labels = sorted({(r["method"], r["n"]) for r in report["results"]}, key=lambda m: (order.index(m[0]), m[1] or 0))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * len(modes)), 4))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        values = []
        for method, n in labels:
            r = next((r for r in report["results"] if r["method"] == method and r["n"] == n and r["mode"] == mode),
                     None)
            values.append(r["tokens_per_s"] if r else 0.0)
        ax.bar([i + j * width for i in range(len(labels))], values, width, label=mode)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(labels))])
    ref = report["config"].get("reference_dtype")
    ax.set_xticklabels([f"plain\n{ref}" if m == REFERENCE else m if n is None else f"{m}\nn={n}" for m, n in labels],
                       fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title("Decoding speed, batch 1")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
