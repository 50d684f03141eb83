"""The draft-training experiment (a benchmark, not library code): which draft-training method gives the best
speculative-decoding draft?

Target: the embedded SmolLM2-135M. Draft: its first 4 layers (+ norm + tied head). Data: prompts of the
soaes-data sample pools (every 4th held out), article-summary prompts and Magpie queries; the target's
greedy answers are the training text (so black-box SFT and white-box KD see the same tokens). Methods:
undistilled, black-box SFT (α = 0: CE on the target's outputs), offline forward-KL KD (α = 0.5, τ = 2) and
reverse KL from stored top-k logits, online distillation while serving a prompt stream, and the α/τ grid of
the SOAEs paper's Tables 3–4. Each draft gets the offline acceptance estimate on held-out target answers;
the main ones are also run through `soaes_specdec` (n = 3, greedy and top-p 0.7) for measured acceptance
and speedup over plain autoregressive decoding of the target. This is a benchmark, not a test: it is
small enough for a 2-core CPU and records exactly what it ran.

It lived in the library as `soaes_distill.experiment` / `soaes-distill experiment` until the pipeline's
`distill_draft` stage took over training the best draft; the measured numbers in docs/benchmarks.md came from it:
    HF_HUB_OFFLINE=1 python benchmarks/distill/experiment.py --config benchmarks/distill/experiment_cpu.yaml \
        --out runs/distill-exp
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from soaes_core import (
    DEFAULT_MODEL,
    atomic_write_json,
    atomic_write_text,
    encode_chat_prompt,
    load_model,
    load_tokenizer,
    read_jsonl,
    read_prompts,
    seed_everything,
    write_jsonl,
)
from soaes_core.cli_options import KeysHelpCommand, build_config
from soaes_core.clitools import setup_logging
from soaes_data.samples import sample_path
from soaes_distill.acceptance import AcceptanceAccumulator
from soaes_distill.draft_init import freeze_embeddings, frequent_tokens, restrict_output_head, save_draft
from soaes_distill.dump import DumpConfig, run_dump
from soaes_distill.online import OnlineConfig, online_distill
from soaes_distill.store import TeacherLogitStore
from soaes_distill.synth import (
    MagpieResult,
    QueryFilter,
    blackbox_sft_records,
    chat_records_to_examples,
    end_of_turn_ids,
    magpie_generate,
)
from soaes_distill.token_data import TokenExample, write_token_jsonl
from soaes_distill.trainer import KDCollator, KDConfig, KDDataset, KDTrainer
from soaes_specdec.decoding import SpecStats, SpeculativeDecoder, autoregressive_generate
from soaes_specdec.draft import make_layer_draft
from soaes_train.config import TrainConfig
from soaes_train.trainer import build_training_arguments

log = logging.getLogger(__name__)

DOMAIN_SYSTEM = "You are an expert on the supervision of state-owned assets and enterprises (国有资产监管)."


@dataclass
class ExperimentConfig:
    """Sizes of the experiment (defaults fit a shared 2-core CPU in well under an hour)."""

    output_dir: str = "runs/distill-experiment"
    target: str = DEFAULT_MODEL
    draft_layers: int = 4
    steps: int = 20
    batch_size: int = 4
    learning_rate: float = 5e-4
    train_embeddings: bool = False
    answer_tokens: int = 40
    max_length: int = 160
    article_prompts: int = 24
    magpie_queries: int = 16
    eval_answer_tokens: int = 40
    speed_prompts: int = 4
    speed_new_tokens: int = 32
    top_k: int = 64
    tail_samples: int = 0  # teacher tail ids sampled per position at τ=2 (0 = top-k with one tail bucket)
    head_tokens: int = 4096
    online_prompts: int = 16
    online_new_tokens: int = 24
    grid: bool = True
    grid_steps: int = 0  # training steps of each α/τ grid run; 0 = `steps`
    save_drafts: bool = True  # save_pretrained every measured draft under OUTPUT_DIR/drafts/ (for soaes-specdec bench)
    seed: int = 0

    def quick(self) -> ExperimentConfig:
        """A smoke-sized variant (minutes): few prompts, few steps, no grid."""
        return dataclasses.replace(self, steps=4, article_prompts=4, magpie_queries=2, speed_prompts=2,
                                   speed_new_tokens=12, online_prompts=3, online_new_tokens=8, grid=False,
                                   answer_tokens=16, eval_answer_tokens=16)


@dataclass
class ExperimentReport:
    rows: list[dict[str, Any]]
    baseline: dict[str, Any]
    markdown: str
    settings: dict[str, Any] = field(default_factory=dict)


def sample_prompts(cfg: ExperimentConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train prompts, held-out prompts): pool prompts with every 4th held out, plus article prompts."""
    pool = read_prompts(sample_path("sft/expert_pool.jsonl")) + read_prompts(sample_path("sft/dialog_pool.jsonl"))
    held = [p for i, p in enumerate(pool) if i % 4 == 3]
    train = [p for i, p in enumerate(pool) if i % 4 != 3]
    articles = [r for r in read_jsonl(sample_path("corpus/articles.jsonl")) if r.get("kind") == "domain"]
    for r in articles[: cfg.article_prompts]:
        train.append({"id": f"article-{len(train)}", "prompt": "请用两三句话概括下面的内容：\n" + r["text"][:200]})
    return train, held


