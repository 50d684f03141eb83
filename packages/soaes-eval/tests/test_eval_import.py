"""The package installs and imports on its own and exposes its CLI."""

from click.testing import CliRunner

import soaes_eval
from soaes_eval.cli import main


def test_version_and_cli() -> None:
    assert soaes_eval.__version__ == "0.1.0"
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0, result.output
    assert "0.1.0" in result.output
