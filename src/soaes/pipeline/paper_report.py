"""The `paper` and `domain-draft` recipes' reports: every row of the SOAEsV2 paper's Tables 1-6 (and the domain-draft
paper's comparisons) mapped to this run's models, with 95 % intervals and one verdict per paper direction.

Each row names the paper's model, what stands for it here and why (a note per row); a row whose model this run
did not make says so. Domain QA scores are re-scored per item from the eval stage's predictions (llamafactory
convention, whose corpus score is the item mean), so intervals are percentile bootstraps over items, paired
between rows scored on the same items. Speeds come from the benchmark's interleaved repeats (a range over
repeats); acceptance rates carry a Wilson interval over proposed tokens. Every number links to its manifest.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from soaes_core import atomic_write_text, read_jsonl, read_manifest
from soaes_eval.report import Cell, PaperTable, general_accuracy, write_tables

from .paper_stats import (
    UNRESOLVED,
    binomial_interval,
    bootstrap_diff,
    bootstrap_mean,
    fmt_ci,
    overall,
    ratio_range,
    verdict,
)
from .paper_tables import RunFolder

METRICS = ("rouge1", "rouge2", "rougeL", "bleu4")
MIN_REPEATS = 3  # a speed verdict needs this many timed repeats per side (the bench keeps no per-prompt times)
INSTRUCT = "the embedded SmolLM2-135M-Instruct"

# Table 2: (paper row, eval label here, note)
TABLE2_ROWS = (
    ("Qwen2.5-72B-Instruct", "base", f"{INSTRUCT}, untrained"),
    ("Qwen2.5-72B + stage-1 SFT", "base_sft_stage1", "stage-1 SFT from the base (an instruct model here)"),
    ("Qwen2.5-72B + stage-2 SFT", "base_sft_stage2", "stage-2 SFT from the base (an instruct model here)"),
    ("Qwen2.5-72B + CPT + stage-2 SFT", "sft_stage2_only", "CPT, then stage-2 SFT only"),
    ("Qwen2.5-72B-Instruct + stage-2 SFT", "base_sft_stage2",
     "the same model as row 3: the embedded base is already an instruct model, so no separate run"),
    ("Qwen2.5-72B + CPT + stage-1&2 joint SFT", "sft_joint", "CPT, then one SFT stage on both pools mixed"),
    ("SOAEsV2-72B-Chat (ours)", "sft_stage2", "CPT -> stage-1 SFT -> stage-2 SFT"),
)
GENERAL_DRAFT = "Qwen2.5-7B-Instruct"
UNDISTILLED = "SOAEsV2-7B-Chat (undistilled)"
DISTILLED = "SOAEsV2-7B-Chat (distilled)"
OURS = "SOAEsV2-7B-Chat (distilled, ours)"
DOMAIN_UNDISTILLED_KEY = "sweep/a0-t2"  # alpha 0: cross-entropy on the teacher's answers only
# Table 3 / 4 rows: (paper row, draft key here, alpha, tau)
TABLE3_ROWS = (
    (GENERAL_DRAFT, "general", None, None), (UNDISTILLED, DOMAIN_UNDISTILLED_KEY, None, None),
    (DISTILLED, "sweep/a0.2-t2", 0.2, 2.0), (OURS, "distilled", 0.5, 2.0), (DISTILLED, "sweep/a0.8-t2", 0.8, 2.0),
    (DISTILLED, "sweep/a1-t2", 1.0, 2.0), (DISTILLED, "sweep/a0.5-t1", 0.5, 1.0), (OURS, "distilled", 0.5, 2.0),
    (DISTILLED, "sweep/a0.5-t3", 0.5, 3.0), (DISTILLED, "sweep/a0.5-t5", 0.5, 5.0),
)
TABLE4_ROWS = (
    (GENERAL_DRAFT, "general", None, None), (UNDISTILLED, DOMAIN_UNDISTILLED_KEY, None, None),
    (DISTILLED, "sweep/a0.2-t2", 0.2, 2.0), (OURS, "distilled", 0.5, 2.0), (DISTILLED, "sweep/a0.8-t2", 0.8, 2.0),
    (DISTILLED, "sweep/a0.5-t1", 0.5, 1.0), (DISTILLED, "sweep/a0.5-t3", 0.5, 3.0),
)
DRAFT_NOTES = {
    "general": "layer draft cut from the untrained base (general_draft), never trained",
    DOMAIN_UNDISTILLED_KEY: "layer draft cut from the trained target, trained with alpha 0 (cross-entropy only)",
    "undistilled": "layer draft cut from the trained target, not trained (not a paper row)",
    "online": "online distillation on the rejected positions (not a paper row)",
}


class Run(RunFolder):
    """A pipeline run folder (`paper_tables.RunFolder`) with the files the paper report's tables read."""

    def json(self, stage: str, rel: str) -> tuple[Any, Path] | tuple[None, None]:
        d = self.stages.get(stage)
        if d is None or not (d / rel).is_file():
            return None, None
        return json.loads((d / rel).read_text(encoding="utf-8")), (d / rel).parent / "manifest.json"

    def eval_entries(self) -> dict[str, dict[str, Any]]:
        index, _ = self.json("eval", "index.json")
        return {e["label"]: e for e in index or []}

    def drafts(self) -> dict[str, Any]:
        return self.json("distill_draft", "drafts.json")[0] or {}


