"""The SOAEs paper's Tables 1-6 from a `soaes pipeline` run folder, regenerated from the run's manifests (the report
stage's builder; the table types and result-file readers are soaes-eval's `report` module).

A run folder holds `stages/<NN>_<name>/manifest.json` (stage `pipeline.<name>`); the eval stage's `index.json`
points at soaes-eval result files, the bench stage holds soaes-specdec `bench.json` files, the distill stage
`drafts.json`. Every number in `report.md` links to the manifest of the output it was read from, every table
states its sample sizes, and one line per table says whether the paper's direction reproduces here. Speedups
are over the fastest plain decoding timed in the same benchmark run (whichever dtype).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from soaes_core import atomic_write_text, read_manifest
from soaes_core.errors import DataError
from soaes_eval.report import Cell, PaperTable, domain_text_metrics, general_accuracy, write_tables

GENERAL = (("soaes_cmmlu", "CMMLU"), ("soaes_ceval", "C-EVAL"))
PLAIN_METHODS = ("plain", "plain_reference")


class RunFolder:
    """The stage folders of a pipeline run, by stage name."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.root = Path(run_dir)
        self.stages: dict[str, Path] = {}
        for d in sorted((self.root / "stages").glob("[0-9][0-9]_*")):
            m = read_manifest(d)
            if m and str(m.get("stage", "")).startswith("pipeline."):
                self.stages[m["stage"].split(".", 1)[1]] = d
        if not self.stages:
            raise DataError("not a soaes pipeline run folder (no stages/NN_name/manifest.json)", path=str(run_dir))

    def get(self, name: str) -> Path | None:
        return self.stages.get(name)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"unreadable ({exc})", path=str(path)) from None


# ------------------------------------------------------------------------------------------ eval results


def _eval_index(run: RunFolder) -> list[dict[str, Any]]:
    d = run.get("eval")
    return _json(d / "index.json") if d and (d / "index.json").is_file() else []


def table1(run: RunFolder) -> PaperTable | None:
    d = run.get("eval")
    rows = [e for e in _eval_index(run) if e.get("general")]
    if d is None or not rows:
        return None
    t = PaperTable("table1_general", "Table 1: General ability before and after CPT (accuracy %)",
                   ["Model", "CMMLU", "C-EVAL", "Avg.", "Retention (%)"])
    avgs: dict[str, float | None] = {}
    sizes = []
    for e in rows:
        folder = d / e["general"]
        res = _json(folder / "results.json")
        accs = [general_accuracy(res, p) for p, _ in GENERAL]
        vals = [a for a, _ in accs]
        avg = sum(vals) / len(vals) if all(v is not None for v in vals) else None  # type: ignore[arg-type]
        avgs[e["label"]] = avg
        base = avgs.get("base")
        retention = 100 * avg / base if avg is not None and base else None
        src = folder / "manifest.json"
        t.rows.append([e["stage"], *[Cell(v, src) for v in vals], Cell(avg, src), Cell(retention, src)])
        sizes.append(f"{e['label']}: CMMLU {accs[0][1]}, C-EVAL {accs[1][1]} items")
    t.sizes = "; ".join(sizes) + " (soaes-eval sample questions unless the recipe points eval.data_dir elsewhere)"
    base, cpt = avgs.get("base"), avgs.get("cpt")
    if base is None or cpt is None:
        t.direction = "not checked (needs both base and CPT rows)."
    else:
        kept = 100 * cpt / base if base else 0.0
        ok = kept >= 95.0
        t.direction = (f"{'reproduces' if ok else 'does not reproduce'} — CPT retains {kept:.1f}% of the base's "
                       "average (paper: 99.8% for 72B, 98.8% for 7B; threshold here 95%).")
    return t


def _domain_text_metrics(folder: Path) -> tuple[dict[str, Any], Path]:
    """The llamafactory-convention ROUGE/BLEU of one eval folder's domain task, and the manifest they cite."""
    return domain_text_metrics(_json(folder / "results.json")), folder / "manifest.json"


