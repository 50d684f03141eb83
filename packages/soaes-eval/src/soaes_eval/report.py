"""Paper-style tables from result files: Table 1 (general ability + retention), Table 2 (ROUGE/BLEU per model and
stage), Table 4 (acceptance, speed, speedup), as Markdown, CSV and PNG plots; and the table types a report links
to its sources with (`Cell`, `PaperTable`), with the readers of a result file's scores that such a report needs."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaes_core import atomic_write_bytes, atomic_write_text
from soaes_core.errors import DataError, InvalidArgumentError

from .runner import GENERATION_TASKS, RESULTS_FILE

GENERAL_TASKS = (("soaes_cmmlu", "CMMLU"), ("soaes_ceval", "C-EVAL"))
TEXT_METRICS = (("rouge1", "Rouge-1"), ("rouge2", "Rouge-2"), ("rougeL", "Rouge-l"), ("bleu4", "BLEU-4"))


@dataclass
class RunResult:
    """One result file: its label/stage and the lm-eval results with the ``soaes`` block."""

    path: Path
    label: str
    stage: str | None
    results: dict[str, Any]
    soaes: dict[str, Any]

    def metric(self, task: str, name: str) -> float | None:
        value = self.results.get(task, {}).get(f"{name},none")
        return float(value) if isinstance(value, (int, float)) else None

    def items(self, task: str) -> int | None:
        return self.soaes.get("num_items", {}).get(task)


@dataclass
class Table:
    """A titled table of plain values (None renders as '–')."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def to_markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(" --- " for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(self.columns)
        w.writerows([["" if v is None else v for v in row] for row in self.rows])
        return buf.getvalue()


@dataclass
class Cell:
    """A number and the file it came from (None: no number)."""

    value: float | str | None
    source: Path | None = None


@dataclass
class PaperTable:
    """A table laid out like one of the paper's: cells linked to their sources, the sample sizes, and one line on
    whether the paper's direction reproduces."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Cell | str | None]] = field(default_factory=list)
    sizes: str = ""
    direction: str = ""

    def plain(self) -> Table:
        """The table without links (CSV / PNG)."""
        def val(c: Any) -> Any:
            return c.value if isinstance(c, Cell) else c
        return Table(self.name, self.title, list(self.columns), [[val(c) for c in row] for row in self.rows])

    def to_markdown(self, base: Path) -> str:
        """Markdown with each number linking to its source, relative to folder `base`."""
        def fmt(c: Any) -> str:
            if not isinstance(c, Cell):
                return "–" if c is None else str(c)
            if c.value is None:
                return "–"
            text = f"{c.value:.2f}" if isinstance(c.value, float) else str(c.value)
            if c.source is None:
                return text
            return f"[{text}]({Path(os.path.relpath(Path(c.source).resolve(), base.resolve())).as_posix()})"
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(" --- " for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in self.rows]
        lines += ["", f"Sample sizes: {self.sizes}", "", f"Paper's direction: {self.direction}", ""]
        return "\n".join(lines)


def general_accuracy(results: dict[str, Any], prefix: str) -> tuple[float | None, int]:
    """Accuracy (%) of a result file over the leaf tasks of `prefix` (soaes_cmmlu, ...), weighted by items, and
    the number of items; (None, 0) when absent."""
    res, n_items = results.get("results", {}), results.get("soaes", {}).get("num_items", {})
    leaves = [t for t in res if t.startswith(prefix + "_")] or [t for t in res if t == prefix]
    total, weight = 0.0, 0
    for t in leaves:
        acc, n = res[t].get("acc,none"), int(n_items.get(t) or 0)
        if isinstance(acc, (int, float)) and n:
            total += 100 * acc * n
            weight += n
    return (total / weight if weight else None), weight


def domain_text_metrics(results: dict[str, Any], convention: str = "llamafactory") -> dict[str, Any]:
    """ROUGE/BLEU (and num_items) of a result file's domain generation task, in `convention`; {} when absent."""
    return next(iter(results.get("soaes", {}).get("text_metrics", {}).values()), {}).get(convention, {})


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def load_results(paths: list[str | Path]) -> list[RunResult]:
    """Result files (or directories searched recursively for ``results.json``), in the order given."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob(RESULTS_FILE))
            if not found:
                raise DataError(f"no {RESULTS_FILE} under this directory", path=str(p))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError("no such result file or directory", path=str(p))
    runs = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"not a readable JSON result file ({exc})", path=str(f)) from None
        if not isinstance(data, dict) or "results" not in data or "soaes" not in data:
            raise DataError("not a soaes-eval result file (needs 'results' and 'soaes')", path=str(f))
        soaes = data["soaes"]
        runs.append(RunResult(f, str(soaes.get("label") or f.parent.name), soaes.get("stage"), data["results"], soaes))
    return runs


def _find(runs: list[RunResult], label: str | None, what: str) -> RunResult | None:
    if label is None:
        return None
    for r in runs:
        if r.label == label:
            return r
    raise InvalidArgumentError(f"{what} {label!r} is not among the runs: {[r.label for r in runs]}")


def table1_general(runs: list[RunResult], base: str | None = None) -> Table | None:
    """CMMLU / C-EVAL accuracy (%), their average, and retention (%) of the base run's average."""
    rows_in = [r for r in runs if any(r.metric(t, "acc") is not None for t, _ in GENERAL_TASKS)]
    if not rows_in:
        return None
    base_run = _find(rows_in, base, "base run") or rows_in[0]

    def avg(r: RunResult) -> float | None:
        vals = [r.metric(t, "acc") for t, _ in GENERAL_TASKS]
        return None if any(v is None for v in vals) else 100 * sum(vals) / len(vals)  # type: ignore[arg-type]

    base_avg = avg(base_run)
    table = Table("table1_general", f"Table 1: General ability (accuracy %, retention vs {base_run.label})",
                  ["Model", *[n for _, n in GENERAL_TASKS], "Avg.", "Retention (%)", "N items"])
    for r in rows_in:
        accs = [r.metric(t, "acc") for t, _ in GENERAL_TASKS]
        a = avg(r)
        retention = 100 * a / base_avg if a is not None and base_avg else None
        n = sum(r.items(t) or 0 for t, _ in GENERAL_TASKS)
        table.rows.append([r.label, *[None if v is None else 100 * v for v in accs], a, retention, n])
    return table


