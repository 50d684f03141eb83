"""Run lm-eval on the soaes tasks offline and write a self-describing result file (+ predictions, manifest)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from soaes_core import DEFAULT_MODEL, atomic_write_json, resolve_model_dir, write_jsonl, write_manifest
from soaes_core.errors import ConfigError, SoaesError
from soaes_core.placement import Placement

from .metrics import score_provenance

_log = logging.getLogger(__name__)
GENERATION_TASKS = ("soaes_domain_qa", "soaes_domain_qa_heldout", "soaes_domain_report")
# The domain tasks' lm-eval metric behind each score, per convention (aggregated by lm-eval: tasks/domain/utils.py)
TEXT_SCORES = {
    "llamafactory": {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rougeL", "bleu4": "bleu4"},
    "char": {"rouge1": "rouge1_char", "rouge2": "rouge2_char", "rougeL": "rougeL_char", "bleu4": "bleu4_corpus_zh"},
}
RESULTS_FILE = "results.json"


def set_offline() -> None:
    """Nothing may be downloaded at evaluation time: force the Hugging Face hubs offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@dataclass
class EvalRunConfig:
    """One evaluation run: a model (optionally with a draft for speculative decoding) on a list of tasks."""

    tasks: list[str] = field(default_factory=lambda: ["soaes_cmmlu", "soaes_ceval"], metadata={
        "help": "Tasks, comma-separated: soaes_cmmlu, soaes_ceval, soaes_domain_qa, soaes_domain_qa_heldout, "
                "soaes_domain_report, a subtask (soaes_cmmlu_agronomy) or any lm-eval task."})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "Target: HF dir, gguf:PATH or hf:ORG/NAME."})
    output_dir: str = field(default="eval_out", metadata={"help": "Where results.json, predictions and the "
                                                                  "manifest go."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with cmmlu/, ceval/, domain/ subfolders."})
    cmmlu_dir: str | None = field(default=None, metadata={"help": "CMMLU release folder (test/, dev/)."})
    ceval_dir: str | None = field(default=None, metadata={"help": "C-Eval release folder (val/, dev/)."})
    domain_dir: str | None = field(default=None, metadata={"help": "Folder with qa.jsonl / report.jsonl."})
    backend: Literal["auto", "hf", "specdec"] = field(default="auto", metadata={
        "help": "hf = lm-eval's own model; specdec = soaes-specdec (autoregressive with stats if no draft); "
                "auto = specdec when a draft is given."})
    draft: str | None = field(default=None, metadata={
        "help": "Draft model spec, or layers:N (the target's first N layers): enables speculative decoding."})
    num_speculative_tokens: int = field(default=3, metadata={"help": "Draft tokens per block (specdec backend)."})
    do_sample: bool | None = field(default=None, metadata={
        "help": "specdec backend: sample or decode greedily; unset = the task's generation settings."})
    temperature: float | None = field(default=None, metadata={
        "help": "specdec backend: temperature; unset = the task's."})
    top_p: float | None = field(default=None, metadata={"help": "specdec backend: top-p; unset = the task's."})
    top_k: int | None = field(default=None, metadata={"help": "specdec backend: top-k; unset = the task's."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling and few-shot selection."})
    limit: int | None = field(default=None, metadata={"help": "At most N items per (sub)task; unset = all."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples; unset = the task's."})
    max_gen_toks: int | None = field(default=None, metadata={"help": "Generation length cap; unset = the task's."})
    batch_size: int = field(default=8, metadata={"help": "lm-eval batch size."})
    device: str = field(default="auto", metadata={
        "help": "Torch device: auto (cuda when present, else cpu), cpu, cuda or cuda:N."})
    dtype: str = field(default="auto", metadata={
        "help": "Model dtype: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16, float16."})
    apply_chat_template: bool = field(default=False, metadata={"help": "Wrap prompts in the chat template."})
    name: str | None = field(default=None, metadata={
        "help": "Model label in the tables; unset = the model folder name."})
    stage: str | None = field(default=None, metadata={"help": "Training stage label for Table 2 (e.g. 'stage-2 SFT')."})
    cache: str | None = field(default=None, metadata={
        "help": "lm-eval request cache path prefix (sqlite); rerunning with it resumes an interrupted run."})

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: give at least one task")
        if self.backend not in ("auto", "hf", "specdec"):
            raise ValueError(f"backend must be auto, hf or specdec, got {self.backend!r}")
        if self.backend == "hf" and self.draft:
            raise ValueError("backend 'hf' cannot use a draft model; use backend specdec (or auto)")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        Placement(device=self.device, dtype=self.dtype)  # one ConfigError (a ValueError) per bad device or dtype

    @property
    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "specdec" if self.draft else "hf"
        return self.backend

    @property
    def label(self) -> str:
        return self.name or Path(self.model.split(":", 1)[-1]).name


def build_lm(cfg: EvalRunConfig) -> Any:
    """The lm-eval model object: lm-eval's own ``hf`` model, or ``soaes-specdec``."""
    from lm_eval.api.registry import get_model

    where = Placement(device=cfg.device, dtype=cfg.dtype).resolve()
    if cfg.resolved_backend == "hf":
        return get_model("hf")(pretrained=str(resolve_model_dir(cfg.model)), dtype=where.dtype, device=where.device,
                               batch_size=cfg.batch_size)
    from .specdec_lm import SpecDecLM

    return SpecDecLM(pretrained=cfg.model, draft=cfg.draft or "none", num_speculative_tokens=cfg.num_speculative_tokens,
                     do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                     seed=cfg.seed, dtype=where.dtype, device=where.device, batch_size=cfg.batch_size)


def _num_items(results: dict[str, Any], key: str = "effective") -> dict[str, int]:
    """Evaluated ('effective') or available ('original') items per task; a group sums its subtasks."""
    counts = {task: int(n[key]) for task, n in results.get("n-samples", {}).items()}
    for group, subtasks in results.get("group_subtasks", {}).items():
        if subtasks:
            counts[group] = sum(counts.get(t, 0) for t in subtasks)
    return counts


def _text_metrics(task_results: dict[str, Any], num_items: int) -> dict[str, dict[str, Any]]:
    """Per convention: lm-eval's aggregated scores for a domain task, with how they were computed (no rescoring)."""
    return {conv: {**{k: task_results.get(f"{metric},none") for k, metric in names.items()}, "num_items": num_items,
                   **score_provenance("zh", conv)}
            for conv, names in TEXT_SCORES.items()}


def _predictions(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        resp = s["filtered_resps"][0] if s.get("filtered_resps") else s["resps"][0][0]
        out.append({"id": s["doc"].get("id", s["doc_id"]), "prediction": str(resp).strip(),
                    "reference": s["doc"]["reference"]})
    return out


@contextmanager
def _soaes_errors() -> Iterator[None]:
    """lm-eval wraps errors raised in our loaders; re-raise the underlying SoaesError so the CLI prints one line."""
    try:
        yield
    except SoaesError:
        raise
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, SoaesError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


def run_eval(cfg: EvalRunConfig, lm: Any = None) -> dict[str, Any]:
    """Evaluate, write ``results.json`` (lm-eval results + a ``soaes`` block) and per-task predictions."""
    set_offline()
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    from .tasks import task_manager

    builtin = any(not t.startswith("soaes_") for t in cfg.tasks)  # index lm-eval's own tasks only when asked for
    tm = task_manager(cfg.data_dir, include_defaults=builtin, cmmlu_dir=cfg.cmmlu_dir, ceval_dir=cfg.ceval_dir,
                      domain_dir=cfg.domain_dir)
    unknown = [t for t in cfg.tasks if t not in tm.all_tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; soaes tasks: soaes_cmmlu, soaes_ceval, soaes_domain_qa, "
                          f"soaes_domain_qa_heldout, soaes_domain_report (or any lm-eval task)")
    gen_kwargs = {"max_gen_toks": cfg.max_gen_toks} if cfg.max_gen_toks else None
    with _soaes_errors():
        from lm_eval.tasks import get_task_dict

        get_task_dict(list(cfg.tasks), tm)  # read and validate every data file before loading a model
        lm = lm if lm is not None else build_lm(cfg)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                          limit=cfg.limit, task_manager=tm, log_samples=True,
                                          gen_kwargs=gen_kwargs, apply_chat_template=cfg.apply_chat_template,
                                          random_seed=cfg.seed, bootstrap_iters=0, use_cache=cfg.cache)
    if results is None:
        raise SoaesError("lm-eval returned no results")
    samples = results.pop("samples", {})
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    soaes: dict[str, Any] = {
        "label": cfg.label, "stage": cfg.stage, "model": cfg.model, "draft": cfg.draft,
        "backend": cfg.resolved_backend, "limit": cfg.limit, "num_items": _num_items(results),
        "num_items_available": _num_items(results, "original"), "text_metrics": {},
    }
    for task in GENERATION_TASKS:
        if task in samples:
            preds = _predictions(samples[task])
            write_jsonl(out / f"predictions_{task}.jsonl", preds)
            soaes["text_metrics"][task] = _text_metrics(results["results"].get(task, {}), len(preds))
    if hasattr(lm, "spec_stats"):
        soaes["specdec"] = lm.spec_stats()
    results["soaes"] = soaes
    payload = json.loads(json.dumps(results, default=handle_non_serializable, ensure_ascii=False))
    atomic_write_json(out / RESULTS_FILE, payload)
    write_manifest(out, "eval", config=cfg, counts=soaes["num_items"], extra={"label": cfg.label})
    _log.info("wrote %s (%s)", out / RESULTS_FILE, soaes["num_items"])
    return payload
