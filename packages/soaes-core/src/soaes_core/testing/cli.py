"""CLI assertions shared by the packages' tests: bad input ends in exactly one `error:` line and exit code 2."""

from __future__ import annotations

from typing import Any


def one_error_line(command: Any, *args: str) -> str:
    """Invoke click `command` with `args` in-process; assert exit code 2 and a single non-blank line starting
    with `error: `, and return that line."""
    from click.testing import CliRunner

    res = CliRunner().invoke(command, list(args))
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]
