"""`soaes pipeline run|plan RECIPE`: thin CLI over `run_pipeline` / `plan_pipeline` (prints, nothing else)."""

from __future__ import annotations

import click

from soaes_core.clitools import SoaesGroup

from .recipe import STAGE_ORDER

RECIPE_HELP = "A recipe YAML, or the name of a shipped recipe (demo)."


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


@click.group(cls=SoaesGroup)
def pipeline() -> None:
    """From a domain corpus to a faster domain model: curate → pack → cpt → sft_stage1 → sft_stage2 →
    teacher_data → dump_logits → distill_draft → specdec_bench → export → eval → report."""


def _common(f):  # type: ignore[no-untyped-def]
    f = click.option("--until", "until", type=click.Choice(STAGE_ORDER), help="Last stage to run.")(f)
    f = click.option("--from", "start", type=click.Choice(STAGE_ORDER), help="First stage to run.")(f)
    f = click.option("--quick", is_flag=True, help="Apply the recipe's `quick:` budgets (same code path, CI-sized).")(f)
    f = click.option("-o", "--output-dir", type=click.Path(file_okay=False),
                     help="Run folder (default: the recipe's output_dir).")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe field (dotted key), e.g. --set cpt.train.max_steps=2.")(f)
    return click.argument("recipe")(f)


def _overrides(overrides: tuple[str, ...]) -> dict[str, str]:
    from soaes_core.errors import ConfigError

    over = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        over[key] = value
    return over


def _load(recipe: str, quick: bool, overrides: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from .recipe import load_pipeline_recipe

    return load_pipeline_recipe(recipe, quick=quick, overrides=_overrides(overrides))


@pipeline.command()
@_common
@click.option("--scale/--status", "scale", default=None,
              help="The cluster-scale plan (per stage: device layout, memory, launcher command, expected time; "
                   "offline), or each stage's status. Default: the scale plan for recipes with a `scale:` section.")
def plan(recipe: str, overrides: tuple[str, ...], output_dir: str | None, quick: bool, start: str | None,
         until: str | None, scale: bool | None) -> None:
    """Print each stage as up-to-date / will run (and why) / not selected, or (--scale) the plan at cluster scale."""
    from soaes_core.cache import describe_holder

    from .runner import plan_pipeline, run_dir_of, run_lock_holder, select_stages
    from .scale_plan import has_scale_section, load_scale_recipe, plan_at_scale, render_plan

    if scale if scale is not None else has_scale_section(recipe):
        r, settings = load_scale_recipe(recipe, overrides=_overrides(overrides), quick=quick)
        keep = set(select_stages(r, start, until))
        rows = [row for row in plan_at_scale(r, settings, recipe_ref=recipe) if row.stage in keep]
        click.echo(render_plan(rows, r.target, settings))
        return

    r = _load(recipe, quick, overrides)
    run_dir = run_dir_of(r, output_dir)
    click.echo(f"recipe {r.name} ({r.source}) → {run_dir}")
    holder = run_lock_holder(run_dir)
    if holder is not None:
        click.echo(f"note: a run is using this folder ({describe_holder(holder)}); stages may change as it goes")
    for p in plan_pipeline(r, output_dir, start, until):
        click.echo(f"  {p.dir.name:20s} {p.status:12s} {p.reason}")


@pipeline.command()
@_common
def run(recipe: str, overrides: tuple[str, ...], output_dir: str | None, quick: bool, start: str | None,
        until: str | None) -> None:
    """Run the recipe's stages (or the --from/--until slice), skipping the up-to-date ones."""
    from .runner import StageEvent, run_dir_of, run_pipeline

    r = _load(recipe, quick, overrides)

    def show(ev: StageEvent) -> None:
        head = f"[{ev.index}/{ev.total}] {ev.stage}"
        if ev.kind == "skip":
            click.echo(f"{head}: skipped ({ev.message})", err=True)
        elif ev.kind == "start":
            click.echo(f"{head}: running ({ev.message}); ETA for the run {_fmt_s(ev.eta_s)}", err=True)
        else:
            click.echo(f"{head}: done in {_fmt_s(ev.seconds)}; ETA for the rest {_fmt_s(ev.eta_s)}", err=True)

    summary = run_pipeline(r, output_dir, start, until, on_event=show)
    report = run_dir_of(r, output_dir) / "stages"
    reports = sorted(report.glob("*_report/report.md"))
    if reports:
        click.echo(reports[-1].read_text(encoding="utf-8"))
    click.echo(f"ran {len(summary.ran)} stage(s), skipped {len(summary.skipped)}: {summary.run_dir}", err=True)