def draft_label(key: str) -> str:
    """The eval stage's label of draft `key` (drafts.json key; `general` = the general draft)."""
    return "general_draft" if key == "general" else "draft-" + key.replace("/", "-")


@cache
def item_scores(folder: Path) -> dict[str, list[float]]:
    """Per-item ROUGE-1/2/L and BLEU-4 (0-100, llamafactory convention) of an eval folder's domain predictions,
    keyed by item id order; `ids` holds the ids."""
    from soaes_eval.metrics import bleu4, rouge

    files = sorted(folder.glob("predictions_*.jsonl"))
    if not files:
        return {}
    out: dict[str, list[Any]] = {m: [] for m in (*METRICS, "ids")}
    for row in read_jsonl(files[0]):
        pred, ref = str(row["prediction"]), str(row["reference"])
        scores = {**rouge([pred], [ref]), "bleu4": bleu4([pred], [ref])}  # one item: its own sentence BLEU-4
        for m in METRICS:
            out[m].append(float(scores[m]))
        out["ids"].append(str(row["id"]))
    return out


def _domain(run: Run, label: str) -> tuple[dict[str, list[float]], Path] | tuple[None, None]:
    e = run.eval_entries().get(label)
    if e is None or not e.get("domain"):
        return None, None
    folder = run.stages["eval"] / e["domain"]
    scores = item_scores(folder.resolve())
    return (scores, folder / "manifest.json") if scores else (None, None)


def _paired(a: dict[str, list[float]], b: dict[str, list[float]], metric: str) -> tuple[list[float], list[float]]:
    ib = dict(zip(b["ids"], b[metric], strict=True))
    pairs = [(x, ib[i]) for i, x in zip(a["ids"], a[metric], strict=True) if i in ib]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def compare(a: dict[str, list[float]] | None, b: dict[str, list[float]] | None, what: str,
            metrics: tuple[str, ...] = ("rouge1", "bleu4")) -> str:
    """`what`: a > b on every metric, read off paired bootstrap intervals of the differences."""
    if a is None or b is None:
        return f"{what}: {UNRESOLVED} (a row is missing in this run)"
    parts, verdicts = [], []
    for m in metrics:
        x, y = _paired(a, b, m)
        if not x:
            return f"{what}: {UNRESOLVED} (no shared items)"
        d, lo, hi = bootstrap_diff(x, y)
        verdicts.append(verdict(lo, hi))
        parts.append(f"{m} diff {fmt_ci(d, lo, hi)}")
    return f"{what}: **{overall(verdicts)}** ({'; '.join(parts)}; {len(x)} paired items)"


def _score_cells(scores: dict[str, list[float]] | None, src: Path | None) -> list[Cell | None]:
    if scores is None:
        return [None] * len(METRICS)
    cells: list[Cell | None] = []
    for m in METRICS:
        mean, lo, hi = bootstrap_mean(scores[m])
        cells.append(Cell(fmt_ci(mean, lo, hi), src))
    return cells


