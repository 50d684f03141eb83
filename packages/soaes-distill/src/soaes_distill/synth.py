"""Training data made by the target: black-box SFT (the target's greedy answers to a prompt set) and
Magpie-style synthetic queries (the target writes user turns when fed only the chat template's pre-query
prefix), with length / language / dedup filters that account for every generated record.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from soaes_core import encode_chat_prompt
from soaes_core.errors import DataError, InvalidArgumentError
from soaes_core.progress import progress_bar
from soaes_data.chat import encode_chat
from soaes_data.filters import detect_language
from soaes_specdec.decoding import autoregressive_generate

from .token_data import TokenExample

_SENTINEL = "\u2063SOAES_QUERY\u2063"


def pre_query_prefix(tokenizer: Any, system: str | None = None) -> str:
    """The chat template's text up to where a user message's content starts (Magpie's pre-query template)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    cut = text.find(_SENTINEL)
    if cut < 0:
        raise InvalidArgumentError("the tokenizer's chat template does not render user content verbatim")
    return text[:cut]


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a turn: eos plus the template's end-of-turn marker when it is a single token."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return sorted(ids)


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   seed: int = 0) -> list[str]:
    """Decode continuations of token prompts with soaes_specdec's cached decoder, stopping at end of turn."""
    eos = end_of_turn_ids(tokenizer)
    gen = torch.Generator().manual_seed(seed) if do_sample else None
    out: list[str] = []
    with progress_bar(total=len(prompts), desc="sampling answers" if do_sample else "greedy answers",
                      unit="prompt") as bar:
        for s in range(0, len(prompts), batch_size):
            batch = [list(p) for p in prompts[s:s + batch_size]]
            res = autoregressive_generate(model, batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                          temperature=temperature, top_p=top_p, eos_token_id=eos, generator=gen)
            for row in range(len(batch)):
                toks = [t for t in res.new_tokens(row) if t not in eos]
                out.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
            bar.update(len(batch))
    return out


def blackbox_sft_records(model: Any, tokenizer: Any, prompts: Sequence[dict[str, Any]], max_new_tokens: int = 128,
                         batch_size: int = 8, system: str | None = None) -> list[dict[str, Any]]:
    """Black-box distillation data: for each `{"id", "prompt"}` the target's greedy answer, as chat records
    `{"id", "messages": [user, assistant], "source": "target-greedy"}`."""
    ids = [encode_chat_prompt(tokenizer, p["prompt"], system) for p in prompts]
    answers = generate_texts(model, tokenizer, ids, max_new_tokens, batch_size)
    return [{"id": p["id"], "messages": [{"role": "user", "content": p["prompt"]},
                                         {"role": "assistant", "content": a}], "source": "target-greedy"}
            for p, a in zip(prompts, answers, strict=False)]


