"""Shared click plumbing for every soaes CLI: a `SoaesError` becomes one line on stderr and exit code 2."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .errors import SoaesError


class SoaesGroup(click.Group):
    """click.Group whose commands report `SoaesError` as ``error: <message>`` (exit 2), never a traceback.

    Set `SOAES_DEBUG=1` to get the traceback instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        import os

        try:
            return super().invoke(ctx)
        except SoaesError as err:
            if os.environ.get("SOAES_DEBUG"):
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


def setup_logging(verbose: int = 0) -> None:
    """INFO for `-v`, DEBUG for `-vv`, WARNING otherwise; one compact format for all soaes CLIs."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