def _train(draft: Any, examples: list[TokenExample], kd: KDConfig, cfg: ExperimentConfig, out: Path,
           store: TeacherLogitStore, steps: int) -> tuple[Any, list[dict[str, float]], float]:
    train_cfg = TrainConfig(learning_rate=cfg.learning_rate, lr_scheduler="constant_with_warmup", warmup_ratio=0.1,
                            max_steps=steps, per_device_train_batch_size=cfg.batch_size, seed=cfg.seed,
                            save_steps=10**9, logging_steps=max(1, cfg.steps // 10), bf16=False)
    args = build_training_arguments(train_cfg, out, None, save_strategy="no")
    if not cfg.train_embeddings:
        freeze_embeddings(draft)
    trainer = KDTrainer(model=draft, args=args, train_dataset=KDDataset(examples), data_collator=KDCollator(),
                        kd=kd, teacher_store=store)
    start = time.perf_counter()
    trainer.train()
    draft.eval()
    return draft, trainer.kd_history, time.perf_counter() - start


@torch.no_grad()
def _estimate(target_logits: list[torch.Tensor], draft: Any, eval_examples: list[TokenExample]) -> dict[str, float]:
    acc = AcceptanceAccumulator(top_p=0.7, block_sizes=(3, 9))
    for t_logits, ex in zip(target_logits, eval_examples, strict=False):
        ids = torch.tensor([ex.input_ids])
        d = draft(input_ids=ids, use_cache=False).logits
        acc.add(t_logits, d, torch.tensor([ex.labels]))
    return acc.result().as_metrics()


def _speed(target: Any, draft: Any | None, prompts: list[list[int]], new_tokens: int, eos: list[int],
           do_sample: bool) -> dict[str, float]:
    """Tokens/s and acceptance over `prompts` (batch 1 each, like a latency benchmark)."""
    gen = torch.Generator().manual_seed(1234)
    kwargs = {"do_sample": do_sample, "top_p": 0.7 if do_sample else 1.0, "eos_token_id": eos, "generator": gen}
    runs = []
    for p in prompts:
        ids = torch.tensor([p])
        if draft is None:
            out = autoregressive_generate(target, ids, max_new_tokens=new_tokens, **kwargs)
        else:
            out = SpeculativeDecoder(target, draft, num_speculative_tokens=3).generate(ids, max_new_tokens=new_tokens,
                                                                                       **kwargs)
        runs.append(out.stats)
    total = SpecStats.merge(runs)
    return {"tokens": total.new_tokens, "wall_s": total.wall_time_s, "tokens_per_s": total.tokens_per_s,
            "acceptance_rate": total.acceptance_rate}


def run_experiment(cfg: ExperimentConfig) -> ExperimentReport:
    """Run the whole experiment; writes `report.json` and `report.md` under `cfg.output_dir`."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.target)
    target = load_model(cfg.target, dtype=torch.float32, device="cpu").eval()
    eos = end_of_turn_ids(tok)
    timings: dict[str, float] = {}

    # -- data: target answers to train prompts (+ Magpie), held-out answers for evaluation -----------------
    train_prompts, held_prompts = sample_prompts(cfg)
    s = time.perf_counter()
    data_file = out / "generated_data.json"  # the costly generation step is reused when the run is resumed
    if data_file.is_file():
        cached = json.loads(data_file.read_text(encoding="utf-8"))
        magpie = MagpieResult(cached["magpie_records"], cached["magpie_rejects"], cached["magpie_generated"])
        records, held_records = cached["records"], cached["held_records"]
    else:
        magpie = magpie_generate(target, tok, cfg.magpie_queries, system=DOMAIN_SYSTEM, max_query_tokens=48,
                                 max_answer_tokens=cfg.answer_tokens, flt=QueryFilter(min_chars=10), seed=cfg.seed)
        records = blackbox_sft_records(target, tok, train_prompts, cfg.answer_tokens) + magpie.records
        held_records = blackbox_sft_records(target, tok, held_prompts, cfg.eval_answer_tokens)
        atomic_write_json(data_file, {"magpie_records": magpie.records, "magpie_rejects": magpie.rejects,
                                      "magpie_generated": magpie.generated, "records": records,
                                      "held_records": held_records})
    timings["generate_data_s"] = time.perf_counter() - s
    rejects: list[dict[str, Any]] = []
    train_examples = chat_records_to_examples(tok, records, cfg.max_length, rejects)
    eval_examples = chat_records_to_examples(tok, held_records, cfg.max_length, rejects)
    write_jsonl(out / "train_records.jsonl", records)
    write_jsonl(out / "heldout_records.jsonl", held_records)
    write_jsonl(out / "rejects.jsonl", rejects + magpie.rejects)
    data_path = write_token_jsonl(out / "train_tokens.jsonl", train_examples)
    write_token_jsonl(out / "heldout_tokens.jsonl", eval_examples)

    # -- offline teacher logits ------------------------------------------------------------------------------
    s = time.perf_counter()
    temps = sorted({2.0, 1.0, 3.0, 5.0} if cfg.grid else {2.0})
    dump = run_dump(DumpConfig(dataset=str(data_path), output_dir=str(out / "teacher_logits"), top_k=cfg.top_k,
                               temperatures=temps, examples_per_shard=64, batch_size=8,
                               tail_samples=cfg.tail_samples, tail_temperature=2.0 if cfg.tail_samples else None),
                    model=target, tokenizer=tok)
    store = TeacherLogitStore(out / "teacher_logits")
    timings["dump_s"] = time.perf_counter() - s
    with torch.no_grad():
        target_eval_logits = [target(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits
                              for ex in eval_examples]
    speed_prompts = [encode_chat_prompt(tok, p["prompt"]) for p in held_prompts[: cfg.speed_prompts]]
    base_greedy = _speed(target, None, speed_prompts, cfg.speed_new_tokens, eos, do_sample=False)

    draft0 = make_layer_draft(target, cfg.draft_layers)
    rows: list[dict[str, Any]] = []
    drafts: dict[str, Any] = {}
    settings = {**dataclasses.asdict(cfg), "train_examples": len(train_examples), "eval_examples": len(eval_examples),
                "train_tokens": sum(len(e.input_ids) for e in train_examples),
                "heldout_prompts": len(held_prompts), "magpie_generated": magpie.generated,
                "magpie_kept": len(magpie.records), "store_bytes_per_token": dump.bytes_per_token,
                "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "timings": timings}
    baseline = {"start": base_greedy, "end": None, "tokens_per_s": base_greedy["tokens_per_s"]}

    def record(row: dict[str, Any], draft: Any, head_ids: list[int] | None = None) -> None:
        """Add a row and rewrite the report, so a long run leaves usable partial results."""
        rows.append(row)
        drafts[row["method"]] = draft
        if cfg.save_drafts and "greedy" in row:
            row["draft_dir"] = str(save_draft(draft, tok, out / "drafts" / _slug(row["method"]), head_ids,
                                              {"method": row["method"], "target": cfg.target}))
        _add_speedups(rows, baseline["tokens_per_s"])
        timings["total_s"] = time.perf_counter() - t0
        atomic_write_json(out / "report.json", {"rows": rows, "baseline": baseline, "settings": settings})
        atomic_write_text(out / "report.md", render_markdown(rows, baseline, settings))

    def evaluate(name: str, draft: Any, measure: bool, **extra: Any) -> dict[str, Any]:
        row = {"method": name, **extra, **_estimate(target_eval_logits, draft, eval_examples)}
        if measure:
            row["greedy"] = _speed(target, draft, speed_prompts, cfg.speed_new_tokens, eos, do_sample=False)
            row["top_p_0.7"] = _speed(target, draft, speed_prompts, cfg.speed_new_tokens, eos, do_sample=True)
        return row

    def trained(name: str, kd: KDConfig, measure: bool, steps: int) -> None:
        log.info("experiment: %s", name)
        draft, history, seconds = _train(copy.deepcopy(draft0), train_examples, kd, cfg,
                                         out / "runs" / f"run{len(rows)}", store, steps)
        record(evaluate(name, draft, measure, train_s=round(seconds, 1), steps=len(history),
                        final_loss=history[-1]["loss"] if history else None), draft)

    record(evaluate("undistilled", draft0, True, train_s=0.0, steps=0, final_loss=None), draft0)
    trained("offline forward KL (α=0.5, τ=2)", KDConfig(alpha=0.5, temperature=2.0), True, cfg.steps)
    trained("black-box SFT (α=0)", KDConfig(alpha=0.0, temperature=2.0), True, cfg.steps)
    trained("offline reverse KL (α=0.5, τ=2)", KDConfig(alpha=0.5, temperature=2.0, divergence="reverse_kl"), True,
            cfg.steps)

    # -- online distillation: serve a prompt stream, update the draft from rejected positions -------------------
    log.info("experiment: online distillation")
    s = time.perf_counter()
    draft = copy.deepcopy(draft0)
    if not cfg.train_embeddings:
        freeze_embeddings(draft)
    stream = [encode_chat_prompt(tok, p["prompt"]) for p in (train_prompts + [{"prompt": r["messages"][0]["content"]}
                                                                              for r in magpie.records])]
    online = online_distill(target, draft, stream[: cfg.online_prompts],
                            OnlineConfig(max_new_tokens=cfg.online_new_tokens, buffer_threshold=48, update_steps=4,
                                         learning_rate=cfg.learning_rate, kd=KDConfig(alpha=0.5, temperature=2.0)),
                            eos_token_id=eos)
    half = len(online.acceptance) // 2
    settings.update(online_updates=online.updates, online_buffered_positions=online.buffered_positions)
    record(evaluate("online distillation (stream, α=0.5, τ=2)", draft, True,
                    train_s=round(time.perf_counter() - s, 1), steps=online.updates * 4, final_loss=None,
                    stream_acceptance_first_half=online.window_acceptance(0, half),
                    stream_acceptance_second_half=online.window_acceptance(half)), draft)

    # -- restricted output head on the best measured draft ------------------------------------------------------
    best = max((r for r in rows if "greedy" in r), key=lambda r: r["acceptance_greedy"])
    head_ids = frequent_tokens([ex.input_ids for ex in train_examples], cfg.head_tokens, always=tok.all_special_ids)
    restricted = restrict_output_head(copy.deepcopy(drafts[best["method"]]), head_ids)
    record(evaluate(f"{best['method']} + head restricted to {len(head_ids)} tokens", restricted, True,
                    train_s=0.0, steps=best["steps"], final_loss=None), restricted, head_ids)

    # -- the α/τ grid of Tables 3-4 (offline estimate only: spec-decoding timings are the costly part) ----------
    if cfg.grid:
        for a, t in ((0.2, 2.0), (0.8, 2.0), (1.0, 2.0), (0.5, 1.0), (0.5, 3.0), (0.5, 5.0)):
            trained(f"grid forward KL (α={a}, τ={t:g})", KDConfig(alpha=a, temperature=t), False,
                    cfg.grid_steps or cfg.steps)

    base_greedy_end = _speed(target, None, speed_prompts, cfg.speed_new_tokens, eos, do_sample=False)
    baseline.update(end=base_greedy_end,
                    tokens_per_s=(base_greedy["tokens_per_s"] + base_greedy_end["tokens_per_s"]) / 2)
    _add_speedups(rows, baseline["tokens_per_s"])
    timings["total_s"] = time.perf_counter() - t0
    md = render_markdown(rows, baseline, settings)
    atomic_write_json(out / "report.json", {"rows": rows, "baseline": baseline, "settings": settings})
    atomic_write_text(out / "report.md", md)
    return ExperimentReport(rows, baseline, md, settings)


def _slug(method: str) -> str:
    """A directory name for a method label ("offline forward KL (α=0.5, τ=2)" -> "offline-forward-kl-a0.5-t2")."""
    out = method.lower().replace("α=", "a").replace("τ=", "t")
    return "-".join(w for w in "".join(c if c.isalnum() or c == "." else " " for c in out).split())


def _add_speedups(rows: list[dict[str, Any]], base_tps: float) -> None:
    for r in rows:
        if "greedy" in r:
            r["speedup_greedy"] = r["greedy"]["tokens_per_s"] / base_tps if base_tps else 0.0
            r["speedup_top_p"] = r["top_p_0.7"]["tokens_per_s"] / base_tps if base_tps else 0.0


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def render_markdown(rows: list[dict[str, Any]], baseline: dict[str, Any], settings: dict[str, Any]) -> str:
    """The experiment's table: estimated and measured acceptance (%), accepted length, speedup."""
    lines = [
        "| method | steps | est. α greedy | est. α top-p 0.7 | est. acc. rate n=3 (greedy) | est. E[len] n=3 / n=9 "
        "| measured acc. greedy | measured acc. top-p 0.7 | speedup greedy | speedup top-p |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        g, t = r.get("greedy"), r.get("top_p_0.7")
        sg = f"{r['speedup_greedy']:.2f}×" if g else "–"
        st = f"{r['speedup_top_p']:.2f}×" if t else "–"
        lines.append(
            f"| {r['method']} | {r['steps']} | {_pct(r['acceptance_greedy'])} | {_pct(r['acceptance_top_p'])} "
            f"| {_pct(r['acceptance_rate_greedy_n3'])} | {r['accepted_length_greedy_n3']:.2f} / "
            f"{r['accepted_length_greedy_n9']:.2f} | {_pct(g['acceptance_rate']) if g else '–'} "
            f"| {_pct(t['acceptance_rate']) if t else '–'} "
            f"| {sg} | {st} |")
    lines.append("")
    end = baseline.get("end")
    lines.append(f"Autoregressive target baseline: {baseline['tokens_per_s']:.2f} tokens/s (greedy; runs before and "
                 f"after the drafts: {baseline['start']['tokens_per_s']:.2f} and "
                 f"{end['tokens_per_s'] if end else float('nan'):.2f}).")
    online = [r for r in rows if "stream_acceptance_first_half" in r]
    if online:
        o = online[0]
        lines.append(f"Online stream acceptance (greedy, measured while serving): first half "
                     f"{_pct(o['stream_acceptance_first_half'])}%, second half "
                     f"{_pct(o['stream_acceptance_second_half'])}%"
                     f" ({settings.get('online_updates')} updates).")
    lines.append("")
    lines.append("Settings: " + json.dumps({k: v for k, v in settings.items() if k not in ("platform",)},
                                            ensure_ascii=False))
    return "\n".join(lines) + "\n"


@click.command(cls=KeysHelpCommand, set_keys=lambda: [("Experiment keys (--set KEY=VALUE)", ExperimentConfig, "", ())],
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", default="runs/distill-experiment", show_default=True)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML ExperimentConfig (sizes of the run)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override a field, e.g. --set steps=40 --set grid=false (keys below)")
@click.option("--quick", is_flag=True, help="tiny smoke run (few prompts, few steps)")
@click.option("-v", "--verbose", count=True, help="-v info, -vv debug logging")
def main(out_dir: str, config_path: str | None, sets: tuple[str, ...], quick: bool, verbose: int) -> None:
    """The draft-training experiment (benchmark): acceptance and speedup of each method."""
    setup_logging(verbose)
    cfg = build_config(ExperimentConfig, config_path, {"output_dir": out_dir}, sets)
    if quick:
        cfg = cfg.quick()
    click.echo(run_experiment(cfg).markdown)


if __name__ == "__main__":
    main()
