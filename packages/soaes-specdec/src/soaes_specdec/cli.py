"""`soaes-specdec` command line (thin: parses options, calls the library, prints results)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from soaes_core.cli_options import config_options
from soaes_core.clitools import SoaesGroup, setup_logging

from . import __version__
from . import bench as _bench
from .calibrate_cmd import calibrate
from .commands import ExportConfig, GenerateConfig, VllmBenchConfig


@click.group(cls=SoaesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="soaes-specdec")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Exact speculative decoding (PyTorch + Triton), baselines, benchmark and vLLM bridge."""
    setup_logging(verbose)


@dataclass
class BenchJob(_bench.BenchConfig):
    """`soaes-specdec bench`: the benchmark's settings (inherited, so a field added there is an option here) plus
    where the report goes."""

    out: str = field(default="specdec-bench", metadata={"help": "Folder for bench.json, bench.md and bench.png."})


@main.command()
@config_options(BenchJob, names={"num_speculative_tokens": ("-n", "--num-speculative-tokens"), "out": ("-o", "--out")})
def bench(config: BenchJob) -> None:
    """Benchmark plain, prompt-lookup and speculative decoding against the transformers peers."""
    out_dir = config.out
    report = _bench.run_benchmark(config, out_dir)
    click.echo((Path(out_dir) / "bench.md").read_text(encoding="utf-8"))
    click.echo(f"wrote {out_dir}/bench.json, bench.md, bench.png ({report['wall_time_s']:.0f} s)")


@main.command()
@click.argument("prompt")
@config_options(GenerateConfig, names={"num_speculative_tokens": ("-n", "--num-speculative-tokens"),
                                       "do_sample": ("--sample/--greedy",), "chat": ("--chat/--raw",),
                                       "stats": ("--stats/--no-stats",)})
def generate(prompt: str, config: GenerateConfig) -> None:
    """Generate a reply to PROMPT, streaming tokens to the terminal as they are accepted."""
    import torch

    from soaes_core import encode_chat_prompt, load_model, load_tokenizer

    from .decoding import PromptLookupDecoder, SpeculativeDecoder, autoregressive_generate, cap_block_width
    from .draft import load_any_draft, make_layer_draft

    c = config
    tokenizer = load_tokenizer(c.target)
    model = load_model(c.target, dtype=torch.float32)
    ids = encode_chat_prompt(tokenizer, prompt) if c.chat else tokenizer(prompt)["input_ids"]
    n = c.num_speculative_tokens
    if c.method == "speculative":
        draft_model = (load_any_draft(c.draft, dtype=torch.float32, target=c.target, target_tokenizer=tokenizer)
                       if c.draft else make_layer_draft(model, c.draft_layers))
        decoder: Any = SpeculativeDecoder(model, draft_model, settings=c.decoding_settings())
    elif c.method == "prompt_lookup":
        n = n or c.max_speculative_tokens
        decoder = PromptLookupDecoder(model, n, c.lookup_max_ngram)
    else:
        decoder = None
    usable = cap_block_width(n or 0, c.max_new_tokens - 1)  # the prompt pass gives the first token
    if decoder is not None and n and c.max_new_tokens > 1 and usable < n:
        click.echo(f"note: -n {n} capped to {usable}: --max-new-tokens {c.max_new_tokens} leaves "
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

    kwargs = {"max_new_tokens": c.max_new_tokens, "do_sample": c.do_sample, "top_p": c.top_p,
              "temperature": c.temperature, "eos_token_id": tokenizer.eos_token_id,
              "generator": torch.Generator().manual_seed(c.seed), "streamer": echo_new}
    if decoder is None:
        output = autoregressive_generate(model, torch.tensor(ids), **kwargs)
    else:
        output = decoder.generate(torch.tensor(ids), **kwargs)
    click.echo()
    if c.stats:
        click.echo(json.dumps(output.stats.to_dict(), indent=2), err=True)


@main.command("vllm-bench")
@config_options(VllmBenchConfig, names={"num_speculative_tokens": ("-n", "--num-speculative-tokens"),
                                        "do_sample": ("--sample/--greedy",), "out": ("-o", "--out")})
def vllm_bench(config: VllmBenchConfig) -> None:
    """Plain vs speculative decoding through vLLM (needs vLLM and a CUDA GPU; run it in vLLM's environment)."""
    from soaes_core import load_tokenizer
    from soaes_core.atomic import atomic_write_json
    from soaes_core.errors import SoaesError

    from .bench import load_prompts
    from .vllm_bridge import VllmSpecSettings, run_vllm_benchmark, vllm_unavailable_reason

    c = config
    settings = VllmSpecSettings(c.target, c.draft, c.num_speculative_tokens, do_sample=c.do_sample, top_p=c.top_p,
                                temperature=c.temperature, max_new_tokens=c.max_new_tokens)
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise SoaesError(reason)
    tokenizer = load_tokenizer(c.target)
    texts = [tokenizer.decode(ids) for ids in load_prompts(c.prompts, tokenizer)]
    result = run_vllm_benchmark(settings, texts, repeats=c.repeats)
    atomic_write_json(c.out, result)
    click.echo(json.dumps(result, indent=2))


@main.command("export-vllm")
@click.argument("draft_dir", type=click.Path())
@config_options(ExportConfig, names={"num_speculative_tokens": ("-n", "--num-speculative-tokens"),
                                     "out": ("-o", "--out")}, exclude=("format", "outtype", "allow_other_target"))
def export_vllm(draft_dir: str, config: ExportConfig) -> None:
    """Export DRAFT_DIR for vLLM (full-head HF directory + the target's tokenizer) and write the `vllm serve`
    command (OUT/vllm_serve.sh, OUT/README.md); the same as `export --format vllm`."""
    from soaes_core.errors import InvalidArgumentError

    from .export import export_for_vllm

    if not config.target:
        raise InvalidArgumentError("--target is required (the model served with the draft)")
    result = export_for_vllm(draft_dir, config.out, config.target, config.num_speculative_tokens)
    click.echo(result.serve_command() or result.note)
    click.echo(f"wrote {config.out}: {', '.join(result.files)}", err=True)


@main.command("export")
@click.argument("draft_dir", type=click.Path())
@config_options(ExportConfig, names={"num_speculative_tokens": ("-n", "--num-speculative-tokens"),
                                     "out": ("-o", "--out")})
def export(draft_dir: str, config: ExportConfig) -> None:
    """Export DRAFT_DIR in --format for serving, with the exact serve command (OUT/README.md)."""
    from soaes_core.errors import InvalidArgumentError

    c = config
    if c.format is None:
        raise InvalidArgumentError("--format is required: one of vllm, vllm-eagle, sglang-eagle, gguf")
    if c.format == "gguf":
        from .gguf_export import export_gguf

        click.echo(f"wrote {export_gguf(draft_dir, c.out, outtype=c.outtype)}")
        return
    if not c.target:
        raise InvalidArgumentError(f"--target is required for --format {c.format} (the model served with the draft)")
    if c.format == "vllm":
        from .export import export_for_vllm

        result = export_for_vllm(draft_dir, c.out, c.target, c.num_speculative_tokens)
        click.echo(result.serve_command() or result.note)
        click.echo(f"wrote {c.out}: {', '.join(result.files)}", err=True)
        return
    from .eagle_export import export_eagle

    res = export_eagle(draft_dir, c.out, c.target, c.format, c.num_speculative_tokens,
                       allow_other_target=c.allow_other_target)
    click.echo(res.serve_command())
    click.echo(f"wrote {c.out}: {', '.join(res.files)}", err=True)


main.add_command(calibrate)
