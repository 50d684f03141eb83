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
@click.option("--out", "output_dir", default="runs/demo", show_default=True, help="Output directory.")
@click.option("--num-prompts", default=4, show_default=True, type=int)
@click.option("--max-new-tokens", default=48, show_default=True, type=int)
@click.option("--draft-layers", default=4, show_default=True, type=int)
@click.option("-n", "--num-speculative-tokens", default=3, show_default=True, type=int)
def demo(output_dir: str, num_prompts: int, max_new_tokens: int, draft_layers: int,
         num_speculative_tokens: int) -> None:
    """The pipeline in miniature on the embedded model: curate, decode (plain / lookup / speculative), score."""
    from soaes_core import from_dict

    from .demo import DemoConfig, result_summary, run_demo

    cfg = from_dict(DemoConfig, {"output_dir": output_dir, "num_prompts": num_prompts,
                                 "max_new_tokens": max_new_tokens, "draft_layers": draft_layers,
                                 "num_speculative_tokens": num_speculative_tokens}, source="soaes demo options")
    result = run_demo(cfg)
    click.echo(open(result.report_path, encoding="utf-8").read())
    click.echo(result_summary(result), err=True)


if __name__ == "__main__":
    main()