def table2(run: RunFolder) -> PaperTable | None:
    d = run.get("eval")
    rows = [e for e in _eval_index(run) if e.get("domain") and e.get("kind", "target") == "target"]
    if d is None or not rows:
        return None
    t = PaperTable("table2_stages", "Table 2: Domain QA across training stages",
                   ["Model", "Rouge-1", "Rouge-2", "Rouge-l", "BLEU-4"])
    scores: dict[str, tuple[float | None, float | None]] = {}
    n = None
    for e in rows:
        tm, src = _domain_text_metrics(d / e["domain"])
        n = tm.get("num_items", n)
        t.rows.append([e["stage"], *[Cell(tm.get(k), src) for k in ("rouge1", "rouge2", "rougeL", "bleu4")]])
        scores[e["label"]] = (tm.get("rouge1"), tm.get("bleu4"))
    t.sizes = f"{n} domain QA items per row (greedy, chat template; ROUGE/BLEU convention llamafactory, 0-100)"
    base, full, only = scores.get("base"), scores.get("sft_stage2"), scores.get("sft_stage2_only")
    if base is None or full is None or None in base or None in full:
        t.direction = "not checked (needs the base and stage 1 + 2 rows)."
    else:
        ok = full[0] > base[0] and full[1] > base[1]  # type: ignore[operator]
        msg = (f"{'reproduces' if ok else 'does not reproduce'} — CPT + stage 1 + 2 vs base: ROUGE-1 "
               f"{full[0]:.2f} vs {base[0]:.2f}, BLEU-4 {full[1]:.2f} vs {base[1]:.2f} (paper: 43.08/25.11 vs "
               "28.26/10.69)")
        if only is not None and None not in only:
            ok2 = full[0] >= only[0]  # type: ignore[operator]
            msg += (f"; staged SFT vs stage-2 only: ROUGE-1 {full[0]:.2f} vs {only[0]:.2f} "
                    f"({'reproduces' if ok2 else 'does not reproduce'}; paper 43.08 vs 42.14)")
        t.direction = msg + "."
    return t


# ------------------------------------------------------------------------------------------ drafts and speed


def _drafts(run: RunFolder) -> tuple[Path | None, dict[str, Any]]:
    d = run.get("distill_draft")
    return (d, _json(d / "drafts.json")) if d and (d / "drafts.json").is_file() else (None, {})


def table3(run: RunFolder) -> PaperTable | None:
    d = run.get("eval")
    rows = [e for e in _eval_index(run) if e.get("kind") == "draft"]
    if d is None or not rows:
        return None
    t = PaperTable("table3_alpha_tau", "Table 3: Distillation α/τ and the draft's own domain QA quality",
                   ["Draft", "α", "τ", "Rouge-1", "Rouge-2", "Rouge-l", "BLEU-4"])
    best: tuple[float, str] | None = None
    n = None
    for e in rows:
        tm, src = _domain_text_metrics(d / e["domain"])
        n = tm.get("num_items", n)
        t.rows.append([e["stage"], e.get("alpha", "-"), e.get("temperature", "-"),
                       *[Cell(tm.get(k), src) for k in ("rouge1", "rouge2", "rougeL", "bleu4")]])
        if e.get("alpha") is not None and tm.get("rouge1") is not None and (best is None or tm["rouge1"] > best[0]):
            best = (tm["rouge1"], f"α={e['alpha']}, τ={e['temperature']}")
    t.sizes = f"{n} domain QA items per row"
    if best is None:
        t.direction = "not checked (no distilled rows)."
    else:
        ok = best[1] == "α=0.5, τ=2.0"
        t.direction = (f"{'reproduces' if ok else 'does not reproduce'} — best ROUGE-1 at {best[1]} "
                       "(paper: α=0.5, τ=2.0).")
    return t


def _bench(run: RunFolder, key: str) -> tuple[Path | None, dict[str, Any] | None]:
    d = run.get("specdec_bench")
    if d is None or not (d / key / "bench.json").is_file():
        return None, None
    return d / key, _json(d / key / "bench.json")


def _fastest_plain(bench: dict[str, Any], mode: str) -> dict[str, Any] | None:
    rows = [r for r in bench["results"] if r["method"] in PLAIN_METHODS and r["mode"] == mode]
    return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None


