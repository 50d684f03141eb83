"""`soaes-specdec` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from soaes_core import DEFAULT_MODEL
from soaes_core.clitools import SoaesGroup, setup_logging

from . import __version__


@click.group(cls=SoaesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes-specdec")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Exact speculative decoding (PyTorch + Triton), baselines, benchmark and vLLM bridge."""
    setup_logging(verbose)


def _split_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML BenchConfig.")
@click.option("--target", help=f"Target model spec (default {DEFAULT_MODEL}).")
@click.option("--draft", help="Draft model spec (default: the target's first --draft-layers layers).")
@click.option("--draft-layers", type=int, help="Layers kept when deriving the draft (default 4).")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), help="JSONL: messages or prompt per line.")
@click.option("--max-prompts", type=int, help="Use only the first N prompts.")
@click.option("-n", "--num-speculative-tokens", help="Comma-separated block sizes, e.g. 1,3,5 (default 3).")
@click.option("--modes", help="Comma-separated: greedy,top_p (default both).")
@click.option("--methods", help="Comma-separated subset of plain,prompt_lookup,speculative,hf_assisted,"
                                "hf_prompt_lookup (default all).")
@click.option("--top-p", type=float, help="Top-p for the sampling mode (default 0.7, as in the paper).")
@click.option("--temperature", type=float, help="Temperature for the sampling mode (default 1.0).")
@click.option("--max-new-tokens", type=int, help="Tokens per prompt (default 128).")
@click.option("--draft-confidence", type=float,
              help="Dynamic draft length: end a block when the draft's top probability is below this (default off).")
@click.option("--dtype", help="Target and draft dtype: float32 (default), bfloat16, float16.")
@click.option("--reference-dtype", help="Also time plain decoding of the target in this dtype (e.g. float32), "
                                        "interleaved, for a speedup against the fastest baseline.")
@click.option("--warmup", type=int, help="Warm-up passes over the prompts (default 1).")
@click.option("--repeats", type=int, help="Timed passes; the median is reported (default 3).")
@click.option("--threads", type=int, help="torch CPU threads (default: torch's choice).")
@click.option("--seed", type=int)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="specdec-bench", show_default=True)
def bench(config_path: str | None, out_dir: str, **options: Any) -> None:
    """Benchmark plain, prompt-lookup and speculative decoding against the transformers peers."""
    from soaes_core.config import from_dict, load_config

    from .bench import BenchConfig, run_benchmark

    overrides = {k: v for k, v in options.items() if v is not None}
    for key in ("num_speculative_tokens",):
        if key in overrides:
            overrides[key] = _split_ints(overrides[key])
    for key in ("modes", "methods"):
        if key in overrides:
            overrides[key] = [x.strip() for x in overrides[key].split(",") if x.strip()]
    config = (load_config(config_path, BenchConfig, overrides=overrides) if config_path
              else from_dict(BenchConfig, overrides, source="command line"))
    report = run_benchmark(config, out_dir)
    click.echo((Path(out_dir) / "bench.md").read_text(encoding="utf-8"))
    click.echo(f"wrote {out_dir}/bench.json, bench.md, bench.png ({report['wall_time_s']:.0f} s)")


@main.command()
@click.argument("prompt")
@click.option("--target", default=DEFAULT_MODEL, show_default=True, help="Target model spec.")
@click.option("--draft", help="Draft model spec (default: derived from the target's first --draft-layers layers).")
@click.option("--draft-layers", type=int, default=4, show_default=True)
@click.option("--method", type=click.Choice(["speculative", "prompt_lookup", "plain"]), default="speculative",
              show_default=True)
@click.option("-n", "--num-speculative-tokens", type=int, default=3, show_default=True)
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--sample/--greedy", default=False, show_default=True, help="Sample (top-p/temperature) or argmax.")
@click.option("--top-p", type=float, default=0.7, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap PROMPT in the chat template.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stats/--no-stats", default=True, show_default=True, help="Print SpecStats as JSON at the end.")
def generate(prompt: str, target: str, draft: str | None, draft_layers: int, method: str, num_speculative_tokens: int,
             max_new_tokens: int, sample: bool, top_p: float, temperature: float, chat: bool, seed: int,
             stats: bool) -> None:
    """Generate a reply to PROMPT, streaming tokens to the terminal as they are accepted."""
    import torch

    from soaes_core import load_model, load_tokenizer

    from .decoding import PromptLookupDecoder, SpeculativeDecoder, autoregressive_generate
    from .draft import make_layer_draft

    tokenizer = load_tokenizer(target)
    model = load_model(target, dtype=torch.float32)
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer(prompt)["input_ids"]
    if method == "speculative":
        draft_model = load_model(draft, dtype=torch.float32) if draft else make_layer_draft(model, draft_layers)
        decoder: Any = SpeculativeDecoder(model, draft_model, num_speculative_tokens)
    elif method == "prompt_lookup":
        decoder = PromptLookupDecoder(model, num_speculative_tokens)
    else:
        decoder = None
    streamed: list[int] = []
    shown = 0

    def echo_new(tokens: list[list[int]]) -> None:
        nonlocal shown
        streamed.extend(tokens[0])
        text = tokenizer.decode(streamed, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            click.echo(text[shown:], nl=False)
            shown = len(text)

    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": sample, "top_p": top_p, "temperature": temperature,
              "eos_token_id": tokenizer.eos_token_id, "generator": torch.Generator().manual_seed(seed),
              "streamer": echo_new}
    if decoder is None:
        output = autoregressive_generate(model, torch.tensor(ids), **kwargs)
    else:
        output = decoder.generate(torch.tensor(ids), **kwargs)
    click.echo()
    if stats:
        click.echo(json.dumps(output.stats.to_dict(), indent=2), err=True)


@main.command("vllm-bench")
@click.option("--target", required=True, help="Target model (HF dir or hub id vLLM can load).")
@click.option("--draft", help="Draft model; omit for vLLM's n-gram prompt lookup.")
@click.option("-n", "--num-speculative-tokens", type=int, default=3, show_default=True)
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), help="JSONL (default: packaged prompts).")
@click.option("--sample/--greedy", default=False, show_default=True)
@click.option("--top-p", type=float, default=0.7, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("-o", "--out", "out_file", type=click.Path(dir_okay=False), default="vllm_bench.json", show_default=True)
def vllm_bench(target: str, draft: str | None, num_speculative_tokens: int, prompts: str | None, sample: bool,
               top_p: float, temperature: float, max_new_tokens: int, repeats: int, out_file: str) -> None:
    """Plain vs speculative decoding through vLLM (needs vLLM and a CUDA GPU; run it in vLLM's environment)."""
    from soaes_core import load_tokenizer
    from soaes_core.atomic import atomic_write_json
    from soaes_core.errors import SoaesError

    from .bench import load_prompts
    from .vllm_bridge import VllmSpecSettings, run_vllm_benchmark, vllm_unavailable_reason

    settings = VllmSpecSettings(target, draft, num_speculative_tokens, do_sample=sample, top_p=top_p,
                                temperature=temperature, max_new_tokens=max_new_tokens)
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise SoaesError(reason)
    tokenizer = load_tokenizer(target)
    texts = [tokenizer.decode(ids) for ids in load_prompts(prompts, tokenizer)]
    result = run_vllm_benchmark(settings, texts, repeats=repeats)
    atomic_write_json(out_file, result)
    click.echo(json.dumps(result, indent=2))
