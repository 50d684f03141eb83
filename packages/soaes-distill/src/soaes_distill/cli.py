"""`soaes-distill` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from soaes_core import DEFAULT_MODEL, load_config, read_jsonl, write_jsonl
from soaes_core.cli_options import KeysHelpCommand, build_config
from soaes_core.clitools import SoaesGroup, setup_logging

from . import __version__


def _recipe_keys() -> list[tuple[str, type, str, tuple[str, ...]]]:
    """The keys `train --set` accepts, for its --help (imported only when help is shown)."""
    from .recipe import DistillRecipe

    return [("Recipe keys (--set KEY=VALUE)", DistillRecipe, "", ())]


@click.group(cls=SoaesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes-distill")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug logging")
def main(verbose: int) -> None:
    """Offline teacher logits, KD losses and trainer, and draft-model training methods."""
    setup_logging(verbose)


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML DumpConfig (flags below override it)")
@click.option("--model", default=None, help=f"teacher spec (default {DEFAULT_MODEL})")
@click.option("--dataset", default=None, help="tokenized JSONL/Parquet (input_ids [, labels, position_ids, id])")
@click.option("--out", "output_dir", default=None, help="store directory (resumed if it exists)")
@click.option("--top-k", type=int, default=None, help="top-k per position (0 = dense)")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None)
@click.option("--temperature", "temperatures", type=float, multiple=True, help="capture τ (repeatable)")
@click.option("--zstd/--no-zstd", default=None, help="compress shards with zstd")
@click.option("--examples-per-shard", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--tail-samples", type=int, default=None,
              help="tail token ids sampled per position outside the top-k (0 = none; unbiased KD tail)")
@click.option("--tail-temperature", type=float, default=None,
              help="τ the tail samples are drawn at (one of --temperature; default the largest)")
def dump(config_path: str | None, model: str | None, dataset: str | None, output_dir: str | None,
         top_k: int | None, dtype: str | None, temperatures: tuple[float, ...], zstd: bool | None,
         examples_per_shard: int | None, batch_size: int | None, tail_samples: int | None,
         tail_temperature: float | None) -> None:
    """Run the teacher over a tokenized dataset and store its top-k (or dense) logits."""
    from .dump import DumpConfig, run_dump

    over: dict[str, object] = {k: v for k, v in {
        "model": model, "dataset": dataset, "output_dir": output_dir, "top_k": top_k, "dtype": dtype,
        "examples_per_shard": examples_per_shard, "batch_size": batch_size, "tail_samples": tail_samples,
        "tail_temperature": tail_temperature}.items() if v is not None}
    if temperatures:
        over["temperatures"] = list(temperatures)
    if zstd is not None:
        over["compression"] = "zstd" if zstd else "none"
    cfg = load_config(config_path, DumpConfig, over) if config_path else DumpConfig(**over)
    res = run_dump(cfg)
    click.echo(f"stored {res.positions} positions of {res.examples} examples in {res.output_dir} "
               f"({res.shards_written} shards written, {res.shards_skipped} resumed); "
               f"{res.bytes_per_token:.1f} bytes/token")


@main.command("make-draft")
@click.option("--target", default=DEFAULT_MODEL, show_default=True, help="target model spec")
@click.option("--out", "out_dir", required=True, help="output HF directory")
@click.option("--layers", type=int, default=4, show_default=True, help="decoder layers to keep")
@click.option("--head-tokens", type=int, default=0, show_default=True,
              help="restrict the output head to this many frequent domain tokens (0 = full head)")
@click.option("--domain-data", type=click.Path(exists=True), default=None,
              help="tokenized JSONL/Parquet whose token frequencies choose the head tokens")
@click.option("--small", default=None, metavar="H,I,HEADS,KV",
              help="instead of truncating, a random model with hidden H, intermediate I, HEADS, KV heads")
def make_draft_cmd(target: str, out_dir: str, layers: int, head_tokens: int, domain_data: str | None,
                   small: str | None) -> None:
    """Derive a draft from the target (first k layers + norm + tied head, or a smaller config)."""
    from .draft_init import make_draft
    from .token_data import load_token_examples

    seqs = [ex.input_ids for ex in load_token_examples(domain_data)] if domain_data else None
    small_cfg = None
    if small:
        try:
            h, i, nh, kv = (int(x) for x in small.split(","))
        except ValueError:
            raise click.BadParameter("expected four integers H,I,HEADS,KV", param_hint="--small") from None
        small_cfg = {"hidden_size": h, "intermediate_size": i, "num_attention_heads": nh, "num_key_value_heads": kv}
    out = make_draft(target, out_dir, num_layers=layers, head_tokens=head_tokens, domain_sequences=seqs,
                     small=small_cfg)
    click.echo(f"draft written to {out}")


@main.command(cls=KeysHelpCommand, set_keys=_recipe_keys)
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override a recipe field, e.g. --set kd.alpha=0.8 (keys below)")
def train(recipe: str, sets: tuple[str, ...]) -> None:
    """Distil a draft as RECIPE.yaml says (offline logits or online teacher)."""
    from .recipe import DistillRecipe, run_distill

    cfg = build_config(DistillRecipe, recipe, sets=sets)
    res = run_distill(cfg)
    click.echo(f"draft saved to {res.model_dir} after {len(res.kd_history)} steps ({res.train_seconds:.0f}s)")
    if res.metrics:
        click.echo(json.dumps(res.metrics, indent=2))


@main.command()
@click.option("--target", default=DEFAULT_MODEL, show_default=True)
@click.option("--prompts", "prompts_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="JSONL with `prompt` (or chat `messages`, first user turn used) and optional `id`")
@click.option("--out", "out_path", required=True, help="output chat JSONL (SFT format)")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--system", default=None, help="system prompt")
def blackbox(target: str, prompts_path: str, out_path: str, max_new_tokens: int, system: str | None) -> None:
    """Black-box distillation data: the target's greedy answers to a prompt set."""
    from soaes_core import load_model, load_tokenizer, read_prompts

    from .synth import blackbox_sft_records

    prompts = read_prompts(Path(prompts_path))
    records = blackbox_sft_records(load_model(target), load_tokenizer(target), prompts, max_new_tokens,
                                   system=system)
    write_jsonl(out_path, records)
    click.echo(f"wrote {len(records)} records to {out_path}")


