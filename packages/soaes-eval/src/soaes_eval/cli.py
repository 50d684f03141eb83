"""`soaes-eval` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from soaes_core import atomic_write_json
from soaes_core.cli_options import config_options
from soaes_core.clitools import SoaesGroup, setup_logging

from . import __version__
from .cli_configs import FetchJob, MetricsJob, TableJob
from .runner import EvalRunConfig, set_offline


@click.group(cls=SoaesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes-eval")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """CMMLU / C-Eval via lm-evaluation-harness, Chinese ROUGE/BLEU, paper-style reports."""
    setup_logging(verbose)


@main.command()
@config_options(EvalRunConfig, param="cfg", names={
    "num_speculative_tokens": ("-n", "--num-speculative-tokens"), "output_dir": ("-o", "--output-dir"),
    "do_sample": ("--do-sample/--greedy",), "apply_chat_template": ("--apply-chat-template/--no-chat-template",)})
def run(cfg: EvalRunConfig) -> None:
    """Evaluate a model on soaes (and lm-eval) tasks offline; writes results.json, predictions, manifest."""
    from .runner import run_eval

    set_offline()
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
@config_options(MetricsJob, names={"output": ("-o", "--output")})
def metrics(predictions: str, config: MetricsJob) -> None:
    """Score a JSONL of {prediction, reference} with ROUGE-1/2/L and BLEU-4 (0–100)."""
    from .metrics import CONVENTIONS, text_metrics
    from .predictions import read_pairs

    preds, refs = read_pairs(predictions, config.references)
    lang, convention = config.lang, config.convention
    conventions = (["en"] if lang == "en" else list(CONVENTIONS)) if convention == "all" else [convention]
    out = {c: text_metrics(preds, refs, lang=lang, convention=c if c != "en" else "llamafactory").to_dict()
           for c in conventions}
    click.echo(f"items: {len(preds)}")
    for c, m in out.items():
        sig = f"  [{m['sacrebleu_signature']}]" if m["sacrebleu_signature"] else ""
        click.echo(f"{c:13s} rouge1={m['rouge1']:.2f} rouge2={m['rouge2']:.2f} rougeL={m['rougeL']:.2f} "
                   f"bleu4={m['bleu4']:.2f}{sig}")
    if config.output:
        atomic_write_json(config.output, {"source": str(predictions), "num_items": len(preds), "metrics": out})
        click.echo(f"wrote {config.output}")


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path())
@config_options(TableJob, names={"output_dir": ("-o", "--output-dir")})
def table(results: tuple[str, ...], config: TableJob) -> None:
    """Paper-style Tables 1/2/4 (Markdown, CSV, PNG) from result files or folders of them. (The paper's Tables
    1-6 of a `soaes pipeline` run are its report stage's output, `stages/NN_report/report.md`.)"""
    from .report import build_tables, load_results, write_tables

    tables = build_tables(load_results(list(results)), base=config.base, baseline=config.baseline)
    written = write_tables(tables, config.output_dir, plots=config.plots)
    for t in tables:
        click.echo(t.to_markdown())
    click.echo(json.dumps({k: str(v) for k, v in written.items()}, indent=1))


@main.command()
@click.argument("benchmark", type=click.Choice(["cmmlu", "ceval"]))
@config_options(FetchJob)
def fetch(benchmark: str, config: FetchJob) -> None:
    """Download a public CMMLU / C-Eval release, verify its sha256 and unpack it where the tasks find it."""
    from .fetch import fetch_benchmark

    res = fetch_benchmark(benchmark, dest=config.dest, url=config.url, sha256=config.sha256, timeout=config.timeout)
    files = ", ".join(f"{split}={n}" for split, n in res.subjects.items())
    state = "already present" if res.reused else "fetched"
    click.echo(f"{benchmark}: {state} in {res.dir} ({files} subject files)")
    click.echo(f"sha256 {res.sha256} ({res.checksum}) from {res.url}")


if __name__ == "__main__":
    main()