# ------------------------------------------------------------------------------------------ Tables 1-3


def table1(run: Run) -> PaperTable:
    t = PaperTable("table1_general", "Table 1: General ability before and after CPT (accuracy %, 95 % interval)",
                   ["Paper row", "Here", "CMMLU", "C-EVAL", "Avg.", "Note"])
    entries = run.eval_entries()
    accs: dict[str, tuple[float, int] | None] = {}
    for label in ("cpt", "base"):
        e = entries.get(label)
        res, src = run.json("eval", f"{e['general']}/results.json") if e and e.get("general") else (None, None)
        if res is None:
            accs[label] = None
            continue
        parts = [general_accuracy(res, p) for p in ("soaes_cmmlu", "soaes_ceval")]
        n = sum(k for _, k in parts)
        avg = sum((a or 0.0) * k for a, k in parts) / n if n else None
        accs[label] = (avg, n) if avg is not None else None
        cells = [Cell(fmt_ci(*[100 * v for v in binomial_interval(a * k / 100, k)]), src) if a is not None and k
                 else None for a, k in parts]
        accs[label + "_cells"] = (cells, Cell(fmt_ci(*[100 * v for v in binomial_interval(avg * n / 100, n)]), src)
                                  if avg is not None else None)  # type: ignore[assignment]
    for paper, label, note in (
            ("SOAEsV1-7B", None, "the authors' earlier model: nothing here stands for it"),
            ("SOAEsV2-7B (ours)", None, "the draft is a layer cut of the trained target, not a CPT'd small model: "
                                        "no row here"),
            ("Qwen2.5-7B", None, "no general small model is evaluated on the general tasks here"),
            ("DeepSeek-V3 base", None, "external result quoted by the paper: not runnable here"),
            ("SOAEsV2-72B (ours)", "cpt", f"{INSTRUCT} after CPT"),
            ("Qwen2.5-72B", "base", f"{INSTRUCT}")):
        got = accs.get(f"{label}_cells") if label else None
        if got is None:
            t.rows.append([paper, "–" if label is None else label, None, None, None, note +
                           ("" if label is None else " (not in this run)")])
        else:
            t.rows.append([paper, label, *got[0], got[1], note])  # type: ignore[index]
    base, cpt = accs.get("base"), accs.get("cpt")
    if base and cpt:
        t.sizes = f"{cpt[1]} items per model (CMMLU + C-EVAL); Wilson intervals over items (0/1 per item)"
        # retention >= 95 % of the base's average: the whole difference interval above -5 % of the base
        p_b = binomial_interval(base[0] * base[1] / 100, base[1])
        p_c = binomial_interval(cpt[0] * cpt[1] / 100, cpt[1])
        lo, hi = 100 * (p_c[1] - p_b[2]), 100 * (p_c[2] - p_b[1])
        v = verdict(lo, hi, threshold=-0.05 * base[0])
        t.direction = (f"CPT retains the base's general ability (>= 95 % of its average): **{v}** — CPT {cpt[0]:.2f} "
                       f"vs base {base[0]:.2f}, difference within [{lo:.2f}, {hi:.2f}] (paper: 99.8 % for 72B, "
                       "98.8 % for 7B).")
    else:
        t.sizes, t.direction = "–", f"{UNRESOLVED} (needs the base and CPT rows)."
    return t


def table2(run: Run) -> PaperTable:
    t = PaperTable("table2_stages", "Table 2: Domain QA across training stages (0-100, 95 % bootstrap interval)",
                   ["Paper row", "Here", "Rouge-1", "Rouge-2", "Rouge-l", "BLEU-4", "Note"])
    got = {label: _domain(run, label) for _, label, _ in TABLE2_ROWS}
    n = 0
    for paper, label, note in TABLE2_ROWS:
        scores, src = got[label]
        n = len(scores["ids"]) if scores else n
        t.rows.append([paper, label, *_score_cells(scores, src), note if scores else note + " (not in this run)"])
    s = {k: v[0] for k, v in got.items()}
    t.sizes = f"{n} held-out domain QA items per row (greedy, chat template)"
    t.direction = "; ".join([
        compare(s["sft_stage2_only"], s["base_sft_stage2"], "CPT helps (CPT + stage-2 > base + stage-2)"),
        compare(s["sft_stage2"], s["sft_stage2_only"], "staged SFT helps (ours > CPT + stage-2 only)"),
        compare(s["sft_stage2"], s["sft_joint"], "staged beats joint SFT (ours > CPT + joint)"),
        compare(s["sft_stage2"], s["base"], "ours beats the instruct base")]) + "."
    return t