def _row(bench: dict[str, Any], method: str, mode: str, n: int) -> dict[str, Any] | None:
    return next((r for r in bench["results"] if r["method"] == method and r["mode"] == mode and r["n"] == n), None)


def _fastest_speculative(bench: dict[str, Any], mode: str, method: str = "speculative") -> dict[str, Any] | None:
    rows = [r for r in bench["results"] if r["method"] == method and r["mode"] == mode]
    return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None


def _dtype_of(bench: dict[str, Any], row: dict[str, Any]) -> str:
    cfg = bench["config"]
    return cfg.get("reference_dtype") if row["method"] == "plain_reference" else cfg.get("dtype")


def _speedup(row: dict[str, Any] | None, plain: dict[str, Any] | None) -> float | None:
    if row is None or plain is None or not plain["tokens_per_s"]:
        return None
    return row["tokens_per_s"] / plain["tokens_per_s"]


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _sizes(bench: dict[str, Any]) -> str:
    cfg = bench["config"]
    ref = cfg.get("reference_dtype")
    return (f"{bench['num_prompts']} held-out domain prompts × {cfg['max_new_tokens']} new tokens, median of "
            f"{cfg['repeats']} interleaved repeats; target {cfg['dtype']}"
            + (f", plain decoding also timed in {ref}" if ref and ref != cfg["dtype"] else ""))


def table4(run: RunFolder) -> PaperTable | None:
    dd, drafts = _drafts(run)
    keys = ["undistilled", "distilled", *sorted(k for k in drafts if k.startswith("sweep/"))]
    benches = {k: _bench(run, k) for k in keys}
    if all(b is None for _, b in benches.values()):
        return None
    t = PaperTable("table4_drafts", "Table 4: Draft acceptance and speedup, greedy, n = 3",
                   ["Draft", "α", "τ", "Acceptance Rate (%)", "est. acceptance (offline, %)", "Speed (tokens/s)",
                    "Speedup"])
    sizes = ""
    acc: dict[str, float | None] = {}
    dman = dd / "manifest.json" if dd else None
    for k in keys:
        folder, bench = benches[k]
        if bench is None:
            continue
        src = folder / "manifest.json"
        plain = _fastest_plain(bench, "greedy")
        if k == "undistilled" and plain is not None:
            t.rows.append([f"none (plain, {_dtype_of(bench, plain)})", "-", "-", None, None,
                           Cell(plain["tokens_per_s"], src), Cell(1.0, src)])
        spd = _row(bench, "speculative", "greedy", 3)
        info = drafts.get(k, {})
        est = info.get("offline_acceptance", {}).get("acceptance_rate_greedy_n3")
        acc[k] = spd["acceptance_rate"] if spd else None
        t.rows.append([k, info.get("alpha", "-"), info.get("temperature", "-"),
                       Cell(_pct(spd["acceptance_rate"]) if spd else None, src), Cell(_pct(est), dman),
                       Cell(spd["tokens_per_s"] if spd else None, src), Cell(_speedup(spd, plain), src)])
        best = _fastest_speculative(bench, "greedy")
        if k == "distilled" and best is not None and best["n"] != 3:  # the configuration a user would serve
            t.rows.append([f"distilled, n = {best['n']} (its fastest n)", info.get("alpha", "-"),
                           info.get("temperature", "-"), Cell(_pct(best["acceptance_rate"]), src), None,
                           Cell(best["tokens_per_s"], src), Cell(_speedup(best, plain), src)])
        sizes = sizes or _sizes(bench)
    t.sizes = sizes + "; offline estimate on the held-out target answers (teacher-forced)"
    u, dist = acc.get("undistilled"), acc.get("distilled")
    _, db = benches.get("distilled", (None, None))
    sp = _speedup(_row(db, "speculative", "greedy", 3), _fastest_plain(db, "greedy")) if db else None
    if u is None or dist is None:
        t.direction = ("not checked (the distilled draft was not benchmarked at n = 3; its fastest n is the row "
                       "above)." if u is not None and db is not None else
                       "not checked (needs undistilled and distilled rows).")
    else:
        ok = dist > u and (sp or 0) > 1.0
        t.direction = (f"{'reproduces' if ok else 'does not reproduce'} — distilled acceptance {100 * dist:.1f}% vs "
                       f"undistilled {100 * u:.1f}%, distilled speedup {sp or 0:.2f}× over the fastest plain "
                       "decoding at n = 3 (paper: 75.78% vs 73.94%, 1.39×)")
        best = _fastest_speculative(db, "greedy") if db else None
        if best is not None and best["n"] != 3:
            t.direction += f"; at its fastest n = {best['n']}: {_speedup(best, _fastest_plain(db, 'greedy')):.2f}×"
        t.direction += "."
    return t


