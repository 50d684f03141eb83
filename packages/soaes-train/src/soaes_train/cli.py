"""`soaes-train` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json
import os

import click

from soaes_core.cli_options import KeysHelpCommand, config_options, parse_set_pairs
from soaes_core.clitools import SoaesGroup

from . import __version__
from .config import DeepSpeedConfig, RecipeRunOptions, StageJob


def _recipe_keys() -> list[tuple[str, type, str, tuple[str, ...]]]:
    """The keys `run --set` accepts, for its --help (imported only when help is shown)."""
    from .config import StageConfig, TrainRecipe

    return [("Recipe keys (--set KEY=VALUE)", TrainRecipe, "", ("stages", "defaults")),
            ("Stage keys, for every stage (or stages.NAME.KEY for one)", StageConfig, "", ("name", "kind"))]


def _shutdown_distributed() -> None:
    """Tear the process group down before interpreter exit: with ZeRO-3 offload under a launcher, leaving it
    to atexit/GC has been seen to abort the process after training finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        import sys

        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            # through DeepSpeed, which also drops its cached groups: a later DeepSpeed run in this process would
            # otherwise reuse a destroyed group ("Group ... is not registered")
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()


@click.group(cls=SoaesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes-train")
def main() -> None:
    """Continual pre-training and domain-progressive SFT on transformers + DeepSpeed ZeRO-3."""


@main.command("run", cls=KeysHelpCommand, set_keys=_recipe_keys)
@click.argument("recipe")
@config_options(RecipeRunOptions, names={"stages": ("--stage", "--stages")}, param="options", config_file=False,
                set_option=False)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field: train.max_steps=5 (every stage) or stages.cpt.train.max_steps=5.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def run_cmd(recipe: str, options: RecipeRunOptions, sets: tuple[str, ...], verbose: bool) -> None:
    """Run RECIPE (a YAML path or a shipped recipe name): one stage or a whole curriculum.

    Finished stages are skipped and interrupted ones resume from their last checkpoint. Multi-GPU:
    `torchrun --nproc_per_node 8 -m soaes_train.cli run RECIPE`
    (or `deepspeed --num_gpus 8 --no_local_rank --module soaes_train.cli run RECIPE`).
    """
    from soaes_core.clitools import setup_logging

    from .launch import exit_with_launcher
    from .stage_runner import load_train_recipe, run_train_recipe

    setup_logging(verbose)
    exit_with_launcher()
    overrides = parse_set_pairs(sets)  # keys and values are checked against the recipe's dataclasses on loading
    if options.output_dir:
        overrides["output_dir"] = options.output_dir
    rec = load_train_recipe(recipe, overrides=overrides)

    def on_stage(name: str, event: str) -> None:
        msg = {"skip": "already finished, skipped", "start": "training", "done": "done"}[event]
        click.echo(f"[{rec.name}] {name}: {msg}", err=True)

    try:
        results = run_train_recipe(rec, only=options.stages or None, force=options.force, on_stage=on_stage)
    finally:
        _shutdown_distributed()
    for r in results:
        loss = r.metrics.get("train_loss")
        extra = "" if r.skipped else f"  attention={r.attn_implementation}  train_loss={loss:.4f}" if loss else ""
        click.echo(f"{r.name}: {r.model_dir}{' (skipped)' if r.skipped else ''}{extra}")


@main.command("stage")
@config_options(StageJob, param="job")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def stage_cmd(job: StageJob, verbose: bool) -> None:
    """Train one stage into --stage-dir (model/ with its manifest; checkpoints/, resumed from when present).

    The job (`stage:` a StageConfig, `model`, `stage_dir`, `parent`) comes from --config JOB.yaml and the options;
    this is what `soaes_train.launch` starts under torchrun or DeepSpeed's launcher.
    """
    from soaes_core.clitools import setup_logging

    from .launch import exit_with_launcher
    from .trainer import train_stage

    setup_logging(verbose)
    exit_with_launcher()
    try:
        result = train_stage(job.stage, job.model, job.stage_dir, parent=job.parent)
    finally:
        _shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        loss = result.metrics.get("train_loss")
        click.echo(f"{result.name}: {result.model_dir}" + (f"  train_loss={loss:.4f}" if loss is not None else ""))


@main.command("recipes")
def recipes_cmd() -> None:
    """List the shipped recipes."""
    from .recipes import list_recipes, recipe_dir

    for name, desc in list_recipes().items():
        click.echo(f"{name:32s} {desc}")
    click.echo(f"\n(files in {recipe_dir()})")


_ESTIMATE_SKIPS = ("enabled", "config_file", "overlap_comm", "contiguous_gradients", "reduce_bucket_size",
                   "stage3_gather_16bit_weights_on_model_save", "memory_check")


@main.command("estimate")
@click.argument("model")
@config_options(DeepSpeedConfig, names={"stage": ("--zero-stage",), "num_gpus_per_node": ("--gpus",),
                                        "num_nodes": ("--nodes",)},
                exclude=_ESTIMATE_SKIPS, param="ds", config_file=False, set_option=False)
def estimate_cmd(model: str, ds: DeepSpeedConfig) -> None:
    """Estimate ZeRO model-state memory for MODEL (DeepSpeed's estimator, on a meta-device copy). MODEL is a model
    spec or directory; qwen2.5-7b / qwen2.5-72b (or their hub ids) use shipped configs, offline."""
    from soaes_core.errors import ConfigError, ModelLoadError

    from .deepspeed_setup import estimate_zero_memory
    from .recipes import architecture_source
    from .trainer import meta_param_counts

    if ds.stage not in (2, 3):
        raise ConfigError(f"--zero-stage: {ds.stage} is not in the range 2<=x<=3 (DeepSpeed estimates ZeRO-2 and -3)")
    source = architecture_source(model)
    try:
        total, largest = meta_param_counts(source)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{model}: cannot read its config ({first})") from None
    est = estimate_zero_memory(total, largest, ds)
    click.echo(json.dumps(est.as_dict(), indent=2))


if __name__ == "__main__":
    main()