def table3(run: Run) -> PaperTable:
    t = PaperTable("table3_alpha_tau", "Table 3: Distillation α/τ and the draft's own domain QA (95 % interval)",
                   ["Paper row", "Here", "α", "τ", "Rouge-1", "Rouge-2", "Rouge-l", "BLEU-4", "Note"])
    keys = [k for _, k, _, _ in TABLE3_ROWS]
    extra = [k for k in ["undistilled", *sorted(run.drafts()), "online"] if k not in keys and k != "distilled"]
    rows = [*TABLE3_ROWS, *(("(not a paper row)", k, None, None) for k in dict.fromkeys(extra))]
    got: dict[str, Any] = {}
    n = 0
    for paper, key, a, tau in rows:
        scores, src = got.setdefault(key, _domain(run, draft_label(key)))
        if scores is None and paper == "(not a paper row)":
            continue
        n = len(scores["ids"]) if scores else n
        info = run.drafts().get(key, {})
        note = DRAFT_NOTES.get(key, "grid point beyond the paper's rows" if paper.startswith("(") else "")
        t.rows.append([paper, key, info.get("alpha", a if a is not None else "-"),
                       info.get("temperature", tau if tau is not None else "-"), *_score_cells(scores, src),
                       note if scores else (note + " (not in this run)").strip()])
    s = {k: v[0] for k, v in got.items()}
    t.sizes = f"{n} held-out domain QA items per row (greedy, chat template)"
    alpha = [compare(s["distilled"], s[k], f"α=0.5 > α={k.split('-')[0][7:]}")
             for k in ("sweep/a0.2-t2", "sweep/a0.8-t2", "sweep/a1-t2")]
    tau = [compare(s["distilled"], s[k], f"τ=2 > τ={k.split('-t')[1]}")
           for k in ("sweep/a0.5-t1", "sweep/a0.5-t3", "sweep/a0.5-t5")]
    base = compare(s["distilled"], s[DOMAIN_UNDISTILLED_KEY], "distilled > domain undistilled")
    t.direction = ("best at α=0.5, τ=2 (paper): " + "; ".join(alpha + tau) + "; " + base +
                   "; " + compare(s[DOMAIN_UNDISTILLED_KEY], s["general"], "domain undistilled > general") + ".")
    return t


# ------------------------------------------------------------------------------------------ Tables 4-6 (speed)


def _bench(run: Run, stage: str, key: str) -> tuple[dict[str, Any] | None, Path | None]:
    return run.json(stage, f"{key}/bench.json")


def _row(bench: dict[str, Any], method: str, mode: str, n: int | None) -> dict[str, Any] | None:
    return next((r for r in bench["results"] if r["method"] == method and r["mode"] == mode
                 and (n is None or r.get("n") == n) and not r.get("adaptive")), None)


def _plain(bench: dict[str, Any], mode: str) -> dict[str, Any] | None:
    rows = [r for r in bench["results"] if r["method"] in ("plain", "plain_reference") and r["mode"] == mode]
    return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None


def _speed_cells(row: dict[str, Any] | None, plain: dict[str, Any] | None,
                 src: Path | None) -> tuple[list[Cell | None], tuple[float, float, float] | str | None]:
    """tokens/s (range over repeats) and speedup over plain (range) of a bench row; the speedup for a verdict only
    with `MIN_REPEATS` repeats (else the reason there is none)."""
    if row is None or plain is None:
        return [None, None], None
    rates = row["repeats_tokens_per_s"]
    sp = ratio_range(rates, plain["repeats_tokens_per_s"])
    cells: list[Cell | None] = [Cell(fmt_ci(row["tokens_per_s"], min(rates), max(rates), 1), src),
                                Cell(fmt_ci(*sp), src)]
    few = min(len(rates), len(plain["repeats_tokens_per_s"])) < MIN_REPEATS
    return cells, f"fewer than {MIN_REPEATS} repeats" if few else sp


