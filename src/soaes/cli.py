"""`soaes` command line: environment info, generation, and each package's CLI as a subgroup."""

from __future__ import annotations

import importlib
import json

import click

from soaes_core.clitools import SoaesGroup

from . import __version__

# name of the subgroup → "module:attribute" of the package CLI it mounts
SUBCOMMANDS = {
    "data": "soaes_data.cli:main",
    "train": "soaes_train.cli:main",
    "distill": "soaes_distill.cli:main",
    "specdec": "soaes_specdec.cli:main",
    "eval": "soaes_eval.cli:main",
    "pipeline": "soaes.pipeline.cli:pipeline",  # the root's own stage runner (imports every package)
}


class LazyGroup(SoaesGroup):
    """Mounts package CLIs lazily; `SoaesError` becomes one line on stderr (exit code 2)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(SUBCOMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in SUBCOMMANDS:
            module, attr = SUBCOMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as err:
                raise click.ClickException(f"soaes {name}: package not installed ({err})") from None
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes")
def main() -> None:
    """soaes: domain-expert LLMs, trained and served fast."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json: bool) -> None:
    """Versions, torch device, embedded model and optional extras."""
    from .info import collect_info, format_info

    data = collect_info()
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


@main.command()
@click.argument("prompt", required=False)
@click.option("--model", default="embedded:smollm2-135m", show_default=True, help="Model spec.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="Tokens to generate (>= 1).")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Wrap the prompt in the chat template.")
def generate(prompt: str | None, model: str, max_new_tokens: int, chat: bool) -> None:
    """Greedy generation from MODEL for PROMPT (default: a question about state-owned asset supervision)."""
    from .generate import generate_text

    prompt = prompt or "What does a state-owned assets supervision commission do?"
    result = generate_text(model, prompt, max_new_tokens=max_new_tokens, chat=chat)
    click.echo(result.text)
    click.echo(f"[{result.new_tokens} tokens in {result.seconds:.2f}s, {result.tokens_per_s:.1f} tok/s, "
               f"model {model}]", err=True)


@main.command()
@click.option("--quick", is_flag=True, help="Tiny budgets (the recipe's `quick:` block): same code path, for CI.")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False),
              help="Run folder (default: runs/pipeline-demo, or runs/pipeline-demo-quick with --quick).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field (dotted key), e.g. --set distill_draft.train.max_steps=20.")
@click.pass_context
def demo(ctx: click.Context, quick: bool, output_dir: str | None, overrides: tuple[str, ...]) -> None:
    """The whole pipeline in miniature on the embedded SmolLM2-135M and the shipped sample data: curate, pack,
    CPT, SFT stage 1 and 2, distil a draft from the trained target, benchmark speculative decoding against the
    fastest plain decoding, evaluate every stage and write report.md (`soaes pipeline run demo`)."""
    from .pipeline.cli import run

    if output_dir is None:
        output_dir = "runs/pipeline-demo-quick" if quick else "runs/pipeline-demo"
    ctx.invoke(run, recipe="demo", overrides=overrides, output_dir=output_dir, quick=quick, start=None, until=None)


if __name__ == "__main__":
    main()