def table2_text(runs: list[RunResult]) -> list[Table]:
    """ROUGE-1/2/L and BLEU-4 per model/stage, one table per domain generation task present."""
    tables = []
    for task in GENERATION_TASKS:
        rows_in = [r for r in runs if r.metric(task, "rouge1") is not None]
        if not rows_in:
            continue
        conv = rows_in[0].soaes.get("text_metrics", {}).get(task, {}).get("llamafactory", {})
        note = f"convention {conv.get('convention', 'llamafactory')}; {conv.get('tokenizer', '')}".strip("; ")
        t = Table(f"table2_{task}", f"Table 2: {task} ({note})",
                  ["Model", "Stage", *[n for _, n in TEXT_METRICS], "N items"])
        for r in rows_in:
            t.rows.append([r.label, r.stage, *[r.metric(task, m) for m, _ in TEXT_METRICS], r.items(task)])
        tables.append(t)
    return tables


def table4_speed(runs: list[RunResult], baseline: str | None = None) -> Table | None:
    """Acceptance rate (%), tokens/s and speedup over the autoregressive baseline (a run with no draft)."""
    rows_in = [r for r in runs if r.soaes.get("specdec")]
    if not rows_in:
        return None
    base_run = _find(rows_in, baseline, "baseline run") or next(
        (r for r in rows_in if not r.soaes["specdec"].get("draft")), None)
    base_tps = base_run.soaes["specdec"].get("tokens_per_s") if base_run else None
    title = "Table 4: Speculative decoding" + (f" (speedup vs {base_run.label})" if base_run else " (no baseline)")
    t = Table("table4_speed", title,
              ["Model", "Draft", "n", "Acceptance Rate (%)", "Speed (tokens/s)", "Speedup", "Requests"])
    for r in rows_in:
        s = r.soaes["specdec"]
        acc = s.get("acceptance_rate")
        tps = s.get("tokens_per_s")
        speedup = f"{tps / base_tps:.2f}×" if tps and base_tps else None
        t.rows.append([r.label, s.get("draft"), s.get("num_speculative_tokens"), None if acc is None else 100 * acc,
                       tps, speedup, s.get("requests")])
    return t


def build_tables(runs: list[RunResult], base: str | None = None, baseline: str | None = None) -> list[Table]:
    """Every table the runs have data for (Table 1, Table 2 per domain task, Table 4)."""
    if not runs:
        raise DataError("no result files given")
    tables = [table1_general(runs, base), *table2_text(runs), table4_speed(runs, baseline)]
    out = [t for t in tables if t is not None]
    if not out:
        raise DataError("the result files hold none of soaes_cmmlu, soaes_ceval, soaes_domain_* or specdec stats")
    return out


def _plot(table: Table) -> bytes:
    """A bar chart of the table's numeric columns per model (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"Model", "Stage", "Draft", "n", "N items", "Requests", "Speedup"}
    cols = [i for i, c in enumerate(table.columns) if c not in skip]
    labels = [str(r[0]) + (f" / {r[1]}" if table.columns[1] == "Stage" and r[1] else "") for r in table.rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels) * max(1, len(cols)) / 2), 3.6))
    width = 0.8 / max(1, len(cols))
    for k, ci in enumerate(cols):
        vals = [float(r[ci]) if isinstance(r[ci], (int, float)) else 0.0 for r in table.rows]
        ax.bar([i + k * width for i in range(len(labels))], vals, width, label=table.columns[ci])
    ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_title(table.title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_tables(tables: list[Table], out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """``tables.md`` plus ``<name>.csv`` and ``<name>.png`` for each table; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"markdown": atomic_write_text(out / "tables.md", "\n".join(t.to_markdown() for t in tables))}
    for t in tables:
        written[f"{t.name}.csv"] = atomic_write_text(out / f"{t.name}.csv", t.to_csv())
        if plots:
            written[f"{t.name}.png"] = atomic_write_bytes(out / f"{t.name}.png", _plot(t))
    return written
