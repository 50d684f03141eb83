"""`soaes-eval` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from soaes_core import atomic_write_json
from soaes_core.cli_options import config_options
from soaes_core.clitools import SoaesGroup, setup_logging

from . import __version__
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
    """Paper-style tables (Markdown, CSV, PNG): from a `soaes pipeline` run folder, Tables 1-6 and report.md
    regenerated from its manifests; else Tables 1/2/4 from result files or folders of them."""
    if len(results) == 1 and (Path(results[0]) / "stages").is_dir():
        from .paper_tables import write_run_report

        written_run = write_run_report(results[0], output_dir, plots=not no_plots)
        click.echo((Path(output_dir) / "report.md").read_text(encoding="utf-8"))
        click.echo(f"tables: {', '.join(written_run['tables'])}; wrote {output_dir}")
        return
    from .report import build_tables, load_results, write_tables

    tables = build_tables(load_results(list(results)), base=base, baseline=baseline)
    written = write_tables(tables, output_dir, plots=not no_plots)
    for t in tables:
        click.echo(t.to_markdown())
    click.echo(json.dumps({k: str(v) for k, v in written.items()}, indent=1))


@main.command()
@click.argument("benchmark", type=click.Choice(["cmmlu", "ceval"]))
@click.option("--dest", type=click.Path(file_okay=False),
              help="Unpack here, not in $SOAES_CACHE/benchmarks/BENCHMARK (then pass --cmmlu-dir/--ceval-dir DIR).")
@click.option("--url", help="Archive URL or local zip (default: the official release on the Hugging Face Hub).")
@click.option("--sha256", help="Expected sha256 of the archive (default: pinned by the first download of the URL).")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds for the whole download (a stalled or trickling server fails after it; a rerun resumes).")
def fetch(benchmark: str, dest: str | None, url: str | None, sha256: str | None, timeout: float) -> None:
    """Download a public CMMLU / C-Eval release, verify its sha256 and unpack it where the tasks find it."""
    from .fetch import fetch_benchmark

    res = fetch_benchmark(benchmark, dest=dest, url=url, sha256=sha256, timeout=timeout)
    files = ", ".join(f"{split}={n}" for split, n in res.subjects.items())
    state = "already present" if res.reused else "fetched"
    click.echo(f"{benchmark}: {state} in {res.dir} ({files} subject files)")
    click.echo(f"sha256 {res.sha256} ({res.checksum}) from {res.url}")


if __name__ == "__main__":
    main()
