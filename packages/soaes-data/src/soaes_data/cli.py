"""`soaes-data` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from soaes_core.cli_options import config_options, recipe_argument
from soaes_core.clitools import SoaesGroup

from . import __version__
from .cli_configs import (
    CurateJob,
    CurriculumJob,
    DecontaminateJob,
    InspectJob,
    PackJob,
    ReviewImportJob,
    SplitJob,
    StatsJob,
    SynthJob,
)

OUT = ("-o", "--output-dir")


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
@recipe_argument
@config_options(CurateJob, names={"output_dir": OUT})
def curate(config: CurateJob) -> None:
    """Run a curation RECIPE (YAML) on datatrove: read → clean → … → final/ with manifest.json and rejects."""
    from .pipeline import cap_curation_sizes, check_output_location, resolve_curation_paths, run_curation

    params = click.get_current_context().params  # relative inputs are relative to the recipe's folder
    cfg = resolve_curation_paths(config.curation_config(), params.get("recipe") or params.get("config_path"))
    check_output_location(cfg)
    cfg, notes = cap_curation_sizes(cfg)
    if notes:
        click.echo(f"note: {'; '.join(notes)}", err=True)
    reports = run_curation(cfg, force=config.force)
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
@config_options(PackJob, names={"output_dir": OUT, "packed": ("--pack/--no-pack",)})
def pack(inputs: tuple[str, ...], config: PackJob) -> None:
    """Tokenize once and pack SFT chat JSONL or a CPT corpus into Parquet shards + manifest.

    OUTPUT_DIR is replaced as a whole, so it must be new, empty or a previous pack output, never hold an input.
    """
    from soaes_core import read_manifest

    from .packed_io import check_output_dir
    from .tokenize_pack import pack_cpt_corpus, pack_sft_file

    c = config
    if c.mode == "sft" and len(inputs) != 1:
        raise click.UsageError("sft mode takes one JSONL file")
    check_output_dir(c.output_dir, {f"input{i}": p for i, p in enumerate(inputs)})  # before loading a tokenizer
    tok = _tokenizer(c.tokenizer, c.chat_template)
    if c.mode == "sft":
        out = pack_sft_file(inputs[0], c.output_dir, tok, c.max_length, packed=c.packed, tokenizer_spec=c.tokenizer,
                            messages_field=c.field or "messages", on_error=c.on_error, overlong=c.overlong or "drop")
    else:
        out = pack_cpt_corpus(list(inputs), c.output_dir, tok, c.max_length, separate_documents=not c.join_documents,
                              tokenizer_spec=c.tokenizer, text_field=c.field or "text", on_error=c.on_error)
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
@config_options(SplitJob, names={"output_dir": OUT,
                                 "near_duplicate_threshold": ("--threshold", "--near-duplicate-threshold")})
def split(input_file: str, config: SplitJob) -> None:
    """Seeded train/dev/test split stratified by task, no near-duplicate of a test item in train."""
    from soaes_core import read_jsonl, write_jsonl, write_manifest

    from .split import split_records

    cfg = config.split_config()
    records = read_jsonl(input_file)
    splits, removed = split_records(records, cfg)
    out = Path(config.output_dir)
    for name, recs in splits.items():
        write_jsonl(out / f"{name}.jsonl", recs)
    write_jsonl(out / "rejects.jsonl", removed)
    counts = {"in": len(records), **{k: len(v) for k, v in splits.items()}, "dropped": len(removed)}
    write_manifest(out, "split", inputs={"records": input_file}, config=cfg, counts=counts)
    click.echo(json.dumps(counts))


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False))
@config_options(CurriculumJob, names={"output_dir": OUT})
def curriculum(input_file: str, config: CurriculumJob) -> None:
    """Stratify an SFT pool into stage1 (weakly related dialog) and stage2 (expert Q&A / reports)."""
    from soaes_core import read_jsonl, write_jsonl, write_manifest

    from .curriculum import plot_histograms, stratify

    result = stratify(read_jsonl(input_file), config)
    out = Path(config.output_dir)
    write_jsonl(out / "stage1.jsonl", result.stage1)
    write_jsonl(out / "stage2.jsonl", result.stage2)
    write_jsonl(out / "rejects.jsonl", result.rejects)
    plot_histograms(result, out / "relevance_hist.png")
    write_manifest(out, "curriculum", inputs={"pool": input_file}, config=config, counts=result.counts())
    click.echo(json.dumps(result.counts(), ensure_ascii=False))


@main.command()
@click.argument("path", type=click.Path(exists=True))
@config_options(InspectJob, names={"index": ("-n", "--index")})
def inspect(path: str, config: InspectJob) -> None:
    """Print a decoded example with the trained (unmasked) parts in [[...]]: a chat JSONL line or a packed row."""
    from soaes_core import iter_jsonl
    from soaes_core.errors import InvalidArgumentError

    from .chat import encode_chat, render_masked

    index = config.index
    tok = _tokenizer(config.tokenizer, config.chat_template)
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
                enc = encode_chat(tok, rec.data.get(config.field))
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
@config_options(StatsJob, names={"output_dir": OUT})
def stats(path: str, config: StatsJob) -> None:
    """Length statistics (characters, tokens) of a JSONL/Parquet corpus or a packed dataset directory."""
    from .stats import corpus_stats, plot_length_histogram

    tok = _tokenizer(config.tokenizer, None) if config.tokenizer else None
    result = corpus_stats(path, tokenizer=tok, field=config.field)
    if config.output_dir:
        from soaes_core import atomic_write_json

        out = Path(config.output_dir)
        atomic_write_json(out / "stats.json", result)
        plot_length_histogram(result, out / "length_hist.png")
    click.echo(json.dumps({k: v for k, v in result.items() if k != "lengths"}, ensure_ascii=False, indent=1))


@main.command()
@click.argument("input_file", type=click.Path(exists=True, dir_okay=False))
@config_options(DecontaminateJob, names={"output_dir": OUT, "eval_files": ("--eval", "--eval-files"),
                                         "eval_dirs": ("--eval-dir", "--eval-dirs"),
                                         "use_fetched": ("--fetched/--no-fetched",)})
def decontaminate(input_file: str, config: DecontaminateJob) -> None:
    """Drop training records sharing long n-grams with evaluation sets; overlaps go to overlaps.jsonl and, per
    benchmark and subject, to overlap_report.json."""
    from soaes_core import atomic_write_json, read_jsonl, write_jsonl, write_manifest
    from soaes_core.errors import InvalidArgumentError

    from .decontam import NgramIndex, OverlapReport, decontaminate_records

    dirs = config.benchmark_dirs()
    if not config.eval_files and not dirs:
        raise InvalidArgumentError("nothing to decontaminate against: give --eval FILE or --eval-dir DIR, "
                                   "or fetch CMMLU / C-Eval with `soaes-eval fetch`")
    index = NgramIndex(config.eval_files, config.ngram, dirs)
    records = read_jsonl(input_file)
    summary = OverlapReport(index.describe())
    kept, rejects, report = decontaminate_records(records, index, min_overlaps=config.min_overlaps, summary=summary)
    out = Path(config.output_dir)
    write_jsonl(out / "kept.jsonl", kept)
    write_jsonl(out / "rejects.jsonl", rejects)
    write_jsonl(out / "overlaps.jsonl", report)
    atomic_write_json(out / "overlap_report.json", summary.to_dict())
    counts = {"in": len(records), "kept": len(kept), "dropped": len(rejects)}
    inputs = {"records": input_file, **{f"eval{i}": f for i, f in enumerate(config.eval_files)},
              **{f"benchmark:{name}": str(path) for name, path in dirs.items()}}
    write_manifest(out, "decontaminate", inputs=inputs, counts=counts, extra={"ngram": config.ngram})
    click.echo(json.dumps(counts))


@main.command()
@click.argument("documents", type=click.Path(exists=True, dir_okay=False))
@config_options(SynthJob, names={"output": ("-o", "--output")})
def synth(documents: str, config: SynthJob) -> None:
    """Generate Q&A/report candidates from domain documents (JSONL with `text`) for human review."""
    from soaes_core import read_jsonl, write_jsonl

    from .readers import content_id
    from .synth import LocalHFGenerator, OpenAICompatGenerator, export_review, synthesize

    gen: Any = (OpenAICompatGenerator(config.base_url, config.model) if config.backend == "openai"  # type: ignore[arg-type]
                else LocalHFGenerator(config.model))
    docs = [{"id": d.get("id") or content_id(d["text"]), "text": d["text"]} for d in read_jsonl(documents)
            if isinstance(d.get("text"), str)]
    items, rejects = synthesize(docs, gen, config)
    export_review(items, config.output)
    write_jsonl(Path(config.output).with_suffix(".rejects.jsonl"), rejects)
    click.echo(f"{len(items)} candidates for review in {config.output}; {len(rejects)} rejected")


@main.command(name="review-import")
@click.argument("review_file", type=click.Path(exists=True, dir_okay=False))
@config_options(ReviewImportJob, names={"output": ("-o", "--output")})
def review_import(review_file: str, config: ReviewImportJob) -> None:
    """Keep only approved rows of a reviewed CSV/JSONL file, as chat records."""
    from soaes_core import write_jsonl

    from .synth import import_review

    kept, counts = import_review(review_file)
    write_jsonl(config.output, kept)
    click.echo(json.dumps({"kept": len(kept), "by_status": counts}, ensure_ascii=False))


if __name__ == "__main__":
    main()
