"""Synthetic Q&A from domain documents (the paper prompts GLM4 with documents): a generator interface with
a local Hugging Face backend and an OpenAI-compatible HTTP backend, prompt templates for Q&A and report
tasks, robust JSON parsing, a grounding check, dedup, and a human-review round trip (CSV/JSONL)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from soaes_core import atomic_write_text, encode_chat_prompt, progress
from soaes_core.errors import DataError, SoaesError

from .dedup import exact_key
from .readers import content_id

Message = dict[str, str]

QA_PROMPT = (
    "你是国有资产监管领域的专家。请阅读下面的文档，提出{n}个可以直接根据文档回答的问题，并给出准确、简洁的答案。\n"
    "只输出JSON数组，格式为：[{{\"question\": \"问题\", \"answer\": \"答案\"}}]\n\n文档：\n{document}"
)
REPORT_PROMPT = (
    "你是国有资产监管领域的专家。请根据下面的文档撰写一份结构清晰的工作报告（包含标题和分条要点）。\n"
    "只输出JSON对象，格式为：{{\"question\": \"报告写作要求\", \"answer\": \"报告全文\"}}\n\n文档：\n{document}"
)
PROMPTS = {"qa": QA_PROMPT, "report": REPORT_PROMPT}
APPROVED = {"approved", "approve", "accept", "accepted", "yes", "y", "ok", "通过", "是"}


class SynthError(SoaesError):
    """A generation backend failed (unreachable server, bad response)."""


class Generator(Protocol):
    """Anything that turns chat conversations into assistant replies."""

    def generate(self, conversations: Sequence[list[Message]], max_new_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]: ...


class LocalHFGenerator:
    """Generate with a local model through `soaes_core.load_model` (greedy unless temperature > 0)."""

    def __init__(self, spec: str | os.PathLike[str] = "embedded:smollm2-135m", dtype: str | None = "float32",
                 device: str | None = "cpu", seed: int = 0) -> None:
        from soaes_core import load_model, load_tokenizer

        self.spec = str(spec)
        self.model = load_model(spec, dtype=dtype, device=device)
        self.tokenizer = load_tokenizer(spec)
        self.seed = seed

    def generate(self, conversations: Sequence[list[Message]], max_new_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]:
        import torch

        out = []
        for conv in conversations:
            ids = torch.tensor([encode_chat_prompt(self.tokenizer, conv)], device=self.model.device)
            torch.manual_seed(self.seed)
            kwargs: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
                                      "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
            if temperature > 0:
                kwargs["temperature"] = temperature
            with torch.no_grad():
                gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


class OpenAICompatGenerator:
    """Generate through any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, TGI, GLM4 APIs...)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout

    def generate(self, conversations: Sequence[list[Message]], max_new_tokens: int = 256,
                 temperature: float = 0.0) -> list[str]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        out = []
        with httpx.Client(timeout=self.timeout, headers=headers) as client:
            for conv in conversations:
                body = {"model": self.model, "messages": conv, "max_tokens": max_new_tokens,
                        "temperature": temperature}
                try:
                    resp = client.post(f"{self.base_url}/chat/completions", json=body)
                except httpx.HTTPError as err:
                    raise SynthError(f"{self.base_url}: request failed: {err}") from None
                if resp.status_code != 200:
                    raise SynthError(f"{self.base_url}: HTTP {resp.status_code}: {resp.text[:200]}")
                try:
                    out.append(resp.json()["choices"][0]["message"]["content"])
                except (ValueError, KeyError, IndexError, TypeError):
                    raise SynthError(f"{self.base_url}: unexpected response {resp.text[:200]}") from None
        return out


# ---- parsing and checks -----------------------------------------------------------------------------------
_FENCE_RE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA_RE = re.compile(r",\s*([\]}])")
_QA_LINES_RE = re.compile(r"(?:问题?|Q(?:uestion)?)\s*\d*\s*[:：]\s*(.+?)\s*\n+\s*"
                          r"(?:答案?|A(?:nswer)?)\s*\d*\s*[:：]\s*(.+?)"
                          r"(?=\n\s*(?:问题?|Q(?:uestion)?)\s*\d*\s*[:：]|\Z)", re.DOTALL)


def _balanced_spans(text: str) -> list[str]:
    """Substrings that start at '[' or '{' and end at the matching bracket (string-aware)."""
    spans = []
    for start, ch in enumerate(text):
        if ch not in "[{":
            continue
        depth, in_str, esc = 0, False, False
        for k in range(start, len(text)):
            c = text[k]
            if in_str:
                esc = (c == "\\") and not esc
                if c == '"' and not esc:
                    in_str = False
                continue
            if c == '"':
                in_str = True
            elif c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth == 0:
                    spans.append(text[start:k + 1])
                    break
        if spans:
            break
    return spans


def _pairs(obj: Any) -> list[dict[str, str]]:
    items = obj if isinstance(obj, list) else [obj]
    out = []
    for it in items:
        if not isinstance(it, dict):
            continue
        q = it.get("question") or it.get("问题") or it.get("q") or it.get("instruction")
        a = it.get("answer") or it.get("答案") or it.get("a") or it.get("output")
        if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
            out.append({"question": q.strip(), "answer": a.strip()})
    return out


