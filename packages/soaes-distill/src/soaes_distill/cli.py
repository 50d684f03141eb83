"""`soaes-distill` command line (thin: options generated from each command's config dataclass, a library call, the
results printed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import click

from soaes_core import read_jsonl, write_jsonl
from soaes_core.cli_options import KeysHelpCommand, config_options, recipe_argument
from soaes_core.clitools import SoaesGroup, setup_logging
from soaes_core.errors import ConfigError

from . import __version__
from .cli_configs import BlackboxConfig, DomainQueriesJob, EstimateConfig, FeatureDraftJob, MagpieConfig
from .draft_init import MakeDraftConfig
from .dump import DumpConfig
from .online import OnlineDistillRecipe
from .recipe import DistillRecipe
from .teacher_answers import TeacherAnswersJob

OUT = ("-o", "--out")


def _keys(title: str, cls: type) -> Callable[[], list[tuple[str, type, str, tuple[str, ...]]]]:
    """The nested sections `--set` reaches in `cls` (kd.*, train.*, ...), for a command's --help; its scalar fields
    are options already. Read when help is shown."""
    def sections() -> list[tuple[str, type, str, tuple[str, ...]]]:
        from dataclasses import fields, is_dataclass
        from typing import get_type_hints

        hints = get_type_hints(cls)
        return [(f"{title}: {f.name}.* (--set {f.name}.KEY=VALUE)", hints[f.name], f"{f.name}.", ())
                for f in fields(cls) if is_dataclass(hints[f.name])]

    return sections


@click.group(cls=SoaesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes-distill")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug logging")
def main(verbose: int) -> None:
    """Offline teacher logits, KD losses and trainer, and draft-model training methods."""
    setup_logging(verbose)


@main.command()
@config_options(DumpConfig, names={"output_dir": (*OUT, "--output-dir"),
                                   "temperatures": ("--temperature", "--temperatures")})
def dump(config: DumpConfig) -> None:
    """Run the teacher over a tokenized dataset and store its top-k (or dense) logits."""
    from .dump import run_dump

    res = run_dump(config)
    click.echo(f"stored {res.positions} positions of {res.examples} examples in {res.output_dir} "
               f"({res.shards_written} shards written, {res.shards_skipped} resumed); "
               f"{res.bytes_per_token:.1f} bytes/token")


@main.command("make-draft")
@config_options(MakeDraftConfig, names={"output_dir": (*OUT, "--output-dir"),
                                        "num_layers": ("--layers", "--num-layers")})
def make_draft_cmd(config: MakeDraftConfig) -> None:
    """Derive a draft from the target (first k layers + norm + tied head, or a smaller config)."""
    from .draft_init import SMALL_KEYS, make_draft
    from .token_data import load_token_examples

    seqs = [ex.input_ids for ex in load_token_examples(config.domain_data)] if config.domain_data else None
    small = dict(zip(SMALL_KEYS, config.small, strict=True)) if config.small else None
    out = make_draft(config.target, config.output_dir, num_layers=config.num_layers, head_tokens=config.head_tokens,
                     domain_sequences=seqs, small=small, device=config.device)
    click.echo(f"draft written to {out}")


@main.command(cls=KeysHelpCommand, set_keys=_keys("Recipe keys", DistillRecipe))
@recipe_argument
@config_options(DistillRecipe)
def train(config: DistillRecipe) -> None:
    """Distil a draft as RECIPE.yaml (and the options) say: offline logits, an online teacher, or black-box SFT on
    token data alone (kd.alpha = 0)."""
    from .recipe import run_distill

    res = run_distill(config)
    click.echo(f"draft saved to {res.model_dir} after {len(res.kd_history)} steps ({res.train_seconds:.0f}s)")
    if res.stop is not None and res.stop.stopped_by == "time_budget":
        click.echo(f"note: {res.stop.stop_message}", err=True)
    if res.metrics:
        click.echo(json.dumps(res.metrics, indent=2))


@main.command(cls=KeysHelpCommand, set_keys=_keys("Loss keys", OnlineDistillRecipe))
@recipe_argument
@config_options(OnlineDistillRecipe, names={"output_dir": (*OUT, "--output-dir"),
                                            "num_speculative_tokens": ("-n", "--num-speculative-tokens")})
def online(config: OnlineDistillRecipe) -> None:
    """Online distillation: serve the prompts with speculative decoding and update the draft on the positions the
    verifier rejected; the updated draft goes to OUT/model (a rerun resumes from OUT/checkpoint)."""
    from .online import run_online

    res = run_online(config)
    m = res.metrics
    click.echo(f"draft saved to {res.model_dir}: {int(m['requests'])} requests, {res.result.updates} updates on "
               f"{res.result.trained_positions} rejected positions ({res.seconds:.0f}s); acceptance "
               f"{m['acceptance_first']:.3f} first quarter → {m['acceptance_last']:.3f} last quarter")


@main.command()
@config_options(BlackboxConfig, names={"output": (*OUT, "--output")})
def blackbox(config: BlackboxConfig) -> None:
    """Black-box distillation data: the target's greedy answers to a prompt set."""
    from soaes_core import load_model, load_tokenizer, read_prompts
    from soaes_core.placement import Placement

    from .synth import blackbox_sft_records

    path = Path(config.prompts)
    if not path.is_file():
        raise ConfigError(f"--prompts: file '{path}' does not exist")
    prompts = read_prompts(path)
    model = load_model(config.target, device=Placement(device=config.device).resolve().device)
    records = blackbox_sft_records(model, load_tokenizer(config.target), prompts, config.max_new_tokens,
                                   batch_size=config.batch_size, system=config.system)
    write_jsonl(config.output, records)
    click.echo(f"wrote {len(records)} records to {config.output}")


