"""`soaes demo`: the pipeline in miniature on the embedded model, end to end on real data and a real model.

Curates the shipped sample corpus (soaes-data), derives a layer-truncated draft from the embedded target,
answers held-out domain questions with plain and speculative decoding (soaes-specdec; outputs must match
token for token), scores them with Chinese ROUGE/BLEU (soaes-eval) and writes a report with a manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soaes_core import (
    DEFAULT_MODEL,
    Timer,
    atomic_write_json,
    atomic_write_text,
    encode_chat_prompt,
    load_model,
    load_tokenizer,
    read_jsonl,
    seed_everything,
    write_manifest,
)
from soaes_core.errors import SoaesError


@dataclass
class DemoConfig:
    """What the demo runs; every field has a CPU-friendly default."""

    output_dir: str = "runs/demo"
    model: str = DEFAULT_MODEL
    draft_layers: int = 4
    num_speculative_tokens: int = 3
    num_prompts: int = 4
    max_new_tokens: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        if self.draft_layers < 1:
            raise ValueError("draft_layers must be >= 1")
        if self.num_prompts < 1 or self.max_new_tokens < 1:
            raise ValueError("num_prompts and max_new_tokens must be >= 1")


@dataclass
class DemoResult:
    """Everything the demo measured (also written to `demo.json`)."""

    curation: dict[str, dict[str, Any]] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)
    decoding: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    exact: bool = True
    report_path: str = ""


def _curate(out: Path) -> dict[str, dict[str, Any]]:
    from soaes_data.pipeline import load_curation_config, run_curation
    from soaes_data.samples import sample_path

    cfg = load_curation_config(sample_path("recipe.yaml"), overrides={"output_dir": str(out)})
    return {r.name: dict(r.counts) for r in run_curation(cfg)}


def _prompts(n: int) -> list[dict[str, Any]]:
    from soaes_eval.tasks.loaders import SAMPLES_DIR

    rows = read_jsonl(SAMPLES_DIR / "domain" / "qa.jsonl")
    if not rows:
        raise SoaesError("the soaes-eval sample domain QA set is empty")
    return rows[:n]


def _summarise(stats: list[Any]) -> dict[str, float]:
    """One method's runs summed by `SpecStats.merge`; "mean accepted length" here is new tokens per target call
    (prefill included), what the report's "tokens per target call" column shows."""
    from soaes_specdec import SpecStats

    t = SpecStats.merge(stats)
    return {"new_tokens": t.new_tokens, "target_calls": t.target_calls, "seconds": round(t.wall_time_s, 3),
            "tokens_per_s": round(t.new_tokens / t.wall_time_s, 2) if t.wall_time_s else 0.0,
            "acceptance_rate": round(t.acceptance_rate, 4) if t.proposed else 0.0,
            "mean_accepted_length": round(t.new_tokens / t.target_calls, 3) if t.target_calls else 0.0}


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the demo as configured; returns the measurements and writes `report.md`, `demo.json`, manifest."""
    from soaes_eval.metrics import text_metrics
    from soaes_specdec import PromptLookupDecoder, SpeculativeDecoder, autoregressive_generate, make_layer_draft

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    result = DemoResult()
    seed_everything(cfg.seed)
    with timer("curate"):
        result.curation = _curate(out / "data")
    with timer("load"):
        tok = load_tokenizer(cfg.model)
        target = load_model(cfg.model, dtype=torch.float32)
        draft = make_layer_draft(target, cfg.draft_layers)
    spec = SpeculativeDecoder(target, draft, num_speculative_tokens=cfg.num_speculative_tokens)
    lookup = PromptLookupDecoder(target, num_speculative_tokens=cfg.num_speculative_tokens)
    runs: dict[str, list[Any]] = {"plain": [], "prompt_lookup": [], "speculative": []}
    predictions, references = [], []
    with timer("decode"):
        for row in _prompts(cfg.num_prompts):
            ids = torch.tensor([encode_chat_prompt(tok, row["prompt"])])
            kw = {"max_new_tokens": cfg.max_new_tokens, "eos_token_id": tok.eos_token_id}
            plain = autoregressive_generate(target, ids, **kw)
            pl = lookup.generate(ids, **kw)
            sd = spec.generate(ids, **kw)
            same = torch.equal(plain.sequences, sd.sequences) and torch.equal(plain.sequences, pl.sequences)
            result.exact = result.exact and same
            for name, o in (("plain", plain), ("prompt_lookup", pl), ("speculative", sd)):
                runs[name].append(o.stats)
            text = tok.decode(sd.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
            predictions.append(text)
            references.append(row["reference"])
            result.answers.append({"id": row.get("id"), "prompt": row["prompt"], "answer": text,
                                   "reference": row["reference"], "identical_to_plain": same})
    result.decoding = {k: _summarise(v) for k, v in runs.items()}
    base = result.decoding["plain"]["tokens_per_s"] or 1.0
    for v in result.decoding.values():
        v["speedup_vs_plain"] = round(v["tokens_per_s"] / base, 3)
    with timer("metrics"):
        result.metrics = text_metrics(predictions, references, lang="zh").to_dict()
    report = render_report(cfg, result)
    result.report_path = str(atomic_write_text(out / "report.md", report))
    atomic_write_json(out / "demo.json", {"config": cfg.__dict__, **result.__dict__})
    write_manifest(out, "demo", inputs={}, config=cfg,
                   counts={"prompts": len(predictions), "exact": result.exact}, timings=timer.timings)
    return result


def render_report(cfg: DemoConfig, r: DemoResult) -> str:
    """Markdown report of a demo run."""
    lines = ["# soaes demo", "", f"Target `{cfg.model}`, draft = its first {cfg.draft_layers} layers, "
             f"n = {cfg.num_speculative_tokens}, greedy, {cfg.max_new_tokens} new tokens max, "
             f"{len(r.answers)} held-out domain questions.", "", "## Data curation (shipped sample corpus)", "",
             "| stage | in | kept | dropped |", "| --- | --- | --- | --- |"]
    for name, c in r.curation.items():
        lines.append(f"| {name} | {c.get('in', '')} | {c.get('kept', '')} | {c.get('dropped', '')} |")
    lines += ["", "## Decoding", "", f"Speculative and prompt-lookup output identical to plain greedy: **{r.exact}**",
              "", "| method | tokens/s | speedup | acceptance | tokens per target call |",
              "| --- | --- | --- | --- | --- |"]
    for name, d in r.decoding.items():
        acc = f"{100 * d['acceptance_rate']:.1f}%" if name != "plain" else "-"
        lines.append(f"| {name} | {d['tokens_per_s']:.1f} | {d['speedup_vs_plain']:.2f}× | {acc} | "
                     f"{d['mean_accepted_length']:.2f} |")
    m = r.metrics
    lines += ["", "## Answer quality (Chinese ROUGE / BLEU-4, 0–100)", "",
              f"ROUGE-1 {m.get('rouge1', 0):.2f} · ROUGE-2 {m.get('rouge2', 0):.2f} · ROUGE-L {m.get('rougeL', 0):.2f}"
              f" · BLEU-4 {m.get('bleu4', 0):.2f} (convention `{m.get('convention')}`; the untuned 135M model is "
              "not a domain expert — training it is what the train/distill stages are for)", "",
              "## Answers", ""]
    for a in r.answers:
        lines += [f"**Q:** {a['prompt']}", "", f"**A:** {a['answer']}", ""]
    return "\n".join(lines) + "\n"


def result_summary(r: DemoResult) -> str:
    """A few lines for the terminal."""
    sd = r.decoding["speculative"]
    return (f"curated {len(r.curation)} stages; {len(r.answers)} answers; speculative == plain: {r.exact}; "
            f"acceptance {100 * sd['acceptance_rate']:.1f}%, {sd['tokens_per_s']:.1f} tok/s "
            f"({sd['speedup_vs_plain']:.2f}× plain); ROUGE-L {r.metrics.get('rougeL', 0):.2f}; "
            f"report: {r.report_path}")