def table5(run: RunFolder) -> PaperTable | None:
    folder, bench = _bench(run, "distilled")
    if bench is None:
        return None
    mode = "top_p" if "top_p" in bench["config"]["modes"] else "greedy"
    src = folder / "manifest.json"
    plain = _fastest_plain(bench, mode)
    t = PaperTable("table5_spd_vs_lookup", f"Table 5: Speculative (distilled draft) vs prompt lookup across n ({mode})",
                   ["Decoding Method", "n", "Speed (tokens/s)", "Speedup"])
    if plain:
        t.rows.append([f"Autoregression ({_dtype_of(bench, plain)})", "-", Cell(plain["tokens_per_s"], src),
                       Cell(1.0, src)])
    ns = list(bench["config"]["num_speculative_tokens"])
    sp: dict[tuple[str, int], float | None] = {}
    hybrid = "speculative_lookup" in bench["config"].get("methods", [])
    for method, label in (("speculative", "SPD"), ("prompt_lookup", "Prompt Lookup"),
                          *((("speculative_lookup", "SPD + prompt lookup"),) if hybrid else ())):
        for n in ns:
            r = _row(bench, method, mode, n)
            sp[(method, n)] = _speedup(r, plain)
            t.rows.append([label, n, Cell(r["tokens_per_s"] if r else None, src), Cell(sp[(method, n)], src)])
    t.sizes = _sizes(bench)
    a, b = sp.get(("speculative", 3)), sp.get(("prompt_lookup", 3))
    if a is None or b is None:
        t.direction = "not checked (needs SPD and prompt lookup at n = 3)."
    else:
        ok = a > b
        t.direction = (f"{'reproduces' if ok else 'does not reproduce'} — SPD {a:.2f}× vs prompt lookup {b:.2f}× at "
                       "n = 3 (paper: 1.39× vs 1.12×)")
        if 5 in ns and sp.get(("speculative", 5)) is not None:
            dec = sp[("speculative", 5)] <= a  # type: ignore[operator]
            t.direction += (f"; SPD n = 5 {sp[('speculative', 5)]:.2f}× "
                            f"{'≤' if dec else '>'} n = 3 ({'as' if dec else 'unlike'} the paper)")
        t.direction += "."
    return t


def table6(run: RunFolder) -> PaperTable | None:
    folder, bench = _bench(run, "distilled")
    if bench is None:
        return None
    src = folder / "manifest.json"
    t = PaperTable("table6_greedy_vs_top_p", "Table 6: Greedy vs top-p 0.7 decoding speed (distilled draft, n = 3)",
                   ["Decoding Strategy", "Decoding Method", "Speed (tokens/s)", "Speedup"])
    sp: dict[str, float | None] = {}
    for mode, label in (("top_p", f"Top-p {bench['config'].get('top_p')}"), ("greedy", "Greedy")):
        if mode not in bench["config"]["modes"]:
            continue
        plain = _fastest_plain(bench, mode)
        spd = _row(bench, "speculative", mode, 3) or _fastest_speculative(bench, mode)  # n = 3 unless not run
        sp[mode] = _speedup(spd, plain)
        if plain:
            t.rows.append([label, f"Autoregression ({_dtype_of(bench, plain)})", Cell(plain["tokens_per_s"], src),
                           Cell(1.0, src)])
        name = "SPD" if spd is None or spd["n"] == 3 else f"SPD (n = {spd['n']}, its fastest; n = 3 not run)"
        t.rows.append([label, name, Cell(spd["tokens_per_s"] if spd else None, src), Cell(sp[mode], src)])
        hyb = _fastest_speculative(bench, mode, "speculative_lookup")
        if hyb is not None:  # the draft with prompt lookup beside it, at its fastest n
            t.rows.append([label, f"SPD + prompt lookup (n = {hyb['n']})", Cell(hyb["tokens_per_s"], src),
                           Cell(_speedup(hyb, plain), src)])
    t.sizes = _sizes(bench)
    g, p = sp.get("greedy"), sp.get("top_p")
    if g is None or p is None:
        t.direction = "not checked (needs both modes)."
    else:
        ok = g >= p and p > 1.0
        t.direction = (f"{'reproduces' if ok else 'does not reproduce'} — greedy {g:.2f}× vs top-p {p:.2f}× "
                       "(paper: 1.52× vs 1.39×, both > 1).")
    return t