@main.command()
@click.option("--target", default=DEFAULT_MODEL, show_default=True)
@click.option("--num", "num_queries", type=int, default=64, show_default=True)
@click.option("--system", default=None, help="system prompt steering the domain of the queries")
@click.option("--language", type=click.Choice(["any", "zh", "en"]), default="any", show_default=True)
@click.option("--out", "out_path", required=True, help="output chat JSONL")
@click.option("--rejects", "rejects_path", default=None, help="where rejected queries go (default OUT.rejects.jsonl)")
@click.option("--seed", type=int, default=0)
def magpie(target: str, num_queries: int, system: str | None, language: str, out_path: str,
           rejects_path: str | None, seed: int) -> None:
    """Magpie-style synthetic queries (pre-query template only) and the target's answers."""
    from soaes_core import load_model, load_tokenizer

    from .synth import QueryFilter, magpie_generate

    res = magpie_generate(load_model(target), load_tokenizer(target), num_queries, system=system,
                          flt=QueryFilter(language=language), seed=seed)
    write_jsonl(out_path, res.records)
    write_jsonl(rejects_path or f"{out_path}.rejects.jsonl", res.rejects)
    click.echo(f"generated {res.generated}; kept {len(res.records)}, rejected {len(res.rejects)}")


@main.command("domain-queries")
@click.argument("corpus", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--held-out", "held_out_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL of held-out prompts (prompt or messages) that no query may overlap")
@click.option("--out", "out_path", required=True, help="output prompts JSONL ({id, prompt, source})")
@click.option("--max-queries", type=int, default=6000, show_default=True, help="template fills")
@click.option("--num-terms", type=int, default=200, show_default=True, help="jieba keywords used as slots")
@click.option("--seed", type=int, default=0)
def domain_queries(corpus: tuple[str, ...], held_out_path: str | None, out_path: str, max_queries: int,
                   num_terms: int, seed: int) -> None:
    """Domain prompts from CORPUS JSONL files (`text` or chat `messages`): templates filled with domain terms
    plus passage instructions, deduplicated and decontaminated; drops go to OUT.rejects.jsonl."""
    from soaes_core import read_prompts
    from soaes_data.records import record_text

    from .domain_queries import DomainQueryConfig, build_domain_queries

    texts = [record_text(r) for path in corpus for r in read_jsonl(path)]
    held = [p["prompt"] for p in read_prompts(Path(held_out_path))] if held_out_path else []
    res = build_domain_queries(texts, held, DomainQueryConfig(num_terms=num_terms, max_queries=max_queries,
                                                              seed=seed))
    write_jsonl(out_path, res.prompts)
    write_jsonl(f"{out_path}.rejects.jsonl", res.rejects)
    click.echo(f"{len(res.terms)} terms; kept {len(res.prompts)} prompts, rejected {len(res.rejects)}")


@main.command()
@click.option("--target", default=DEFAULT_MODEL, show_default=True)
@click.option("--draft", "draft_spec", required=True)
@click.option("--data", "data_path", type=click.Path(exists=True), required=True, help="tokenized JSONL/Parquet")
@click.option("--top-p", type=float, default=0.7, show_default=True)
def estimate(target: str, draft_spec: str, data_path: str, top_p: float) -> None:
    """Offline acceptance estimate (greedy, top-p; accepted length n=3, 9) from teacher-forced logits."""
    from soaes_core import load_model

    from .acceptance import estimate_acceptance
    from .draft_init import load_draft
    from .token_data import load_token_examples
    from .trainer import KDCollator, KDDataset

    ds = KDDataset(load_token_examples(data_path))
    coll = KDCollator()
    batches = [coll([ds[j] for j in range(i, min(i + 8, len(ds)))]) for i in range(0, len(ds), 8)]
    est = estimate_acceptance(load_model(target), load_draft(draft_spec, target=target), batches, top_p=top_p)
    click.echo(json.dumps(est.as_metrics(), indent=2))


def _feature_kd_keys() -> list[tuple[str, type, str, tuple[str, ...]]]:
    """The keys `feature-draft --set` accepts, for its --help."""
    from .feature_kd import FeatureKDConfig

    return [("Feature-draft keys (--set KEY=VALUE)", FeatureKDConfig, "", ())]


@main.command("feature-draft", cls=KeysHelpCommand, set_keys=_feature_kd_keys)
@click.option("--target", default=DEFAULT_MODEL, show_default=True, help="target model spec")
@click.option("--train", "train_path", required=True, help="training token data (JSONL/Parquet, input_ids + labels)")
@click.option("--dev", "dev_path", default=None, help="dev token data (default: a split of --train)")
@click.option("--heldout", "heldout_path", default=None, help="held-out token data, evaluated once at the end")
@click.option("--out", "out_dir", required=True, help="output directory (resumed if it holds a checkpoint)")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML FeatureKDConfig (options below override it)")
@click.option("--steps", type=int, default=None, help="optimizer steps")
@click.option("--time-budget-s", type=float, default=None, help="wall-clock training budget in seconds")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override a FeatureKDConfig field, e.g. --set head_tokens=4096 (keys below)")
def feature_draft(target: str, train_path: str, dev_path: str | None, heldout_path: str | None, out_dir: str,
                  config_path: str | None, steps: int | None, time_budget_s: float | None,
                  sets: tuple[str, ...]) -> None:
    """Train an EAGLE-style feature-conditioned draft head on the target's last hidden states."""
    import torch

    from soaes_core import load_model, load_tokenizer

    from .feature_kd import FeatureKDConfig, train_feature_draft
    from .token_data import load_token_examples

    cfg = build_config(FeatureKDConfig, config_path, {"steps": steps, "time_budget_s": time_budget_s}, sets)
    train = load_token_examples(train_path)
    dev = load_token_examples(dev_path) if dev_path else None
    held = load_token_examples(heldout_path) if heldout_path else None
    res = train_feature_draft(load_model(target, dtype=torch.float32, device="cpu"), train, dev, cfg, out_dir,
                              heldout_examples=held, tokenizer=load_tokenizer(target))
    click.echo(f"draft saved to {res.draft_dir} (best step {res.best_step} of {res.steps}; "
               f"extract {res.extract_seconds:.0f}s, train {res.train_seconds:.0f}s)")
    click.echo("dev: " + json.dumps(res.dev_metrics))
    if res.heldout_metrics is not None:
        click.echo("held-out: " + json.dumps(res.heldout_metrics))


if __name__ == "__main__":
    main()