def _acceptance(row: dict[str, Any] | None) -> tuple[float, float, float] | None:
    """Acceptance and its Wilson interval over the proposed tokens (proposed = n per verify step)."""
    if row is None or row.get("acceptance_rate") is None or not row.get("target_calls") or not row.get("n"):
        return None
    proposed = row["n"] * row["target_calls"]
    return binomial_interval(row["acceptance_rate"] * proposed, proposed)


def _sep(a: tuple[float, float, float] | str | None, b: tuple[float, float, float] | str | None, what: str) -> str:
    """`what`: a > b, resolved only when the intervals do not overlap (a string: why a side has no interval)."""
    if a is None or b is None:
        return f"{what}: {UNRESOLVED} (a row is missing in this run)"
    if isinstance(a, str) or isinstance(b, str):
        return f"{what}: **{UNRESOLVED}** ({a if isinstance(a, str) else b})"
    v = "reproduces" if a[1] > b[2] else "does not reproduce" if a[2] < b[1] else UNRESOLVED
    return f"{what}: **{v}** ({fmt_ci(*a)} vs {fmt_ci(*b)})"


def table4(run: Run) -> PaperTable:
    t = PaperTable("table4_drafts", "Table 4: Drafts at top-p 0.7, n = 3 (95 % interval / range over repeats)",
                   ["Paper row", "Here", "α", "τ", "Acceptance Rate (%)", "Speed (tokens/s)", "Speedup", "Note"])
    drafts = run.drafts()
    keys = [k for _, k, _, _ in TABLE4_ROWS]
    extra = [k for k in ["undistilled", *sorted(drafts), "online"] if k not in keys]
    rows = [*TABLE4_ROWS, *(("(not a paper row)", k, None, None) for k in dict.fromkeys(extra))]
    acc: dict[str, Any] = {}
    spd: dict[str, Any] = {}
    sizes = ""
    first, fsrc = _bench(run, "draft_bench", "distilled")
    plain = _plain(first, "top_p") if first else None
    t.rows.append(["None", "plain decoding", "-", "-", None,
                   *(_speed_cells(plain, plain, fsrc)[0] if plain else [None, None]),
                   "target alone, fastest plain decoding timed in the distilled draft's job"])
    for paper, key, a, tau in rows:
        bench, src = _bench(run, "draft_bench", key)
        if bench is None and paper == "(not a paper row)":
            continue
        row = _row(bench, "speculative", "top_p", 3) if bench else None
        cells, spd[key] = _speed_cells(row, _plain(bench, "top_p") if bench else None, src)
        acc[key] = _acceptance(row)
        info = drafts.get(key, {})
        note = DRAFT_NOTES.get(key, "grid point beyond the paper's rows" if paper.startswith("(") else "")
        t.rows.append([paper, key, info.get("alpha", a if a is not None else "-"),
                       info.get("temperature", tau if tau is not None else "-"),
                       Cell(fmt_ci(*[100 * v for v in acc[key]]), src) if acc[key] else None, *cells,
                       note if bench else (note + " (not in this run)").strip()])
        if bench and not sizes:
            cfg = bench["config"]
            sizes = (f"{bench['num_prompts']} held-out domain prompts × {cfg['max_new_tokens']} new tokens, "
                     f"median of {cfg['repeats']} interleaved repeats (speed ranges: over repeats); acceptance: "
                     "Wilson interval over proposed tokens (tokens of one prompt are not independent: optimistic)")
    t.sizes = sizes or "–"
    speed = _sep(spd.get("distilled"), (1.0, 1.0, 1.0), "distilled draft faster than plain (speedup; paper 1.39×)")
    t.direction = "; ".join([speed, _sep(acc.get("distilled"), acc.get(DOMAIN_UNDISTILLED_KEY),
                                         "acceptance distilled > domain undistilled (paper 75.78 vs 73.94)"),
                             _sep(acc.get(DOMAIN_UNDISTILLED_KEY), acc.get("general"),
                                  "acceptance domain undistilled > general (paper 73.94 vs 68.06)")]) + "."
    return t