def exactness_line(run: RunFolder) -> str | None:
    d = run.get("specdec_bench")
    if d is None or not (d / "exactness.json").is_file():
        return None
    e = _json(d / "exactness.json")
    parts = [f"{dt}: {v['identical']}/{e['prompts']} identical" for dt, v in e.items() if isinstance(v, dict)]
    return (f"Greedy speculative output equals plain greedy output token for token: **{e['exact']}** "
            f"(fp32; {', '.join(parts)}; n = {e['n']}, {e['max_new_tokens']} new tokens).")


def build_run_tables(run_dir: str | os.PathLike[str]) -> list[PaperTable]:
    """Every paper table the run has data for, in the paper's order."""
    run = RunFolder(run_dir)
    return [t for t in (table1(run), table2(run), table3(run), table4(run), table5(run), table6(run))
            if t is not None]


def render_report(run_dir: str | os.PathLike[str], tables: list[PaperTable], base: Path,
                  recipe_name: str | None = None) -> str:
    """report.md: the tables (numbers linked to manifests, relative to `base`), sizes and direction lines."""
    run = RunFolder(run_dir)
    lines = [f"# soaes pipeline report{f' — {recipe_name}' if recipe_name else ''}", "",
             "Regenerated from the run's manifests; every number links to the manifest of the output it was read "
             "from. Speedups are over the fastest plain decoding timed in the same benchmark run.", ""]
    stage_rows = ["| stage | seconds | counts |", "| --- | --- | --- |"]
    for name, d in run.stages.items():
        m = read_manifest(d) or {}
        secs = sum(m.get("timings_s", {}).values())
        counts = json.dumps(m.get("counts", {}), ensure_ascii=False, default=str)
        counts = counts if len(counts) <= 120 else counts[:117] + "..."
        link = Path(os.path.relpath((d / "manifest.json").resolve(), base.resolve())).as_posix()
        stage_rows.append(f"| [{name}]({link}) | {secs:.1f} | `{counts}` |")
    ex = exactness_line(run)
    lines += ["## Stages", "", *stage_rows, ""] + ([ex, ""] if ex else []) + ["## Tables", ""]
    lines += [t.to_markdown(base) for t in tables]
    missing = sorted({"table1_general", "table2_stages", "table3_alpha_tau", "table4_drafts", "table5_spd_vs_lookup",
                      "table6_greedy_vs_top_p"} - {t.name for t in tables})
    if missing:
        lines.append(f"Not in this run (its recipe has no data for them): {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


def write_run_report(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                     recipe_name: str | None = None, final_dir: str | os.PathLike[str] | None = None,
                     plots: bool = True) -> dict[str, Any]:
    """Write report.md, tables.md, `<table>.csv` and `<table>.png` into `out_dir`; links in report.md are
    relative to `final_dir` (where `out_dir` will end up; default `out_dir`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_run_tables(run_dir)
    written = write_tables([t.plain() for t in tables], out, plots=plots)
    base = Path(final_dir) if final_dir is not None else out
    written["report.md"] = atomic_write_text(out / "report.md", render_report(run_dir, tables, base, recipe_name))
    return {"tables": [t.name for t in tables], "files": sorted(str(p) for p in written.values())}
