"""`soaes` command line: environment info, the server, the demo, and each package's CLI (and soaes-specdec's
`generate`) mounted as it is. Options are generated from config dataclasses (soaes_core.cli_options)."""

from __future__ import annotations

import importlib
import json

import click

from soaes_core.cli_options import config_options
from soaes_core.clitools import SoaesGroup

from . import __version__
from .pipeline.cli import NAMES, RunOptions, recipe_overrides, run_recipe
from .settings import ServeSettings

# name of the command → "module:attribute" of the package command it mounts
SUBCOMMANDS = {
    "generate": "soaes_specdec.cli:generate",  # one owner: soaes-specdec's command, mounted as it is
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
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")  # output format, no setting
def info(as_json: bool) -> None:
    """Versions, torch device, embedded model and optional extras."""
    from .info import collect_info, format_info

    data = collect_info()
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


@main.command()
@config_options(ServeSettings, names={"num_speculative_tokens": ("-n", "--num-speculative-tokens")}, param="settings")
def serve(settings: ServeSettings) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics) for TARGET
    with its draft on the exact speculative decoder."""
    import os
    import socket

    import uvicorn

    from soaes_core.errors import InvalidArgumentError

    from .serve.app import create_app
    from .serve.engine import build_engine

    s = settings
    try:  # refuse a taken address before spending time on loading the model
        with socket.create_server((s.host, s.port)):
            pass
    except OSError as err:
        raise InvalidArgumentError(f"cannot listen on {s.host}:{s.port}: {err.strerror or err}") from None
    engine = build_engine(s.target, s.draft, s.num_speculative_tokens, s.lookup_tokens, s.max_batch, s.max_queue,
                          s.max_context)
    name = s.served_model_name or s.target
    click.echo(f"serving {name!r} on http://{s.host}:{s.port}/v1 ({'draft ' + s.draft if s.draft else 'plain decoding'}"
               f", batch {s.max_batch}, context {engine.context_window})", err=True)
    api_key = s.api_key if s.api_key is not None else os.environ.get("SOAES_API_KEY")
    uvicorn.run(create_app(engine, name, api_key), host=s.host, port=s.port, log_level="warning")


@main.command()
@recipe_overrides
@config_options(RunOptions, names=NAMES, exclude=("start", "until"), param="options", config_file=False,
                set_option=False)
def demo(overrides: tuple[str, ...], options: RunOptions) -> None:
    """The whole pipeline in miniature on the embedded SmolLM2-135M and the shipped sample data: curate, pack,
    CPT, SFT stage 1 and 2, distil a draft from the trained target, benchmark speculative decoding against the
    fastest plain decoding, evaluate every stage and write report.md (`soaes pipeline run demo`; the run folder
    defaults to runs/pipeline-demo, or runs/pipeline-demo-quick with --quick)."""
    if options.output_dir is None:
        options.output_dir = "runs/pipeline-demo-quick" if options.quick else "runs/pipeline-demo"
    run_recipe("demo", overrides, options)


if __name__ == "__main__":
    main()
