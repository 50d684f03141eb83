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
@click.option("--target", default="embedded:smollm2-135m", show_default=True, help="Target model spec.")
@click.option("--draft", help="Draft directory (a layer draft or a feature draft); omit for plain decoding.")
@click.option("-n", "--num-speculative-tokens", type=int, default=3, show_default=True)
@click.option("--lookup-tokens", type=int, default=0, show_default=True,
              help="Prompt-lookup tokens proposed instead of the draft's where the text repeats (0: off).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="SOAES_API_KEY", help="Require `Authorization: Bearer KEY` on /v1 routes "
                                                        "(env SOAES_API_KEY).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests decoded together (rows join and leave between steps).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for a row; more get HTTP 429.")
@click.option("--max-context", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Prompt + new tokens per request (capped at the target's context).")
@click.option("--served-model-name", help="Model name clients ask for (default: the target spec).")
def serve(target: str, draft: str | None, num_speculative_tokens: int, lookup_tokens: int, host: str, port: int,
          api_key: str | None, max_batch: int, max_queue: int, max_context: int, served_model_name: str | None) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics) for TARGET
    with its draft on the exact speculative decoder."""
    import socket

    import uvicorn

    from soaes_core.errors import InvalidArgumentError

    from .serve.app import create_app
    from .serve.engine import build_engine

    try:  # refuse a taken address before spending time on loading the model
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    engine = build_engine(target, draft, num_speculative_tokens, lookup_tokens, max_batch, max_queue, max_context)
    name = served_model_name or target
    click.echo(f"serving {name!r} on http://{host}:{port}/v1 ({'draft ' + draft if draft else 'plain decoding'}, "
               f"batch {max_batch}, context {engine.context_window})", err=True)
    uvicorn.run(create_app(engine, name, api_key), host=host, port=port, log_level="warning")


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
