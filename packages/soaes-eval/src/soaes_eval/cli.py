"""`soaes-eval` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from soaes_core import DEFAULT_MODEL, atomic_write_json, load_config
from soaes_core.clitools import SoaesGroup, setup_logging

from . import __version__


@click.group(cls=SoaesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes-eval")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """CMMLU / C-Eval via lm-evaluation-harness, Chinese ROUGE/BLEU, paper-style reports."""
    setup_logging(verbose)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML EvalRunConfig; options override it.")
@click.option("--model", help=f"Target: HF dir, gguf:PATH, hf:ORG/NAME or {DEFAULT_MODEL} (default).")
@click.option("--draft", help="Draft model spec, or layers:N (target's first N layers): enables speculative decoding.")
@click.option("--backend", type=click.Choice(["auto", "hf", "specdec"]),
              help="hf = lm-eval's own model; specdec = soaes-specdec (autoregressive with stats if no draft).")
@click.option("--tasks", help="Comma-separated: soaes_cmmlu, soaes_ceval, soaes_domain_qa, soaes_domain_report, ...")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Folder with cmmlu/, ceval/, domain/ subfolders.")
@click.option("--cmmlu-dir", type=click.Path(file_okay=False), help="CMMLU release folder (test/, dev/).")
@click.option("--ceval-dir", type=click.Path(file_okay=False), help="C-Eval release folder (val/, dev/).")
@click.option("--domain-dir", type=click.Path(file_okay=False), help="Folder with qa.jsonl / report.jsonl.")
@click.option("--limit", type=int, help="At most N items per (sub)task.")
@click.option("--num-fewshot", type=int)
@click.option("--max-gen-toks", type=int)
@click.option("-n", "--num-speculative-tokens", type=int)
@click.option("--do-sample/--greedy", default=None)
@click.option("--temperature", type=float)
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--seed", type=int)
@click.option("--batch-size", type=int)
@click.option("--device")
@click.option("--dtype")
@click.option("--apply-chat-template/--no-chat-template", default=None)
@click.option("--cache", help="lm-eval request cache path prefix; rerunning with it resumes an interrupted run.")
@click.option("--name", help="Model label in the tables (default: the model folder name).")
@click.option("--stage", help="Training stage label for Table 2 (e.g. 'stage-2 SFT').")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False),
              help="Where results.json goes (default eval_out).")
def run(config_path: str | None, **options: object) -> None:
    """Evaluate a model on soaes (and lm-eval) tasks offline; writes results.json, predictions, manifest."""
    from .runner import EvalRunConfig, run_eval, set_offline

    set_offline()
    overrides = {k: v for k, v in options.items() if v is not None}
    if isinstance(overrides.get("tasks"), str):
        overrides["tasks"] = [t.strip() for t in str(overrides["tasks"]).split(",") if t.strip()]
    if config_path:
        cfg = load_config(config_path, EvalRunConfig, overrides=overrides)
    else:
        from soaes_core import from_dict

        cfg = from_dict(EvalRunConfig, overrides, source="command line")
    res = run_eval(cfg)
    soaes = res["soaes"]
    for task, metrics in res["results"].items():
        shown = {k.split(",")[0]: round(v, 4) for k, v in metrics.items()
                 if isinstance(v, float) and "stderr" not in k}
        click.echo(f"{task}: n={soaes['num_items'].get(task, '?')} {shown}")
    if "specdec" in soaes:
        s = soaes["specdec"]
        click.echo(f"specdec: draft={s['draft']} acceptance={s['acceptance_rate']} tokens/s={s['tokens_per_s']}")
    click.echo(f"wrote {Path(cfg.output_dir) / 'results.json'}")


@main.command()
@click.argument("predictions", type=click.Path(dir_okay=False))
@click.option("--references", type=click.Path(dir_okay=False), help="Separate JSONL with a 'reference' field.")
@click.option("--lang", type=click.Choice(["zh", "en"]), default="zh", show_default=True)
@click.option("--convention", type=click.Choice(["all", "llamafactory", "jieba", "char"]), default="all",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the scores and provenance as JSON.")
def metrics(predictions: str, references: str | None, lang: str, convention: str, output: str | None) -> None:
    """Score a JSONL of {prediction, reference} with ROUGE-1/2/L and BLEU-4 (0–100)."""
    from .metrics import CONVENTIONS, text_metrics
    from .predictions import read_pairs

    preds, refs = read_pairs(predictions, references)
    conventions = (["en"] if lang == "en" else list(CONVENTIONS)) if convention == "all" else [convention]
    out = {c: text_metrics(preds, refs, lang=lang, convention=c if c != "en" else "llamafactory").to_dict()
           for c in conventions}
    click.echo(f"items: {len(preds)}")
    for c, m in out.items():
        sig = f"  [{m['sacrebleu_signature']}]" if m["sacrebleu_signature"] else ""
        click.echo(f"{c:13s} rouge1={m['rouge1']:.2f} rouge2={m['rouge2']:.2f} rougeL={m['rougeL']:.2f} "
                   f"bleu4={m['bleu4']:.2f}{sig}")
    if output:
        atomic_write_json(output, {"source": str(predictions), "num_items": len(preds), "metrics": out})
        click.echo(f"wrote {output}")


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), default="eval_tables", show_default=True)
@click.option("--base", help="Run label that Table 1 retention is relative to (default: the first run).")
@click.option("--baseline", help="Run label that Table 4 speedup is relative to (default: the run without draft).")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
def table(results: tuple[str, ...], output_dir: str, base: str | None, baseline: str | None, no_plots: bool) -> None:
    """Paper-style Tables 1/2/4 (Markdown, CSV, PNG) from result files or folders of them."""
    from .report import build_tables, load_results, write_tables

    tables = build_tables(load_results(list(results)), base=base, baseline=baseline)
    written = write_tables(tables, output_dir, plots=not no_plots)
    for t in tables:
        click.echo(t.to_markdown())
    click.echo(json.dumps({k: str(v) for k, v in written.items()}, indent=1))


if __name__ == "__main__":
    main()
