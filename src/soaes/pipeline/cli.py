"""`soaes pipeline run|plan RECIPE`: thin CLI over `run_pipeline` / `plan_pipeline` (prints, nothing else).

Options come from `RunOptions` (soaes_core.cli_options); `--set KEY=VALUE` sets a field of the recipe itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click

from soaes_core.cli_options import config_options
from soaes_core.clitools import SoaesGroup

RECIPE_HELP = "A recipe YAML, or the name of a shipped recipe (demo)."
NAMES = {"output_dir": ("-o", "--output-dir"), "start": ("--from",),
         "verbose": ("-v", "--verbose/--no-verbose"), "scale": ("--scale/--status",)}


@dataclass
class RunOptions:
    """Which stages of a recipe run (or are planned), where, and how much is shown."""

    output_dir: str | None = field(default=None, metadata={"help": "Run folder; unset = the recipe's output_dir."})
    quick: bool = field(default=False, metadata={
        "help": "Apply the recipe's `quick:` budgets (same code path, CI-sized)."})
    start: str | None = field(default=None, metadata={"help": "First stage to run."})
    until: str | None = field(default=None, metadata={"help": "Last stage to run."})
    verbose: bool = field(default=False, metadata={
        "help": "Show libraries' own warnings and progress bars (quiet by default)."})


@dataclass
class PlanOptions(RunOptions):
    """`RunOptions` plus which plan to show."""

    scale: bool | None = field(default=None, metadata={
        "help": "The cluster-scale plan (per stage: device layout, memory, launcher command, expected time; offline), "
                "or each stage's status and effective config; unset = the scale plan for recipes with `scale:`."})


def recipe_overrides(f: Any) -> Any:
    """`--set KEY=VALUE`: a field of the recipe (not of the options), checked when the recipe is read."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override a recipe field (dotted key), e.g. --set cpt.train.max_steps=2.")(f)


@click.group(cls=SoaesGroup)
def pipeline() -> None:
    """From a domain corpus to a faster domain model: curate → pack → cpt → sft_stage1 → sft_stage2 →
    teacher_data → dump_logits → distill_draft → specdec_bench → export → eval → report."""


def _overrides(overrides: tuple[str, ...]) -> dict[str, str]:
    from soaes_core.cli_options import parse_set_pairs

    return parse_set_pairs(overrides)


def _load(recipe: str, quick: bool, overrides: tuple[str, ...]) -> Any:
    from .checks import load_pipeline_recipe

    return load_pipeline_recipe(recipe, quick=quick, overrides=_overrides(overrides))


@pipeline.command()
@click.argument("recipe")
@recipe_overrides
@config_options(PlanOptions, names=NAMES, param="options", config_file=False, set_option=False)
def plan(recipe: str, overrides: tuple[str, ...], options: PlanOptions) -> None:
    """Print each stage as up-to-date / will run (and why) / not selected, with its effective config, or (--scale)
    the plan at cluster scale."""
    from soaes_core.cache import describe_holder

    from .recipe import has_scale_section, load_scale_recipe
    from .runner import plan_pipeline, run_dir_of, run_lock_holder, select_stages
    from .scale_plan import plan_at_scale, render_plan

    o = options
    if o.scale if o.scale is not None else has_scale_section(recipe):
        r, settings = load_scale_recipe(recipe, overrides=_overrides(overrides), quick=o.quick)
        keep = set(select_stages(r, o.start, o.until))
        rows = [row for row in plan_at_scale(r, settings, recipe_ref=recipe) if row.stage in keep]
        click.echo(render_plan(rows, r.target, settings))
        return

    from .effective import effective_config

    r = _load(recipe, o.quick, overrides)
    select_stages(r, o.start, o.until)  # a bad --from/--until is the only output
    run_dir = run_dir_of(r, o.output_dir)
    click.echo(f"recipe {r.name} ({r.source}) → {run_dir}")
    holder = run_lock_holder(run_dir)
    if holder is not None:
        click.echo(f"note: a run is using this folder ({describe_holder(holder)}); stages may change as it goes")
    for p in plan_pipeline(r, o.output_dir, o.start, o.until):
        click.echo(f"  {p.dir.name:20s} {p.status:12s} {p.reason}")
        for line in effective_config(r, p.name).splitlines():
            click.echo(f"      {line}")


def run_recipe(recipe: str, overrides: tuple[str, ...], o: RunOptions) -> None:
    """Run `recipe` with options `o`, one line per stage on stderr, then the report (shared by `soaes demo`)."""
    from .console import StageDisplay, fmt_s, quiet_libraries
    from .runner import run_dir_of, run_pipeline

    r = _load(recipe, o.quick, overrides)
    display = StageDisplay(lambda line: click.echo(line, err=True))
    try:
        with quiet_libraries(o.verbose):
            summary = run_pipeline(r, o.output_dir, o.start, o.until, on_event=display)
    finally:
        display.close()
    reports = sorted((run_dir_of(r, o.output_dir) / "stages").glob("*_report/report.md"))
    if reports:
        click.echo(reports[-1].read_text(encoding="utf-8"))
    took = sum(s["seconds"] for s in summary.stages.values())
    click.echo(f"ran {len(summary.ran)} stage(s) in {fmt_s(took)}, skipped {len(summary.skipped)}: "
               f"{summary.run_dir}", err=True)


@pipeline.command()
@click.argument("recipe")
@recipe_overrides
@config_options(RunOptions, names=NAMES, param="options", config_file=False, set_option=False)
def run(recipe: str, overrides: tuple[str, ...], options: RunOptions) -> None:
    """Run the recipe's stages (or the --from/--until slice), skipping the up-to-date ones."""
    run_recipe(recipe, overrides, options)
