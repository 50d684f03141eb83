"""`soaes-specdec calibrate MODEL`: print the host's cost table for a model (measured and cached, or from a file)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import click

from soaes_core.cli_options import config_options

from .block_policy import DEFAULT_N_MAX


@dataclass
class CalibrateConfig:
    """Settings of `soaes-specdec calibrate`."""

    calibration_file: str | None = field(default=None, metadata={
        "help": "A YAML/JSON table (ms: {PATH: {ROWS: MS}}) to validate and show instead of measuring."})
    rows: list[int] = field(default_factory=list, metadata={
        "help": "Row counts to time (default: 1 to batch x (n_max + 1), every count the decoder can use)."})
    batch: int = field(default=1, metadata={"help": "Rows decoded together (for the default row counts)."})
    n_max: int = field(default=DEFAULT_N_MAX, metadata={"help": "Largest block size (for the default row counts)."})
    passes: int = field(default=3, metadata={"help": "Timed passes per path and row count (the best is kept)."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32, bfloat16, float16."})
    threads: int = field(default=0, metadata={"help": "torch threads while timing (0: torch's default)."})
    refresh: bool = field(default=False, metadata={"help": "Measure again even when a cached table exists."})
    json: bool = field(default=False, metadata={"help": "Print the table and the host as JSON."})
    out: str | None = field(default=None, metadata={
        "help": "Also write the table as JSON here: a calibration file for another run (calibration_file)."})

    def __post_init__(self) -> None:
        if any(r < 1 for r in self.rows):
            raise ValueError(f"rows: row counts must be >= 1, got {self.rows}")
        if self.batch < 1 or self.n_max < 0 or self.passes < 1 or self.threads < 0:
            raise ValueError(f"batch and passes must be >= 1, n_max and threads >= 0; got batch={self.batch}, "
                             f"n_max={self.n_max}, passes={self.passes}, threads={self.threads}")


@click.command()
@click.argument("model")
@config_options(CalibrateConfig)
def calibrate(model: str, config: CalibrateConfig) -> None:
    """Print MODEL's ms per forward pass for every projection path and row count on this host, and the path the
    decoder uses per row count (measured once per host, torch and model shape, then cached)."""
    import torch

    from soaes_core import load_model

    from .cost_table import cost_table_path, default_rows, load_calibration_file, load_or_measure
    from .hostinfo import format_host, host_info
    from .runner import CachedCausalLM

    if config.threads:
        torch.set_num_threads(config.threads)
    where = None
    if config.calibration_file:
        table = load_calibration_file(config.calibration_file)
    else:
        runner = CachedCausalLM(load_model(model, dtype=config.dtype))
        rows = config.rows or default_rows(config.batch, config.n_max)
        table = load_or_measure(runner, rows, passes=config.passes, refresh=config.refresh)
        where = cost_table_path(runner)
    info = host_info()
    if config.out:
        from soaes_core.atomic import atomic_write_json

        atomic_write_json(config.out, {**table.to_dict(), "host": info})
    if config.json:
        click.echo(json.dumps({"host": info, "table": table.to_dict(), "cache_file": str(where) if where else None},
                              indent=1))
        return
    click.echo(f"host: {format_host(info)}")
    click.echo(f"ms per forward pass of {model} ({table.source}{f', cached at {where}' if where else ''}):")
    click.echo(table.format())
