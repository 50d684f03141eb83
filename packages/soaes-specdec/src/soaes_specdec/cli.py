"""`soaes-specdec` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from soaes_core import DEFAULT_MODEL
from soaes_core.cli_options import config_options
from soaes_core.clitools import SoaesGroup, setup_logging

from . import __version__
from .bench import BenchConfig


@click.group(cls=SoaesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes-specdec")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Exact speculative decoding (PyTorch + Triton), baselines, benchmark and vLLM bridge."""
    setup_logging(verbose)


@main.command()
@config_options(BenchConfig, names={"num_speculative_tokens": ("-n", "--num-speculative-tokens")})
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="specdec-bench", show_default=True)
def bench(config: BenchConfig, out_dir: str) -> None:
    """Benchmark plain, prompt-lookup and speculative decoding against the transformers peers."""
    from .bench import run_benchmark

    report = run_benchmark(config, out_dir)
    click.echo((Path(out_dir) / "bench.md").read_text(encoding="utf-8"))
    click.echo(f"wrote {out_dir}/bench.json, bench.md, bench.png ({report['wall_time_s']:.0f} s)")


@main.command()
@click.argument("prompt")
@click.option("--target", default=DEFAULT_MODEL, show_default=True, help="Target model spec.")
@click.option("--draft", help="Draft model spec, a layer draft or a feature-draft directory (default: derived from "
                              "the target's first --draft-layers layers).")
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

    from soaes_core import encode_chat_prompt, load_model, load_tokenizer

    from .decoding import PromptLookupDecoder, SpeculativeDecoder, autoregressive_generate, cap_block_width
    from .draft import load_any_draft, make_layer_draft

    tokenizer = load_tokenizer(target)
    model = load_model(target, dtype=torch.float32)
    if chat:
        ids = encode_chat_prompt(tokenizer, prompt)
    else:
        ids = tokenizer(prompt)["input_ids"]
    if method == "speculative":
        draft_model = (load_any_draft(draft, dtype=torch.float32, target=target, target_tokenizer=tokenizer)
                       if draft else make_layer_draft(model, draft_layers))
        decoder: Any = SpeculativeDecoder(model, draft_model, num_speculative_tokens)
    elif method == "prompt_lookup":
        decoder = PromptLookupDecoder(model, num_speculative_tokens)
    else:
        decoder = None
    usable = cap_block_width(num_speculative_tokens, max_new_tokens - 1)  # the prompt pass gives the first token
    if decoder is not None and max_new_tokens > 1 and usable < num_speculative_tokens:
        click.echo(f"note: -n {num_speculative_tokens} capped to {usable}: --max-new-tokens {max_new_tokens} leaves "
                   f"{usable} after the prompt pass's token, and a block proposes no more than are left", err=True)
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


@main.command("export-vllm")
@click.argument("draft_dir", type=click.Path())
@click.option("--target", required=True, help="The target's HF model directory (what vLLM serves).")
@click.option("-n", "--num-speculative-tokens", type=int, default=3, show_default=True)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="serve", show_default=True)
def export_vllm(draft_dir: str, target: str, num_speculative_tokens: int, out_dir: str) -> None:
    """Export DRAFT_DIR for vLLM (full-head HF directory + the target's tokenizer) and write the `vllm serve`
    command (OUT/vllm_serve.sh, OUT/README.md)."""
    from .export import export_for_vllm

    result = export_for_vllm(draft_dir, out_dir, target, num_speculative_tokens)
    click.echo(result.serve_command() or result.note)
    click.echo(f"wrote {out_dir}: {', '.join(result.files)}", err=True)


EXPORT_FORMATS = ("vllm", "vllm-eagle", "sglang-eagle", "gguf")


@main.command("export")
@click.argument("draft_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="vllm: a layer draft for vLLM's draft_model method; vllm-eagle / sglang-eagle: an engine-layout "
                   "feature draft as the engine's EAGLE-1 draft folder; gguf: for llama.cpp.")
@click.option("--target", help="The target's HF model directory, served with the draft (all formats but gguf).")
@click.option("-n", "--num-speculative-tokens", type=int, default=3, show_default=True)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default="serve", show_default=True)
@click.option("--outtype", default="f32", show_default=True, help="gguf: tensor type of the converted model.")
@click.option("--allow-other-target", is_flag=True,
              help="Export a feature draft for a target other than the one it was trained for.")
def export(draft_dir: str, fmt: str, target: str | None, num_speculative_tokens: int, out_dir: str, outtype: str,
           allow_other_target: bool) -> None:
    """Export DRAFT_DIR in --format for serving, with the exact serve command (OUT/README.md)."""
    from soaes_core.errors import InvalidArgumentError

    if fmt == "gguf":
        from .gguf_export import export_gguf

        click.echo(f"wrote {export_gguf(draft_dir, out_dir, outtype=outtype)}")
        return
    if not target:
        raise InvalidArgumentError(f"--target is required for --format {fmt} (the model served with the draft)")
    if fmt == "vllm":
        from .export import export_for_vllm

        result = export_for_vllm(draft_dir, out_dir, target, num_speculative_tokens)
        click.echo(result.serve_command() or result.note)
        click.echo(f"wrote {out_dir}: {', '.join(result.files)}", err=True)
        return
    from .eagle_export import export_eagle

    res = export_eagle(draft_dir, out_dir, target, fmt, num_speculative_tokens, allow_other_target=allow_other_target)
    click.echo(res.serve_command())
    click.echo(f"wrote {out_dir}: {', '.join(res.files)}", err=True)
