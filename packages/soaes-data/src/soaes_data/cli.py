"""`soaes-data` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from soaes_core.clitools import SoaesGroup

from . import __version__


@click.group(cls=SoaesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes-data")
def main() -> None:
    """Domain corpus curation: parse, clean, dedup, filter, curriculum, split, chat masks, packing."""


def _tokenizer(spec: str, template: str | None) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from soaes_core import load_tokenizer

    from .templates import TEMPLATES, chat_template

    tok = load_tokenizer(spec)
    if template in TEMPLATES:
        tok.chat_template = chat_template(template)
    elif template:
        from soaes_core.errors import InvalidArgumentError

        try:
            tok.chat_template = Path(template).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InvalidArgumentError(f"--chat-template {template!r}: neither a shipped template "
                                       f"({', '.join(sorted(TEMPLATES))}) nor a readable Jinja file "
                                       f"({type(err).__name__})") from None
    return tok


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output-dir", default=None, help="Override the recipe's output_dir.")
@click.option("--executor", type=click.Choice(["local", "slurm", "ray"]), default=None,
              help="Where to run (datatrove executor); default: the recipe's, else local.")
@click.option("--tasks", type=click.IntRange(min=1), default=None,
              help="Shards the corpus is split into (>= 1); the kept documents do not depend on it.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Tasks run at the same time (>= 1).")
@click.option("--num-proc", type=click.IntRange(min=1), default=None, hidden=True,
              help="Deprecated: same as --workers N (and --tasks N when the recipe has 1 task).")
@click.option("--force", is_flag=True, help="Re-run every stage even if unchanged.")
def curate(recipe: str, output_dir: str | None, executor: str | None, tasks: int | None, workers: int | None,
           num_proc: int | None, force: bool) -> None:
    """Run a curation RECIPE (YAML) on datatrove: read → clean → … → final/ with manifest.json and rejects."""
    from .pipeline import cap_curation_sizes, check_output_location, load_curation_config, run_curation

    overrides: dict[str, Any] = {}
    if output_dir:
        overrides["output_dir"] = output_dir
    if num_proc is not None:
        overrides["num_proc"] = num_proc
    for key, value in (("executor", executor), ("tasks", tasks), ("workers", workers)):
        if value is not None:
            overrides[key] = value
    cfg = load_curation_config(recipe, overrides)
    check_output_location(cfg)
    cfg, notes = cap_curation_sizes(cfg)
    if notes:
        click.echo(f"note: {'; '.join(notes)}", err=True)
    reports = run_curation(cfg, force=force)
    if cfg.executor == "slurm":
        click.echo(f"submitted Slurm jobs: {Path(cfg.output_dir) / 'work' / 'slurm_jobs.json'}")
        return
    click.echo(f"{'stage':<14}{'in':>8}{'kept':>8}{'dropped':>9}  reasons")
    for r in reports:
        reasons = ", ".join(f"{k}={v}" for k, v in r.counts.get("dropped_by_reason", {}).items())
        flag = " (unchanged, skipped)" if r.skipped else ""
        click.echo(f"{r.name:<14}{r.counts['in']:>8}{r.counts['kept']:>8}{r.counts['dropped']:>9}  {reasons}{flag}")
    click.echo(f"output: {Path(cfg.output_dir) / 'final'}")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output-dir", required=True, help="Packed dataset directory to write.")
@click.option("--mode", type=click.Choice(["sft", "cpt"]), default="sft", show_default=True)
@click.option("--tokenizer", "tokenizer_spec", default="embedded:smollm2-135m", show_default=True)
@click.option("--chat-template", default=None, help="Shipped template name (qwen2.5) or a Jinja file.")
@click.option("--max-length", type=click.IntRange(min=1), default=8192, show_default=True)
@click.option("--overlong", type=click.Choice(["drop", "truncate", "error"]), default=None,
              help="SFT: a conversation longer than --max-length is dropped (default; reason in rejects.jsonl), "
                   "truncated (counted in the manifest) or an error.")
@click.option("--no-pack", is_flag=True, help="SFT: one example per row instead of FFD packing.")
@click.option("--join-documents", is_flag=True, help="CPT: let documents in a window attend to each other.")
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True)
@click.option("--field", default=None, help="messages field (sft) or text field (cpt).")
def pack(inputs: tuple[str, ...], output_dir: str, mode: str, tokenizer_spec: str, chat_template: str | None,
         max_length: int, overlong: str | None, no_pack: bool, join_documents: bool, on_error: str,
         field: str | None) -> None:
    """Tokenize once and pack SFT chat JSONL or a CPT corpus into Parquet shards + manifest.

    OUTPUT_DIR is replaced as a whole, so it must be new, empty or a previous pack output, never hold an input.
    """
    from soaes_core import read_manifest

    from .packed_io import check_output_dir
    from .tokenize_pack import pack_cpt_corpus, pack_sft_file

    if mode == "cpt" and overlong is not None:
        raise click.UsageError("--overlong applies to sft mode (cpt cuts documents into --max-length windows)")
    if mode == "sft" and len(inputs) != 1:
        raise click.UsageError("sft mode takes one JSONL file")
    check_output_dir(output_dir, {f"input{i}": p for i, p in enumerate(inputs)})  # before loading a tokenizer
    tok = _tokenizer(tokenizer_spec, chat_template)
    if mode == "sft":
        out = pack_sft_file(inputs[0], output_dir, tok, max_length, packed=not no_pack, tokenizer_spec=tokenizer_spec,
                            messages_field=field or "messages", on_error=on_error,  # type: ignore[arg-type]
                            overlong=overlong or "drop")  # type: ignore[arg-type]
    else:
        out = pack_cpt_corpus(list(inputs), output_dir, tok, max_length, separate_documents=not join_documents,
                              tokenizer_spec=tokenizer_spec, text_field=field or "text",
                              on_error=on_error)  # type: ignore[arg-type]
    manifest = read_manifest(out) or {}
    info, counts = manifest["packed_dataset"], manifest["counts"]
    reasons = ", ".join(f"{k}={v}" for k, v in counts.get("dropped_by_reason", {}).items())
    click.echo(f"{out}: {info['rows']} rows, {info['sequences']} sequences, {info['tokens']} tokens, "
               f"utilisation {info['utilisation']:.2%}")
    click.echo(f"records: in {counts['in']}, kept {counts['kept']}, dropped {counts['dropped']}"
               + (f" ({reasons})" if reasons else "")
               + (f", truncated {counts['truncated']}" if "truncated" in counts else "")
               + (f"; reasons in {out / 'rejects.jsonl'}" if counts["dropped"] else ""))


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output-dir", required=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--train", type=float, default=0.8, show_default=True)
@click.option("--dev", type=float, default=0.1, show_default=True)
@click.option("--test", type=float, default=0.1, show_default=True)
@click.option("--stratify-field", default="task", show_default=True)
@click.option("--threshold", type=float, default=0.8, show_default=True, help="Near-duplicate Jaccard threshold.")
def split(input_file: str, output_dir: str, seed: int, train: float, dev: float, test: float, stratify_field: str,
          threshold: float) -> None:
    """Seeded train/dev/test split stratified by task, no near-duplicate of a test item in train."""
    from soaes_core import read_jsonl, write_jsonl, write_manifest
    from soaes_core.errors import ConfigError

    from .split import SplitConfig, split_records

    try:
        cfg = SplitConfig(train, dev, test, seed, stratify_field, threshold)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    records = read_jsonl(input_file)
    splits, removed = split_records(records, cfg)
    out = Path(output_dir)
    for name, recs in splits.items():
        write_jsonl(out / f"{name}.jsonl", recs)
    write_jsonl(out / "rejects.jsonl", removed)
    counts = {"in": len(records), **{k: len(v) for k, v in splits.items()}, "dropped": len(removed)}
    write_manifest(out, "split", inputs={"records": input_file}, config=cfg, counts=counts)
    click.echo(json.dumps(counts))


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output-dir", required=True)
@click.option("--stage2-min-relevance", type=float, default=0.3, show_default=True)
@click.option("--stage1-min-relevance", type=float, default=0.0, show_default=True)
def curriculum(input_file: str, output_dir: str, stage2_min_relevance: float, stage1_min_relevance: float) -> None:
    """Stratify an SFT pool into stage1 (weakly related dialog) and stage2 (expert Q&A / reports)."""
    from soaes_core import read_jsonl, write_jsonl, write_manifest

    from .curriculum import CurriculumConfig, plot_histograms, stratify

    cfg = CurriculumConfig(stage2_min_relevance=stage2_min_relevance, stage1_min_relevance=stage1_min_relevance)
    result = stratify(read_jsonl(input_file), cfg)
    out = Path(output_dir)
    write_jsonl(out / "stage1.jsonl", result.stage1)
    write_jsonl(out / "stage2.jsonl", result.stage2)
    write_jsonl(out / "rejects.jsonl", result.rejects)
    plot_histograms(result, out / "relevance_hist.png")
    write_manifest(out, "curriculum", inputs={"pool": input_file}, config=cfg, counts=result.counts())
    click.echo(json.dumps(result.counts(), ensure_ascii=False))


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--tokenizer", "tokenizer_spec", default="embedded:smollm2-135m", show_default=True)
@click.option("--chat-template", default=None, help="Shipped template name (qwen2.5) or a Jinja file.")
@click.option("-n", "--index", type=int, default=0, show_default=True, help="Which example/row.")
@click.option("--field", default="messages", show_default=True)
def inspect(path: str, tokenizer_spec: str, chat_template: str | None, index: int, field: str) -> None:
    """Print a decoded example with the trained (unmasked) parts in [[...]]: a chat JSONL line or a packed row."""
    from soaes_core import iter_jsonl
    from soaes_core.errors import InvalidArgumentError

    from .chat import encode_chat, render_masked

    tok = _tokenizer(tokenizer_spec, chat_template)
    if Path(path).is_dir():
        from .packed_io import read_packed_dataset

        ds = read_packed_dataset(path)
        if not 0 <= index < ds.num_rows:
            raise InvalidArgumentError(f"index {index} out of range (0..{ds.num_rows - 1})")
        row = ds[index]
        ids, labels = row["input_ids"], row["labels"]
        click.echo(f"# row {index}: {len(ids)} tokens, sequences {row['seq_lengths']}")
    else:
        for k, rec in enumerate(iter_jsonl(path)):
            if k == index:
                enc = encode_chat(tok, rec.data.get(field))
                ids, labels = enc["input_ids"], enc["labels"]
                click.echo(f"# {path}:{rec.line}: {len(ids)} tokens")
                break
        else:
            raise InvalidArgumentError(f"index {index} out of range for {path}")
    trained = sum(1 for x in labels if x != -100)
    click.echo(f"# trained tokens in [[...]]: {trained} of {len(ids)}")
    click.echo(render_masked(tok, ids, labels))


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("-o", "--output-dir", default=None, help="Where to write stats.json and length_hist.png.")
@click.option("--tokenizer", "tokenizer_spec", default=None, help="Also count tokens with this tokenizer.")
@click.option("--field", default=None, help="Text field (default: text, or messages contents).")
def stats(path: str, output_dir: str | None, tokenizer_spec: str | None, field: str | None) -> None:
    """Length statistics (characters, tokens) of a JSONL/Parquet corpus or a packed dataset directory."""
    from .stats import corpus_stats, plot_length_histogram

    tok = _tokenizer(tokenizer_spec, None) if tokenizer_spec else None
    result = corpus_stats(path, tokenizer=tok, field=field)
    if output_dir:
        from soaes_core import atomic_write_json

        out = Path(output_dir)
        atomic_write_json(out / "stats.json", result)
        plot_length_histogram(result, out / "length_hist.png")
    click.echo(json.dumps({k: v for k, v in result.items() if k != "lengths"}, ensure_ascii=False, indent=1))


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--eval", "eval_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Evaluation file (JSONL/JSON/CSV/TXT); repeat for several (CMMLU, C-Eval, test split).")
@click.option("--eval-dir", "eval_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of subject CSVs (CMMLU / C-Eval release layout, or a parent of cmmlu/ and ceval/).")
@click.option("--fetched/--no-fetched", default=True, show_default=True,
              help="Also the CMMLU / C-Eval releases `soaes-eval fetch` put in the cache, when present.")
@click.option("-o", "--output-dir", required=True)
@click.option("--ngram", type=int, default=13, show_default=True)
def decontaminate(input_file: str, eval_files: tuple[str, ...], eval_dirs: tuple[str, ...], fetched: bool,
                  output_dir: str, ngram: int) -> None:
    """Drop training records sharing long n-grams with evaluation sets; overlaps go to overlaps.jsonl and, per
    benchmark and subject, to overlap_report.json."""
    from soaes_core import atomic_write_json, read_jsonl, write_jsonl, write_manifest
    from soaes_core.errors import InvalidArgumentError

    from .decontam import DecontamConfig, NgramIndex, OverlapReport, decontaminate_records

    cfg = DecontamConfig(eval_files=list(eval_files), eval_dirs=list(eval_dirs), use_fetched=fetched, ngram=ngram)
    dirs = cfg.benchmark_dirs()
    if not eval_files and not dirs:
        raise InvalidArgumentError("nothing to decontaminate against: give --eval FILE or --eval-dir DIR, "
                                   "or fetch CMMLU / C-Eval with `soaes-eval fetch`")
    index = NgramIndex(cfg.eval_files, ngram, dirs)
    records = read_jsonl(input_file)
    summary = OverlapReport(index.describe())
    kept, rejects, report = decontaminate_records(records, index, summary=summary)
    out = Path(output_dir)
    write_jsonl(out / "kept.jsonl", kept)
    write_jsonl(out / "rejects.jsonl", rejects)
    write_jsonl(out / "overlaps.jsonl", report)
    atomic_write_json(out / "overlap_report.json", summary.to_dict())
    counts = {"in": len(records), "kept": len(kept), "dropped": len(rejects)}
    inputs = {"records": input_file, **{f"eval{i}": f for i, f in enumerate(eval_files)},
              **{f"benchmark:{name}": str(path) for name, path in dirs.items()}}
    write_manifest(out, "decontaminate", inputs=inputs, counts=counts, extra={"ngram": ngram})
    click.echo(json.dumps(counts))


@main.command()
@click.argument("documents", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, help="Review file to write (.csv or .jsonl).")
@click.option("--backend", type=click.Choice(["local", "openai"]), default="local", show_default=True)
@click.option("--model", default="embedded:smollm2-135m", show_default=True,
              help="Local model spec, or the served model name for --backend openai.")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1.")
@click.option("--task", type=click.Choice(["qa", "report"]), default="qa", show_default=True)
@click.option("--per-document", type=int, default=3, show_default=True)
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--min-grounding", type=float, default=0.5, show_default=True)
def synth(documents: str, output: str, backend: str, model: str, base_url: str | None, task: str,
          per_document: int, max_new_tokens: int, min_grounding: float) -> None:
    """Generate Q&A/report candidates from domain documents (JSONL with `text`) for human review."""
    from soaes_core import read_jsonl, write_jsonl

    from .readers import content_id
    from .synth import LocalHFGenerator, OpenAICompatGenerator, SynthConfig, export_review, synthesize

    if backend == "openai" and not base_url:
        raise click.UsageError("--backend openai needs --base-url")
    gen: Any = OpenAICompatGenerator(base_url, model) if backend == "openai" else LocalHFGenerator(model)  # type: ignore[arg-type]
    docs = [{"id": d.get("id") or content_id(d["text"]), "text": d["text"]} for d in read_jsonl(documents)
            if isinstance(d.get("text"), str)]
    cfg = SynthConfig(task=task, per_document=per_document, max_new_tokens=max_new_tokens,  # type: ignore[arg-type]
                      min_grounding=min_grounding)
    items, rejects = synthesize(docs, gen, cfg)
    export_review(items, output)
    write_jsonl(Path(output).with_suffix(".rejects.jsonl"), rejects)
    click.echo(f"{len(items)} candidates for review in {output}; {len(rejects)} rejected")


@main.command(name="review-import")
@click.argument("review_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, help="JSONL of approved chat records.")
def review_import(review_file: str, output: str) -> None:
    """Keep only approved rows of a reviewed CSV/JSONL file, as chat records."""
    from soaes_core import write_jsonl

    from .synth import import_review

    kept, counts = import_review(review_file)
    write_jsonl(output, kept)
    click.echo(json.dumps({"kept": len(kept), "by_status": counts}, ensure_ascii=False))


if __name__ == "__main__":
    main()