def _spd_table(run: Run, name: str, title: str) -> tuple[PaperTable, dict[str, Any] | None, Path | None]:
    bench, src = _bench(run, "draft_bench", "distilled")
    if bench is None:
        bench, src = _bench(run, "specdec_bench", "distilled")
    return PaperTable(name, title, ["Decoding", "Method", "n", "Speed (tokens/s)", "Speedup", "Note"]), bench, src


def table5(run: Run) -> PaperTable:
    t, bench, src = _spd_table(run, "table5_spd_vs_lookup",
                               "Table 5: SPD (distilled draft) vs prompt lookup, top-p 0.7 (range over repeats)")
    sp: dict[tuple[str, int], Any] = {}
    plain = _plain(bench, "top_p") if bench else None
    t.rows.append(["Top-p", "Autoregression", "-", *_speed_cells(plain, plain, src)[0], "fastest plain decoding"])
    for method, label in (("speculative", "SPD"), ("prompt_lookup", "Prompt Lookup")):
        for n in (3, 5):
            row = _row(bench, method, "top_p", n) if bench else None
            cells, sp[(method, n)] = _speed_cells(row, plain, src)
            t.rows.append(["Top-p", label, n, *cells, "" if row else "not in this run"])
    t.sizes = f"{bench['num_prompts']} held-out prompts, {bench['config']['repeats']} repeats" if bench else "–"
    t.direction = "; ".join([_sep(sp[("speculative", 3)], sp[("prompt_lookup", 3)], "SPD > prompt lookup at n = 3"),
                             _sep(sp[("speculative", 3)], sp[("speculative", 5)], "SPD n = 3 > n = 5")]) + "."
    return t


def table6(run: Run) -> PaperTable:
    t, bench, src = _spd_table(run, "table6_greedy_vs_top_p",
                               "Table 6: Greedy vs top-p 0.7, distilled draft, n = 3 (range over repeats)")
    sp: dict[str, Any] = {}
    for mode, label in (("top_p", "Top-p"), ("greedy", "Greedy")):
        plain = _plain(bench, mode) if bench else None
        row = _row(bench, "speculative", mode, 3) if bench else None
        t.rows.append([label, "Autoregression", "-", *_speed_cells(plain, plain, src)[0], ""])
        cells, sp[mode] = _speed_cells(row, plain, src)
        t.rows.append([label, "SPD", 3, *cells, "" if row else "not in this run"])
    t.sizes = f"{bench['num_prompts']} held-out prompts, {bench['config']['repeats']} repeats" if bench else "–"
    g, p = sp.get("greedy"), sp.get("top_p")
    t.direction = "; ".join([_sep(g, p, "greedy speedup > top-p speedup (paper 1.52× vs 1.39×)"),
                             _sep(p, (1.0, 1.0, 1.0), "top-p speedup > 1")]) + "."
    return t


# ------------------------------------------------------------------------------------------ domain-draft paper


DD_ROWS = (  # (paper method, draft key, note)
    ("Baseline (no training)", "undistilled", "the layer cut of the target before any training"),
    ("Offline KL (white-box, forward KL)", "distilled", "distill_draft.kd: the dumped logits, 3 epochs, lr 2e-5"),
    ("Online KL (white-box)", "online", "distill_draft.online: updates on the verifier's rejected positions, lr 1e-6"),
    ("SFT (black-box)", "sweep/a0-t1", "alpha 0: cross-entropy on the target's answers, no logits used"),
)


