"""Teacher answers for draft training: prompts from one of the domain-draft paper's three data sources (a prompt file,
Magpie generation, passage queries), a held-out split, and the teacher's greedy (plus optional sampled) answers as
chat records, token data and rejects.

Answers come from soaes-specdec's cached decoder in fixed batches (`engine: soaes`) or from vLLM's offline
`LLM.generate` with tensor parallelism (`engine: vllm`, an optional extra). Each batch's answers are appended to a
partial file as it finishes, keyed by prompt id and text, and every sampled row draws from a seed derived from its
prompt, so a rerun after a kill answers only the prompts not yet answered and ends with the records an uninterrupted
run writes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from soaes_core import DEFAULT_MODEL, read_jsonl, write_jsonl
from soaes_core.errors import ConfigError, DataError
from soaes_core.placement import Placement

log = logging.getLogger(__name__)

VLLM_MISSING = "engine 'vllm': vLLM is not installed; install the extra: pip install 'soaes-distill[vllm]'"
PARTIAL_DIR = "answers.partial"  # per-pass answer files of an unfinished run (removed when the run completes)
SOURCES = ("prompts", "magpie", "passages")


def vllm_available() -> bool:
    """Whether vLLM can be imported (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def check_engine(engine: str) -> None:
    """ValueError (one line) for an unknown engine, or for `vllm` where vLLM is not installed."""
    if engine not in ("soaes", "vllm"):
        raise ValueError(f"engine must be 'soaes' or 'vllm', got {engine!r}")
    if engine == "vllm" and not vllm_available():
        raise ValueError(VLLM_MISSING)


@dataclass
class VLLMSettings:
    """vLLM's offline engine (`vllm.LLM`) for `engine: vllm`: tensor parallelism and memory; the sampling settings
    are the config's own, mapped onto `vllm.SamplingParams`."""

    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs the teacher is sharded over"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "fraction of each GPU's memory vLLM uses"})
    dtype: str = field(default="auto", metadata={"help": "vLLM dtype: auto, bfloat16, float16 or float32"})
    max_model_len: int | None = field(default=None, metadata={"help": "context length (default: the model's)"})
    enforce_eager: bool = field(default=False, metadata={"help": "no CUDA graphs (faster start, slower decode)"})

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (or unset), got {self.max_model_len}")


@dataclass
class MagpieSettings:
    """Magpie queries (`source: magpie`): `num_queries` user turns sampled from the chat template's pre-query prefix
    alone, then filtered by length, language and near-duplicates (soaes-distill `synth.QueryFilter`)."""

    num_queries: int = field(default=64, metadata={"help": "user turns to generate"})
    system: str | None = field(default=None, metadata={"help": "system prompt steering the queries' domain"})
    max_query_tokens: int = field(default=64, metadata={"help": "new tokens per query"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the queries"})
    top_p: float = field(default=0.95, metadata={"help": "top-p of the queries"})
    min_chars: int = field(default=8, metadata={"help": "shorter queries are dropped"})
    max_chars: int = field(default=400, metadata={"help": "longer queries are dropped"})
    language: str = field(default="any", metadata={"help": "keep only queries in this language: any, zh or en"})
    dedup_jaccard: float = field(default=0.8, metadata={"help": "trigram Jaccard of a near-duplicate query"})

    def __post_init__(self) -> None:
        if self.num_queries < 1 or self.max_query_tokens < 1:
            raise ValueError("num_queries and max_query_tokens must be >= 1")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")
        self.query_filter()

    def query_filter(self) -> Any:
        from .synth import QueryFilter

        return QueryFilter(self.min_chars, self.max_chars, self.language, self.dedup_jaccard)


@dataclass
class PassageSettings:
    """Passage queries (`source: passages`, or extra prompts of `source: prompts` when `max_queries` > 0): keyword
    templates and passage instructions over domain text (soaes-distill `domain_queries`). `texts`: JSONL files with
    `text` or chat `messages`."""

    texts: list[str] = field(default_factory=list, metadata={"help": "domain text JSONL files"})
    max_queries: int = field(default=0, metadata={"help": "template fills (0: none, with source prompts)"})
    num_terms: int = field(default=200, metadata={"help": "jieba keywords used as template slots"})

    def __post_init__(self) -> None:
        if self.max_queries < 0 or self.num_terms < 1:
            raise ValueError(f"need max_queries >= 0 and num_terms >= 1, got {self.max_queries} and {self.num_terms}")


@dataclass
class TeacherAnswersConfig:
    """What the teacher answers and how: the data source, the held-out split (a committed file, training prompts
    sharing a `decontam_ngram`-character span with one dropped; or every `holdout_every`-th prompt), the greedy answers
    plus `samples_per_prompt` sampled ones per training prompt, and the engine that generates them."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "teacher model spec"})
    source: Literal["prompts", "magpie", "passages"] = field(
        default="prompts", metadata={"help": "prompts (files), magpie (generated queries) or passages (domain text)"})
    prompts: list[str] = field(default_factory=list, metadata={"help": "prompt JSONL files (source prompts)"})
    heldout_prompts: str | None = field(default=None, metadata={"help": "committed held-out prompts JSONL"})
    holdout_every: int = field(default=4, metadata={"help": "without heldout_prompts: every k-th prompt is held out"})
    max_heldout: int | None = field(default=None, metadata={"help": "held-out prompts kept from the file"})
    max_prompts: int | None = field(default=None, metadata={"help": "candidate prompts used (default: all)"})
    decontam_ngram: int = field(default=8, metadata={"help": "shared characters that make a prompt contaminated"})
    passages: PassageSettings = field(default_factory=PassageSettings)
    magpie: MagpieSettings = field(default_factory=MagpieSettings)
    max_new_tokens: int = field(default=48, metadata={"help": "new tokens per answer"})
    max_length: int = field(default=192, metadata={"help": "tokens per training example"})
    batch_size: int = field(default=8, metadata={"help": "prompts per batch (and per saved step of a resumable run)"})
    samples_per_prompt: int = field(default=0, metadata={"help": "sampled answers per training prompt"})
    sample_temperature: float = field(default=1.0, metadata={"help": "temperature of the sampled answers"})
    sample_top_p: float = field(default=0.7, metadata={"help": "top-p of the sampled answers"})
    seed: int = field(default=0, metadata={"help": "seed of every draw (each prompt's seed derives from it)"})
    engine: Literal["soaes", "vllm"] = field(default="soaes", metadata={"help": "soaes (own decoder) or vllm"})
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    placement: Placement = field(default_factory=Placement)  # where engine soaes loads the teacher

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        check_engine(self.engine)
        if self.holdout_every < 2:
            raise ValueError(f"holdout_every must be >= 2, got {self.holdout_every}")
        if self.samples_per_prompt < 0 or self.decontam_ngram < 1:
            raise ValueError("samples_per_prompt must be >= 0 and decontam_ngram >= 1")
        for name in ("max_new_tokens", "batch_size", "max_heldout", "max_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.sample_temperature <= 0 or not 0.0 < self.sample_top_p <= 1.0:
            raise ValueError(f"need sample_temperature > 0 and 0 < sample_top_p <= 1, got {self.sample_temperature} "
                             f"and {self.sample_top_p}")
        if self.source == "prompts" and not self.prompts:
            raise ValueError("source 'prompts' needs at least one file in prompts")
        if self.source == "passages" and (self.passages.max_queries < 1 or not self.passages.texts):
            raise ValueError("source 'passages' needs passages.texts and passages.max_queries >= 1")


@dataclass
class TeacherAnswersJob(TeacherAnswersConfig):
    """A `TeacherAnswersConfig` with the folder its outputs go to (the `teacher-answers` command)."""

    output_dir: str = field(default="teacher-answers",
                            metadata={"help": "output folder (an interrupted run there is resumed)"})


@dataclass
class TeacherAnswersResult:
    """Counts for a manifest: prompts, per split prompts/records/examples, rejects, answers reused from a partial
    run."""

    counts: dict[str, Any]
    out_dir: Path


# ---------------------------------------------------------------------------------------------- prompts


def _files(paths: Sequence[str | os.PathLike[str]], resolve: Callable[[str], Path] | None) -> list[Path]:
    return [resolve(str(p)) if resolve else Path(p) for p in paths]


def passage_texts(paths: Sequence[Path]) -> list[str]:
    """The texts of JSONL files: each row's `text`, or the contents of its chat `messages`."""
    texts: list[str] = []
    for f in paths:
        for rec in read_jsonl(f):
            texts += [rec["text"]] if isinstance(rec.get("text"), str) else [
                m["content"] for m in rec.get("messages", []) if isinstance(m.get("content"), str)]
    return texts


def check_files(cfg: TeacherAnswersConfig, resolve: Callable[[str], Path] | None = None) -> None:
    """One `ConfigError` naming the field of the first input file of `cfg` that does not exist."""
    named = [("heldout_prompts", cfg.heldout_prompts)]
    if cfg.source == "prompts":
        named += [(f"prompts[{i}]", p) for i, p in enumerate(cfg.prompts)]
    if cfg.source == "passages" or (cfg.source == "prompts" and cfg.passages.max_queries):
        named += [(f"passages.texts[{i}]", p) for i, p in enumerate(cfg.passages.texts)]
    for where, value in named:
        if value is not None and not _files([value], resolve)[0].is_file():
            raise ConfigError(f"{where}: no such file: {_files([value], resolve)[0]}")


def _passage_queries(cfg: TeacherAnswersConfig, held: list[dict[str, Any]], rejects: list[dict[str, Any]],
                     resolve: Callable[[str], Path] | None) -> list[dict[str, Any]]:
    from .domain_queries import DomainQueryConfig, build_domain_queries

    dq = DomainQueryConfig(num_terms=cfg.passages.num_terms, max_queries=cfg.passages.max_queries,
                           decontam_ngram=cfg.decontam_ngram, seed=cfg.seed)
    q = build_domain_queries(passage_texts(_files(cfg.passages.texts, resolve)), [h["prompt"] for h in held], dq)
    rejects += q.rejects
    return q.prompts


def _decontaminate(prompts: list[dict[str, Any]], held: list[dict[str, Any]], ngram: int,
                   rejects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`prompts` without those the held-out matcher finds in `held`; each dropped one goes to `rejects`."""
    from .domain_queries import held_out_matcher

    match = held_out_matcher([h["prompt"] for h in held], ngram)
    kept = []
    for p in prompts:
        if match(p["prompt"]) is not None:
            rejects.append({"id": p.get("id"), "reason": f"shares a {ngram}-character span with a held-out prompt"})
        else:
            kept.append(p)
    return kept


def _split(cfg: TeacherAnswersConfig, candidates: list[dict[str, Any]], rejects: list[dict[str, Any]],
           resolve: Callable[[str], Path] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The committed held-out file (training candidates decontaminated against it), or every k-th candidate."""
    from soaes_core import read_prompts

    if cfg.heldout_prompts is None:
        k = cfg.holdout_every
        held = [p for i, p in enumerate(candidates) if i % k == k - 1]
        train = [p for i, p in enumerate(candidates) if i % k != k - 1]
    else:
        held = read_prompts(_files([cfg.heldout_prompts], resolve)[0])
        held = held[: cfg.max_heldout] if cfg.max_heldout else held
        train = candidates
    return _decontaminate(train, held, cfg.decontam_ngram, rejects), held


def teacher_prompts(cfg: TeacherAnswersConfig, rejects: list[dict[str, Any]], *,
                    resolve: Callable[[str], Path] | None = None,
                    magpie_queries: Callable[[], list[dict[str, Any]]] | None = None,
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and held-out prompts (`{"id", "prompt"}`) of `cfg.source`; what is dropped goes to `rejects` with the
    reason. `resolve` maps a configured path to a file; `magpie_queries` makes the Magpie candidates."""
    from soaes_core import read_prompts

    if cfg.source == "prompts":
        prompts = [p for f in _files(cfg.prompts, resolve) for p in read_prompts(f)]
        train, held = _split(cfg, prompts[: cfg.max_prompts] if cfg.max_prompts else prompts, rejects, resolve)
        if cfg.passages.max_queries:
            train += _passage_queries(cfg, held, rejects, resolve)
        return train, held
    if cfg.source == "magpie":
        if magpie_queries is None:
            raise ValueError("source 'magpie' needs a teacher to write the queries")
        candidates = magpie_queries()
    else:
        candidates = _passage_queries(cfg, [], rejects, resolve)
    return _split(cfg, candidates[: cfg.max_prompts] if cfg.max_prompts else candidates, rejects, resolve)


# ---------------------------------------------------------------------------------------------- engines


@dataclass(frozen=True)
class Sampling:
    """One pass's decoding: greedy, or sampling at `temperature` / `top_p` (each row from its own seed)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


def row_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one prompt's draws: sha256 of the pass seed and the prompt's key."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SoaesEngine:
    """Teacher answers on soaes-specdec's cached decoder: a batch runs as one `DecodeSession`, its rows decoding
    together and each sampling row drawing from its own seed, so an answer does not depend on the batch's other rows'
    draws."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from .synth import end_of_turn_ids

        self.model, self.tokenizer, self.eos = model, tokenizer, end_of_turn_ids(tokenizer)

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, max_new_tokens: int,
                 max_tokens: int) -> list[list[int]]:
        """New tokens (end of turn dropped) per prompt; `max_tokens` sizes the caches (prompt + new tokens)."""
        from soaes_specdec.sampling import SamplingParams
        from soaes_specdec.session import DecodeSession

        params = SamplingParams(sampling.do_sample, sampling.temperature, sampling.top_p)
        session = DecodeSession(self.model, max_rows=len(prompts), max_tokens=max_tokens, eos_token_id=self.eos)
        rows = {session.add_row(p, max_new_tokens, params, seed=s): i for i, (p, s) in enumerate(zip(prompts, seeds,
                                                                                                     strict=True))}
        out: list[list[int]] = [[] for _ in prompts]
        while session.num_rows:
            for row_id, update in session.step().items():
                out[rows[row_id]].extend(update.tokens)
        return [[t for t in toks if t not in self.eos] for toks in out]


class VLLMEngine:
    """Teacher answers from vLLM's offline engine (`vllm.LLM.generate`, tensor-parallel): greedy passes at
    temperature 0, sampled ones at the pass's temperature / top_p with the row's seed, stopping at end of turn."""

    def __init__(self, cfg: TeacherAnswersConfig, tokenizer: Any) -> None:
        from soaes_core.models import resolve_model_dir

        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError(VLLM_MISSING) from None
        from .synth import end_of_turn_ids

        model = cfg.model.removeprefix("hf:") if cfg.model.startswith("hf:") else str(resolve_model_dir(cfg.model))
        v = cfg.vllm
        self.llm = LLM(model=model, tokenizer=model, tensor_parallel_size=v.tensor_parallel_size,
                       gpu_memory_utilization=v.gpu_memory_utilization, dtype=v.dtype, max_model_len=v.max_model_len,
                       enforce_eager=v.enforce_eager, seed=cfg.seed, trust_remote_code=False)
        self.eos = end_of_turn_ids(tokenizer)

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling, max_new_tokens: int,
                 max_tokens: int) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=1, temperature=sampling.temperature if sampling.do_sample else 0.0,
                                 top_p=sampling.top_p if sampling.do_sample else 1.0, max_tokens=max_new_tokens,
                                 seed=s, stop_token_ids=list(self.eos)) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [[t for t in o.outputs[0].token_ids if t not in self.eos] for o in outs]


# ---------------------------------------------------------------------------------------------- resumable passes


def _key(prompt_id: Any, text: str) -> str:
    return json.dumps([prompt_id, text], ensure_ascii=False)


def _read_partial(path: Path) -> dict[str, str]:
    """Answers of the complete lines of a partial file; a torn last line (a kill mid-write) is cut off."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    done = {}
    for n, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), 1):
        try:
            rec = json.loads(line)
            done[rec["key"]] = str(rec["answer"])
        except (ValueError, KeyError, TypeError):
            raise DataError("not a saved answer (delete the file to answer its prompts again)", path=str(path),
                            line=n) from None
    return done


def _append(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append complete JSON lines and fsync, so a kill leaves whole batches (at most a torn last line)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


class _Answerer:
    """Runs passes of prompts through an engine in fixed batches, appending each batch's answers to the pass's partial
    file and skipping the prompts answered there before."""

    def __init__(self, engine: Any, tokenizer: Any, cfg: TeacherAnswersConfig, partial: Path) -> None:
        self.engine, self.tokenizer, self.cfg, self.partial = engine, tokenizer, cfg, partial
        self.reused = 0

    def run(self, name: str, prompts: list[tuple[Any, str, list[int]]], sampling: Sampling, seed: int,
            max_new_tokens: int) -> list[str]:
        """Answer texts for `(id, text, token ids)` prompts in order (one answer per distinct id and text)."""
        from soaes_core.progress import progress_bar

        path = self.partial / f"{name}.jsonl"
        done = _read_partial(path)
        keys = [_key(pid, text) for pid, text, _ in prompts]
        todo, seen = [], set()
        for k, p in zip(keys, prompts, strict=True):
            if k not in done and k not in seen:
                seen.add(k)
                todo.append((k, p))
        self.reused += len(set(keys)) - len(todo)
        max_tokens = max((len(ids) for _, _, ids in prompts), default=1) + max_new_tokens
        bs = self.cfg.batch_size
        with progress_bar(total=len(set(keys)), desc=f"teacher answers ({name})", unit="prompt") as bar:
            bar.update(len(set(keys)) - len(todo))
            for s in range(0, len(todo), bs):
                batch = todo[s:s + bs]
                toks = self.engine.generate([p[2] for _, p in batch], [row_seed(seed, k) for k, _ in batch],
                                            sampling, max_new_tokens, max_tokens)
                rows = [{"key": k, "id": p[0], "answer": self.tokenizer.decode(t, skip_special_tokens=True).strip()}
                        for (k, p), t in zip(batch, toks, strict=True)]
                _append(path, rows)
                done.update((r["key"], r["answer"]) for r in rows)
                bar.update(len(batch))
        return [done[k] for k in keys]


def _settings_fingerprint(cfg: TeacherAnswersConfig) -> dict[str, Any]:
    """What the partial answers depend on besides the prompts: a partial run made with other settings is discarded."""
    from soaes_core.config import to_dict

    keep = ("model", "max_new_tokens", "sample_temperature", "sample_top_p", "seed", "engine", "magpie")
    out = {k: to_dict(getattr(cfg, k)) for k in keep}
    out["placement"] = to_dict(cfg.placement) if cfg.engine == "soaes" else None
    return out


def _open_partial(out: Path, cfg: TeacherAnswersConfig) -> Path:
    partial = out / PARTIAL_DIR
    marker = partial / "settings.json"
    fp = _settings_fingerprint(cfg)
    if partial.is_dir():
        try:
            same = json.loads(marker.read_text(encoding="utf-8")) == fp
        except (OSError, ValueError):
            same = False
        if not same:
            log.warning("discarding the partial teacher answers in %s: made with other settings", partial)
            shutil.rmtree(partial)
    if not partial.is_dir():
        partial.mkdir(parents=True)
        from soaes_core import atomic_write_json

        atomic_write_json(marker, fp)
    return partial


# ---------------------------------------------------------------------------------------------- entry point


def _chat_records(prompts: list[dict[str, Any]], answers: list[str], source: str,
                  sampling: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Chat records in `synth.blackbox_sft_records` / `sampled_sft_records`' format."""
    out = []
    for p, a in zip(prompts, answers, strict=True):
        rec: dict[str, Any] = {"id": p["id"], "messages": [{"role": "user", "content": p["prompt"]},
                                                           {"role": "assistant", "content": a}], "source": source}
        if sampling is not None:
            rec["sampling"] = dict(sampling)
        out.append(rec)
    return out


def make_engine(cfg: TeacherAnswersConfig, model: Any = None, tokenizer: Any = None) -> SoaesEngine | VLLMEngine:
    """The engine of `cfg`: `model` (or the teacher loaded at `cfg.placement`) on soaes' decoder, or vLLM."""
    from soaes_core import load_model, load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    if cfg.engine == "vllm":
        return VLLMEngine(cfg, tokenizer)
    if model is None:
        model = load_model(cfg.model, **cfg.placement.resolve().load_kwargs()).eval()
    return SoaesEngine(model, tokenizer)


def generate_teacher_answers(cfg: TeacherAnswersConfig, out_dir: str | os.PathLike[str], *, model: Any = None,
                             tokenizer: Any = None, engine: Any = None,
                             resolve: Callable[[str], Path] | None = None,
                             on_split_done: Callable[[str], None] | None = None) -> TeacherAnswersResult:
    """Write `{train,heldout}_{records,tokens,prompts}.jsonl` and `rejects.jsonl` into `out_dir`, resuming the
    answers of an interrupted run there. `model`/`tokenizer`/`engine` replace the ones `cfg` names; `resolve` maps
    configured paths to files; `on_split_done(split)` is called after each split's files are written."""
    from soaes_core import encode_chat_prompt, load_tokenizer

    from .synth import chat_records_to_examples, filter_queries, pre_query_prefix
    from .token_data import write_token_jsonl

    check_files(cfg, resolve)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    engine = engine if engine is not None else make_engine(cfg, model, tok)
    answerer = _Answerer(engine, tok, cfg, _open_partial(out, cfg))
    rejects: list[dict[str, Any]] = []

    def magpie_queries() -> list[dict[str, Any]]:
        m = cfg.magpie
        prefix = tok(pre_query_prefix(tok, m.system), add_special_tokens=False)["input_ids"]
        ids = [f"magpie-{i:05d}" for i in range(m.num_queries)]
        texts = answerer.run("magpie-queries", [(i, "", list(prefix)) for i in ids],
                             Sampling(True, m.temperature, m.top_p), cfg.seed, m.max_query_tokens)
        _, dropped = filter_queries(texts, m.query_filter())
        rejects.extend({"id": ids[r["index"]], "prompt": r["text"], "reason": r["reason"]} for r in dropped)
        gone = {r["index"] for r in dropped}
        return [{"id": ids[i], "prompt": t.strip(), "source": "magpie"} for i, t in enumerate(texts) if i not in gone]

    train, held = teacher_prompts(cfg, rejects, resolve=resolve, magpie_queries=magpie_queries)
    counts: dict[str, Any] = {"source": cfg.source, "prompts": len(train) + len(held)}
    for split, ps in (("train", train), ("heldout", held)):
        encoded = [(p["id"], p["prompt"], encode_chat_prompt(tok, p["prompt"])) for p in ps]
        greedy = answerer.run(f"{split}-greedy", encoded, Sampling(), cfg.seed, cfg.max_new_tokens)
        records = _chat_records(ps, greedy, "target-greedy")
        if split == "train":
            for k in range(cfg.samples_per_prompt):
                seed = cfg.seed + 1 + k
                answers = answerer.run(f"train-sampled-{k}", encoded,
                                       Sampling(True, cfg.sample_temperature, cfg.sample_top_p), seed,
                                       cfg.max_new_tokens)
                records += _chat_records(ps, answers, "target-sampled", {"temperature": cfg.sample_temperature,
                                                                          "top_p": cfg.sample_top_p, "seed": seed})
        examples = chat_records_to_examples(tok, records, cfg.max_length, rejects)
        write_jsonl(out / f"{split}_records.jsonl", records)
        write_token_jsonl(out / f"{split}_tokens.jsonl", examples)
        write_jsonl(out / f"{split}_prompts.jsonl",  # chat messages: benchmarks apply the chat template
                    [{"id": p.get("id"), "messages": [{"role": "user", "content": p["prompt"]}]} for p in ps])
        counts[split] = {"prompts": len(ps), "records": len(records), "examples": len(examples)}
        if on_split_done is not None:
            on_split_done(split)
    write_jsonl(out / "rejects.jsonl", rejects)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    counts["rejected"] = len(rejects)
    counts["resumed"] = answerer.reused
    return TeacherAnswersResult(counts, out)


__all__ = ["MagpieSettings", "PassageSettings", "Sampling", "SoaesEngine", "TeacherAnswersConfig",
           "TeacherAnswersJob", "TeacherAnswersResult", "VLLMEngine", "VLLMSettings", "check_engine", "check_files",
           "generate_teacher_answers", "make_engine", "passage_texts", "row_seed", "teacher_prompts",
           "vllm_available"]