def parse_qa_json(text: str) -> list[dict[str, str]]:
    """Question/answer pairs from model output: JSON (in code fences or prose, trailing commas, Chinese
    quotes/keys tolerated), else "问：…答：…" / "Q: … A: …" lines. Empty list when nothing parses."""
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    for cand in candidates:
        for span in [cand.strip(), *_balanced_spans(cand)]:
            for variant in (span, _TRAILING_COMMA_RE.sub(r"\1", span),
                            _TRAILING_COMMA_RE.sub(r"\1", span.replace("“", '"').replace("”", '"'))):
                try:
                    pairs = _pairs(json.loads(variant))
                except (json.JSONDecodeError, ValueError):
                    continue
                if pairs:
                    return pairs
    return [{"question": q.strip(), "answer": a.strip()} for q, a in _QA_LINES_RE.findall(text)
            if q.strip() and a.strip()]


def grounding_score(answer: str, document: str) -> float:
    """Fraction of the answer's character bigrams (whitespace/punctuation removed) found in the document."""
    from .dedup import normalise_for_dedup

    a, d = normalise_for_dedup(answer), normalise_for_dedup(document)
    grams = [a[i:i + 2] for i in range(len(a) - 1)]
    if not grams:
        return 0.0
    doc_grams = {d[i:i + 2] for i in range(len(d) - 1)}
    return sum(g in doc_grams for g in grams) / len(grams)


@dataclass
class SynthConfig:
    """`task`: qa or report; `per_document` pairs asked for; answers need `min_grounding` bigram overlap."""

    task: Literal["qa", "report"] = field(default="qa", metadata={"help": "Q&A pairs or report-writing samples."})
    per_document: int = field(default=3, metadata={"help": "Pairs asked for per document."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length cap in tokens."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    min_grounding: float = field(default=0.5, metadata={
        "help": "Minimum character-bigram overlap of an answer with its document (0-1)."})
    max_document_chars: int = field(default=2000, metadata={"help": "Documents are cut to this many characters."})
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt of the generator."})
    prompt_template: str | None = field(default=None, metadata={
        "help": "Prompt with {document} and {n} (default: the task's shipped prompt)."})
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_grounding <= 1.0 or self.per_document < 1:
            raise ValueError("need 0 <= min_grounding <= 1 and per_document >= 1")


def build_prompt(document: str, config: SynthConfig) -> list[Message]:
    template = config.prompt_template or PROMPTS[config.task]
    msgs = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    return [*msgs, {"role": "user", "content": template.format(n=config.per_document,
                                                               document=document[:config.max_document_chars])}]


def synthesize(documents: Sequence[dict[str, Any]], generator: Generator, config: SynthConfig = SynthConfig(),
               batch_size: int = 8) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generate, parse, ground-check and dedup Q&A for each document (`{"id", "text"}`).

    Returns (items pending review, rejects). Every document ends up with ≥ 1 item or a reject reason, and
    every parsed pair is either an item or a reject.
    """
    items: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    seen: set[str] = set()
    for start in progress(range(0, len(documents), batch_size), desc=f"synth {config.task}", unit="batch"):
        batch = documents[start:start + batch_size]
        outputs = generator.generate([build_prompt(d["text"], config) for d in batch], config.max_new_tokens,
                                     config.temperature)
        for doc, raw in zip(batch, outputs, strict=True):
            pairs = parse_qa_json(raw)
            if not pairs:
                rejects.append({"source_id": doc["id"], "reason": "unparseable_output", "raw": raw[:500]})
                continue
            for pair in pairs:
                score = grounding_score(pair["answer"], doc["text"])
                key = exact_key(pair["question"])
                if score < config.min_grounding:
                    rejects.append({"source_id": doc["id"], "reason": f"ungrounded:{score:.2f}", **pair})
                elif key in seen:
                    rejects.append({"source_id": doc["id"], "reason": "duplicate_question", **pair})
                else:
                    seen.add(key)
                    items.append({"id": content_id(pair["question"] + "\n" + pair["answer"]), "task": config.task,
                                  "source_id": doc["id"], "question": pair["question"], "answer": pair["answer"],
                                  "grounding": round(score, 3), "status": "pending"})
    return items, rejects


# ---- human review round trip ------------------------------------------------------------------------------
REVIEW_COLUMNS = ["id", "task", "source_id", "question", "answer", "grounding", "status", "comment"]


def export_review(items: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write items for reviewers (CSV, UTF-8 with BOM for spreadsheet apps, or JSONL) with a `status` column."""
    path = Path(path)
    rows = [{c: it.get(c, "") for c in REVIEW_COLUMNS} | {"status": it.get("status") or "pending"} for it in items]
    if path.suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=REVIEW_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, "\ufeff" + buf.getvalue())
    elif path.suffix == ".jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        raise DataError("review file must end in .csv or .jsonl", path=str(path))
    return path


def import_review(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Read a reviewed file; keep only rows whose status is approved (approved/accept/yes/ok/通过), as chat
    records `{"id", "task", "source_id", "messages"}` using the (possibly edited) question and answer.
    Returns (records, counts by status)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path=str(path))
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        lines = list(range(2, len(rows) + 2))
    elif path.suffix == ".jsonl":
        rows, lines = [], []
        for k, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"invalid JSON: {err}", path=str(path), line=k) from None
                lines.append(k)
    else:
        raise DataError("review file must end in .csv or .jsonl", path=str(path))
    kept: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for row, line in zip(rows, lines, strict=True):
        for col in ("status", "question", "answer"):
            if not isinstance(row.get(col), str):
                raise DataError("missing column", path=str(path), line=line, field=col)
        status = row["status"].strip().lower()
        counts[status or "(empty)"] = counts.get(status or "(empty)", 0) + 1
        if status in APPROVED:
            kept.append({"id": row.get("id"), "task": row.get("task") or "qa", "source_id": row.get("source_id"),
                         "messages": [{"role": "user", "content": row["question"].strip()},
                                      {"role": "assistant", "content": row["answer"].strip()}]})
    return kept, counts