def dd_table(run: Run) -> PaperTable:
    t = PaperTable("dd_methods", "Domain-draft comparisons: acceptance at top-p 0.7, n = 3 (95 % interval)",
                   ["Paper method", "Here", "Acceptance (%)", "vs baseline", "offline est. (%)", "Speedup", "Note"])
    drafts = run.drafts()
    acc: dict[str, Any] = {}
    for paper, key, note in DD_ROWS:
        bench, src = _bench(run, "draft_bench", key)
        row = _row(bench, "speculative", "top_p", 3) if bench else None
        acc[key] = _acceptance(row)
        cells, _ = _speed_cells(row, _plain(bench, "top_p") if bench else None, src)
        base = acc.get("undistilled")
        rel = f"{100 * (acc[key][0] / base[0] - 1):+.1f} %" if acc[key] and base and base[0] else None
        est = drafts.get(key, {}).get("offline_acceptance", {}).get("acceptance_greedy")
        t.rows.append([paper, key, Cell(fmt_ci(*[100 * v for v in acc[key]]), src) if acc[key] else None, rel,
                       Cell(100 * est, run.stages["distill_draft"] / "manifest.json") if est is not None else None,
                       cells[1], note if row else note + " (not in this run)"])
    source = (read_manifest(run.stages["teacher_data"]) or {}).get("config", {}) if "teacher_data" in run.stages \
        else {}
    src_name = source.get("source", "prompts") if isinstance(source, dict) else "prompts"
    for paper, what in (("Forward vs reverse KL", "rerun with --set distill_draft.kd.divergence=reverse_kl "
                         "and compare the `distilled` rows"),
                        ("Data: user queries / Magpie / domain text", f"this run: teacher_data.source = {src_name}; "
                         "rerun with --set teacher_data.source=prompts|magpie|passages")):
        t.rows.append([paper, "–", None, None, None, None, what])
    t.sizes = "held-out domain prompts of teacher_data; Wilson intervals over proposed tokens (optimistic)"
    t.direction = "; ".join([
        _sep(acc.get("distilled"), acc.get("online"), "offline > online (paper: by 11-25 %)"),
        _sep(acc.get("distilled"), acc.get("sweep/a0-t1"), "white-box > black-box (paper: by 2-10 %)"),
        _sep(acc.get("distilled"), acc.get("undistilled"), "offline KL > baseline")]) + "."
    return t


# ------------------------------------------------------------------------------------------ the report


def build_tables(run_dir: str | os.PathLike[str], kind: str = "paper") -> list[PaperTable]:
    """The `paper` tables (1-6, every paper row) or the `domain-draft` comparison table of a run folder."""
    run = Run(run_dir)
    if kind == "domain-draft":
        return [dd_table(run)]
    return [table1(run), table2(run), table3(run), table4(run), table5(run), table6(run)]


def render(run_dir: str | os.PathLike[str], tables: list[PaperTable], base: Path, title: str) -> str:
    run = Run(run_dir)
    lines = [f"# {title}", "", "Every paper row is listed with what stands for it here; intervals are 95 %. A "
             "direction reproduces only when its whole interval is on the paper's side; otherwise it is "
             "\"not resolved\" (or \"does not reproduce\" when the interval is on the other side).", "",
             "| stage | seconds | manifest |", "| --- | --- | --- |"]
    for name, d in run.stages.items():
        secs = sum((read_manifest(d) or {}).get("timings_s", {}).values())
        link = Path(os.path.relpath((d / "manifest.json").resolve(), base.resolve())).as_posix()
        lines.append(f"| {name} | {secs:.1f} | [{d.name}/manifest.json]({link}) |")
    lines.append("")
    lines += [t.to_markdown(base) for t in tables]
    return "\n".join(lines) + "\n"


def write_paper_report(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], kind: str = "paper",
                       final_dir: str | os.PathLike[str] | None = None, plots: bool = False) -> dict[str, Any]:
    """Write `<kind>_report.md` and one CSV per table into `out_dir` (links relative to `final_dir`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(run_dir, kind)
    written = write_tables([t.plain() for t in tables], out, plots=plots)
    base = Path(final_dir) if final_dir is not None else out
    title = "SOAEsV2 paper, Tables 1-6" if kind == "paper" else "Domain draft models: best practices, comparisons"
    written[f"{kind}_report.md"] = atomic_write_text(out / f"{kind}_report.md", render(run_dir, tables, base, title))
    return {"tables": [t.name for t in tables], "files": sorted(str(p) for p in written.values())}