def sampled_sft_records(model: Any, tokenizer: Any, prompts: Sequence[dict[str, Any]], max_new_tokens: int = 128,
                        batch_size: int = 8, temperature: float = 1.0, top_p: float = 0.7, seed: int = 0,
                        system: str | None = None) -> list[dict[str, Any]]:
    """Like `blackbox_sft_records`, but each answer sampled at `temperature` / `top_p` (the serving setting), so a
    draft trained on them sees the text the target produces when it samples; source `target-sampled`."""
    ids = [encode_chat_prompt(tokenizer, p["prompt"], system) for p in prompts]
    answers = generate_texts(model, tokenizer, ids, max_new_tokens, batch_size, do_sample=True,
                             temperature=temperature, top_p=top_p, seed=seed)
    return [{"id": p["id"], "messages": [{"role": "user", "content": p["prompt"]},
                                         {"role": "assistant", "content": a}], "source": "target-sampled",
             "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed}}
            for p, a in zip(prompts, answers, strict=False)]


def chat_records_to_examples(tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int,
                             rejects: list[dict[str, Any]] | None = None) -> list[TokenExample]:
    """Tokenize chat records (assistant-only labels via `soaes_data.chat.encode_chat`); example ids are the
    record positions. A record that cannot be encoded goes to `rejects` with its reason (or raises)."""
    out = []
    for i, rec in enumerate(records):
        try:
            enc = encode_chat(tokenizer, rec["messages"], max_length=max_length)
        except DataError as err:
            if rejects is None:
                raise
            rejects.append({"id": rec.get("id", i), "reason": str(err)})
            continue
        out.append(TokenExample(i, enc["input_ids"], enc["labels"]))
    return out


# ---- Magpie --------------------------------------------------------------------------------------------

@dataclass
class QueryFilter:
    """Which synthetic queries to keep: length in characters, language, and near-duplicate threshold."""

    min_chars: int = 8
    max_chars: int = 400
    language: str = "any"  # "any", or a code of soaes_data.filters.detect_language: "zh" or "en"
    dedup_jaccard: float = 0.8  # character-trigram Jaccard at or above which a query is a near-duplicate

    def __post_init__(self) -> None:
        if self.language not in ("any", "zh", "en"):
            raise ValueError(f"language must be 'any', 'zh' or 'en', got {self.language!r}")
        if not 0.0 < self.dedup_jaccard <= 1.0:
            raise ValueError(f"dedup_jaccard must be in (0, 1], got {self.dedup_jaccard}")


def _trigrams(text: str) -> set[str]:
    t = re.sub(r"\s+", " ", text.lower()).strip()
    return {t[i:i + 3] for i in range(max(1, len(t) - 2))}


def filter_queries(queries: Sequence[str], flt: QueryFilter) -> tuple[list[str], list[dict[str, Any]]]:
    """Apply length, language and dedup filters; returns (kept, rejects with index, text and reason)."""
    kept: list[str] = []
    grams: list[set[str]] = []
    rejects: list[dict[str, Any]] = []
    for i, q in enumerate(queries):
        q = q.strip()
        reason = None
        if len(q) < flt.min_chars:
            reason = f"too short ({len(q)} < {flt.min_chars} chars)"
        elif len(q) > flt.max_chars:
            reason = f"too long ({len(q)} > {flt.max_chars} chars)"
        elif flt.language != "any" and detect_language(q) != flt.language:
            reason = f"not language {flt.language!r}"
        else:
            g = _trigrams(q)
            for j, other in enumerate(grams):
                jac = len(g & other) / max(1, len(g | other))
                if jac >= flt.dedup_jaccard:
                    reason = f"near-duplicate of kept query {j} (Jaccard {jac:.2f})"
                    break
        if reason:
            rejects.append({"index": i, "text": q, "reason": reason})
        else:
            kept.append(q)
            grams.append(_trigrams(q))
    return kept, rejects


@dataclass
class MagpieResult:
    records: list[dict[str, Any]]
    rejects: list[dict[str, Any]] = field(default_factory=list)
    generated: int = 0


def magpie_generate(model: Any, tokenizer: Any, num_queries: int, system: str | None = None,
                    max_query_tokens: int = 64, max_answer_tokens: int = 128, temperature: float = 1.0,
                    top_p: float = 0.95, flt: QueryFilter | None = None, batch_size: int = 8,
                    seed: int = 0) -> MagpieResult:
    """Magpie: sample `num_queries` user turns from the pre-query prefix alone, filter them, then answer
    each greedily with the target. Every generated query is either in `records` or in `rejects`."""
    if num_queries < 1:
        raise InvalidArgumentError(f"num_queries must be ≥ 1, got {num_queries}")
    prefix = tokenizer(pre_query_prefix(tokenizer, system), add_special_tokens=False)["input_ids"]
    queries = generate_texts(model, tokenizer, [prefix] * num_queries, max_query_tokens, batch_size,
                             do_sample=True, temperature=temperature, top_p=top_p, seed=seed)
    kept, rejects = filter_queries(queries, flt or QueryFilter())
    prompts = [{"id": f"magpie-{i:05d}", "prompt": q} for i, q in enumerate(kept)]
    records = blackbox_sft_records(model, tokenizer, prompts, max_answer_tokens, batch_size, system)
    for r in records:
        r["source"] = "magpie"
    return MagpieResult(records, rejects, len(queries))