@main.command()
@config_options(MagpieConfig, names={"output": (*OUT, "--output"), "num_queries": ("--num", "--num-queries")})
def magpie(config: MagpieConfig) -> None:
    """Magpie-style synthetic queries (pre-query template only) and the target's answers."""
    from soaes_core import load_model, load_tokenizer
    from soaes_core.placement import Placement

    from .synth import QueryFilter, magpie_generate

    model = load_model(config.target, device=Placement(device=config.device).resolve().device)
    res = magpie_generate(model, load_tokenizer(config.target), config.num_queries, system=config.system,
                          flt=QueryFilter(language=config.language), seed=config.seed)
    write_jsonl(config.output, res.records)
    write_jsonl(config.rejects or f"{config.output}.rejects.jsonl", res.rejects)
    click.echo(f"generated {res.generated}; kept {len(res.records)}, rejected {len(res.rejects)}")


@main.command("domain-queries")
@click.argument("corpus", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@config_options(DomainQueriesJob, names={"output": (*OUT, "--output")}, exclude=("templates",))
def domain_queries(corpus: tuple[str, ...], config: DomainQueriesJob) -> None:
    """Domain prompts from CORPUS JSONL files (`text` or chat `messages`): templates filled with domain terms
    plus passage instructions, deduplicated and decontaminated; drops go to OUT.rejects.jsonl."""
    from soaes_core import read_prompts
    from soaes_data.records import record_text

    from .domain_queries import build_domain_queries

    texts = [record_text(r) for path in corpus for r in read_jsonl(path)]
    held = [p["prompt"] for p in read_prompts(Path(config.held_out))] if config.held_out else []
    res = build_domain_queries(texts, held, config.query_config())
    write_jsonl(config.output, res.prompts)
    write_jsonl(f"{config.output}.rejects.jsonl", res.rejects)
    click.echo(f"{len(res.terms)} terms; kept {len(res.prompts)} prompts, rejected {len(res.rejects)}")


@main.command("teacher-answers", cls=KeysHelpCommand, set_keys=_keys("Keys", TeacherAnswersJob))
@config_options(TeacherAnswersJob, names={"model": ("--model", "--target"), "output_dir": (*OUT, "--output-dir")})
def teacher_answers(config: TeacherAnswersJob) -> None:
    """The teacher's answers to prompts from a file, Magpie queries or passage queries: records, token data, a
    held-out split and rejects, resumable by prompt id (engine soaes or vllm)."""
    from .teacher_answers import generate_teacher_answers

    c = generate_teacher_answers(config, config.output_dir).counts
    click.echo(f"{c['train']['records']} training and {c['heldout']['records']} held-out records from "
               f"{c['prompts']} {config.source} prompts ({c['resumed']} answers resumed); {c['rejected']} rejected; "
               f"wrote {config.output_dir}")


@main.command()
@config_options(EstimateConfig)
def estimate(config: EstimateConfig) -> None:
    """Offline acceptance estimate (greedy, top-p; accepted length n=3, 9) from teacher-forced logits."""
    from soaes_core import load_model
    from soaes_core.placement import Placement

    from .acceptance import estimate_acceptance
    from .draft_init import load_draft
    from .token_data import load_token_examples
    from .trainer import KDCollator, KDDataset

    device = Placement(device=config.device).resolve().device
    ds = KDDataset(load_token_examples(config.data))
    coll = KDCollator()
    n = config.batch_size
    batches = [coll([ds[j] for j in range(i, min(i + n, len(ds)))]) for i in range(0, len(ds), n)]
    target = load_model(config.target, device=device)
    draft = load_draft(config.draft, device=device, target=config.target)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    est = estimate_acceptance(target, draft, batches, top_p=config.top_p)
    click.echo(json.dumps(est.as_metrics(), indent=2))


@main.command("feature-draft")
@recipe_argument
@config_options(FeatureDraftJob, names={"output_dir": (*OUT, "--output-dir"), "train_data": ("--train", "--train-data"),
                                        "dev_data": ("--dev", "--dev-data"),
                                        "heldout_data": ("--heldout", "--heldout-data")})
def feature_draft(config: FeatureDraftJob) -> None:
    """Train an EAGLE-style feature-conditioned draft head on the target's last hidden states (settings from the
    optional RECIPE.yaml, overridden by the options)."""
    import torch

    from soaes_core import load_model, load_tokenizer
    from soaes_core.placement import Placement

    from .feature_kd import train_feature_draft
    from .token_data import load_token_examples

    train = load_token_examples(config.train_data)
    dev = load_token_examples(config.dev_data) if config.dev_data else None
    held = load_token_examples(config.heldout_data) if config.heldout_data else None
    target = load_model(config.target, dtype=torch.float32, device=Placement(device=config.device).resolve().device)
    res = train_feature_draft(target, train, dev, config.feature_config(), config.output_dir,
                              heldout_examples=held, tokenizer=load_tokenizer(config.target))
    click.echo(f"draft saved to {res.draft_dir} (best step {res.best_step} of {res.steps}; "
               f"extract {res.extract_seconds:.0f}s, train {res.train_seconds:.0f}s)")
    if res.stopped_by != "max_steps":
        click.echo(f"note: {res.stop_message}", err=True)
    click.echo("dev: " + json.dumps(res.dev_metrics))
    if res.heldout_metrics is not None:
        click.echo("held-out: " + json.dumps(res.heldout_metrics))


if __name__ == "__main__":
    main()
