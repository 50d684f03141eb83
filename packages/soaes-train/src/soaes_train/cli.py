"""`soaes-train` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json

import click

from soaes_core.cli_options import KeysHelpCommand, parse_set_pairs
from soaes_core.clitools import SoaesGroup

from . import __version__


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
@click.option("--stage", "stages", multiple=True, help="Run only this stage (repeatable); others are not touched.")
@click.option("--output-dir", default=None, help="Override the recipe's output_dir.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a field: train.max_steps=5 (every stage) or stages.cpt.train.max_steps=5.")
@click.option("--force", is_flag=True, help="Retrain stages even if finished (discards their checkpoints).")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def run_cmd(recipe: str, stages: tuple[str, ...], output_dir: str | None, sets: tuple[str, ...], force: bool,
            verbose: bool) -> None:
    """Run RECIPE (a YAML path or a shipped recipe name): one stage or a whole curriculum.

    Finished stages are skipped and interrupted ones resume from their last checkpoint. Multi-GPU:
    `torchrun --nproc_per_node 8 -m soaes_train.cli run RECIPE`
    (or `deepspeed --num_gpus 8 --no_local_rank --module soaes_train.cli run RECIPE`).
    """
    from soaes_core.clitools import setup_logging

    from .stage_runner import load_train_recipe, run_train_recipe

    setup_logging(verbose)
    overrides = parse_set_pairs(sets)  # keys and values are checked against the recipe's dataclasses on loading
    if output_dir:
        overrides["output_dir"] = output_dir
    rec = load_train_recipe(recipe, overrides=overrides)

    def on_stage(name: str, event: str) -> None:
        msg = {"skip": "already finished, skipped", "start": "training", "done": "done"}[event]
        click.echo(f"[{rec.name}] {name}: {msg}", err=True)

    try:
        results = run_train_recipe(rec, only=list(stages) or None, force=force, on_stage=on_stage)
    finally:
        _shutdown_distributed()
    for r in results:
        loss = r.metrics.get("train_loss")
        extra = "" if r.skipped else f"  attention={r.attn_implementation}  train_loss={loss:.4f}" if loss else ""
        click.echo(f"{r.name}: {r.model_dir}{' (skipped)' if r.skipped else ''}{extra}")


@main.command("recipes")
def recipes_cmd() -> None:
    """List the shipped recipes."""
    from .recipes import list_recipes, recipe_dir

    for name, desc in list_recipes().items():
        click.echo(f"{name:32s} {desc}")
    click.echo(f"\n(files in {recipe_dir()})")


@main.command("estimate")
@click.argument("model")
@click.option("--zero-stage", type=click.IntRange(2, 3), default=3, show_default=True)
@click.option("--gpus", "gpus", type=int, default=8, show_default=True, help="GPUs per node.")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--offload-optimizer/--no-offload-optimizer", default=True, show_default=True)
@click.option("--offload-param/--no-offload-param", default=False, show_default=True)
def estimate_cmd(model: str, zero_stage: int, gpus: int, nodes: int, offload_optimizer: bool,
                 offload_param: bool) -> None:
    """Estimate ZeRO model-state memory for MODEL (DeepSpeed's estimator, on a meta-device copy). MODEL is a model
    spec or directory; qwen2.5-7b / qwen2.5-72b (or their hub ids) use shipped configs, offline."""
    from soaes_core.errors import ModelLoadError

    from .config import DeepSpeedConfig
    from .deepspeed_setup import estimate_zero_memory
    from .recipes import architecture_source
    from .trainer import meta_param_counts

    ds = DeepSpeedConfig(enabled=True, stage=zero_stage, offload_optimizer=offload_optimizer,
                         offload_param=offload_param and zero_stage == 3, num_gpus_per_node=gpus, num_nodes=nodes)
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
