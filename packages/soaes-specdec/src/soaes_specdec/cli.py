"""`soaes-specdec` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import click

from soaes_core.clitools import SoaesGroup

from . import __version__


@click.group(cls=SoaesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes-specdec")
def main() -> None:
    """Exact speculative decoding (PyTorch + Triton), baselines, benchmark and vLLM bridge."""


if __name__ == "__main__":
    main()
