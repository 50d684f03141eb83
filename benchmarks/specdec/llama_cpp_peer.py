"""llama.cpp as the CPU peer (issue 24): its plain greedy decoding against ours, plain and speculative, in one run on
the same prompts and the same F32 weights, with the host named and greedy token equality checked.

The target (an HF directory or a soaes model spec such as embedded:smollm2-135m) is converted to an F32 GGUF by
llama.cpp's own convert_hf_to_gguf.py (taken from the llama-cpp-python sdist or a llama.cpp checkout, run offline)
or by soaes' `export_gguf` (`--converter soaes`; `--check-converters` converts with both and compares every
tensor). Then, interleaved over `--repeats` passes, each timed the same way (wall time of a whole generation,
prefill included, exactly `--max-new-tokens` new tokens per prompt, EOS ignored): llama.cpp plain greedy through
llama-cpp-python (its own sampler chain: greedy), our plain float32 decoding on each projection path
(`CachedCausalLM`, `linear` stream and module), optionally the compiled decode step (`--compile`), our plain bfloat16
decoding (other weights: bf16-rounded), and our speculative configurations (prompt lookup; with `--draft`, the draft
with and without prompt lookup beside it). llama-cpp-python is an optional peer (pip install llama-cpp-python, which
builds from source), never a test dependency.

    python benchmarks/specdec/llama_cpp_peer.py --target embedded:smollm2-135m \
        --llama-cpp-src llama_cpp_python-0.3.36.tar.gz --threads 2 --repeats 3 --compile --out runs/llama-cpp-peer
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from soaes_core import atomic_write_json, atomic_write_text, load_model, load_tokenizer
from soaes_core.errors import SoaesError
from soaes_core.models import resolve_model_dir
from soaes_specdec import PromptLookupDecoder, SpeculativeDecoder, autoregressive_generate, load_any_draft
from soaes_specdec.bench import load_prompts
from soaes_specdec.gguf_export import export_gguf
from soaes_specdec.hostinfo import format_host, host_info
from soaes_specdec.runner import CachedCausalLM

CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
"""What llama.cpp's converter needs from its source tree (the script, its model classes, its own gguf package)."""


class BenchError(Exception):
    """Bad input or a missing tool: reported as one `error:` line."""


def converter_script(src: Path, work: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from `src`: a llama.cpp source directory, a llama-cpp-python source
    directory (vendor/llama.cpp), or the llama-cpp-python sdist (.tar.gz, the needed files extracted into `work`)."""
    if src.is_dir():
        for root in (src, src / "vendor" / "llama.cpp"):
            if (root / "convert_hf_to_gguf.py").is_file():
                return root / "convert_hf_to_gguf.py"
        raise BenchError(f"{src}: no convert_hf_to_gguf.py (nor vendor/llama.cpp/convert_hf_to_gguf.py) in it")
    if not src.is_file():
        raise BenchError(f"{src}: no such file or directory (--llama-cpp-src)")
    try:
        with tarfile.open(src) as tar:
            members = []
            for m in tar.getmembers():
                _, sep, rel = m.name.partition("/vendor/llama.cpp/")
                if sep and any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in CONVERTER_PARTS):
                    members.append(m)
            if not any(m.name.endswith("/vendor/llama.cpp/convert_hf_to_gguf.py") for m in members):
                raise BenchError(f"{src}: no vendor/llama.cpp/convert_hf_to_gguf.py in this archive "
                                 "(expected the llama-cpp-python sdist)")
            tar.extractall(work, members=members, filter="data")
    except (tarfile.TarError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"{src}: not a readable source archive (expected the llama-cpp-python sdist .tar.gz): "
                         f"{first}") from None
    return next(work.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))


def convert_llama_cpp(script: Path, model_dir: Path, out: Path) -> Path:
    """Run llama.cpp's converter (this Python, offline) on `model_dir`, writing an F32 GGUF at `out`."""
    tmp = out.with_name(out.name + ".tmp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(model_dir), "--outtype", "f32", "--outfile", str(tmp)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise BenchError(f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir}: {tail[0]}")
    tmp.replace(out)
    return out


def compare_gguf_tensors(a: Path, b: Path) -> dict[str, Any]:
    """Whether two GGUF files hold the same tensors (names, types, shapes, values)."""
    import gguf

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    differing = sorted(set(ta) ^ set(tb))
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or not np.array_equal(np.asarray(x.data), np.asarray(y.data)):
            differing.append(name)
    return {"files": [str(a), str(b)], "tensors": len(ta), "same": not differing, "differing": differing[:20]}


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """'name:key=value,...' -> (name, keyword arguments); values parsed as YAML scalars."""
    name, _, spec = text.partition(":")
    try:
        kwargs = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in spec.split(",") if item)}
    except ValueError:
        raise BenchError(f"--spec {text!r}: expected name:key=value,...") from None
    return name, kwargs


def llama_cpp_generate(llm: Any, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation of `prompt`: exactly `n` tokens, from an empty context."""
    llm.reset()
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def our_margin(model: Any, prompt: list[int], ours: list[int], at: int, other: int) -> float:
    """Our fp32 logit margin between our token and llama.cpp's at new-token index `at`."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours[:at]])).logits[0, -1].float()
    return float(logits[ours[at]] - logits[other])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="embedded:smollm2-135m", help="HF model directory or soaes model spec")
    ap.add_argument("--draft", default=None, help="draft for the speculative rows (layer or feature draft dir)")
    ap.add_argument("--prompts", default=None, help="prompt JSONL (default: the packaged bench prompts)")
    ap.add_argument("--max-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and for llama.cpp")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed passes (median reported)")
    ap.add_argument("--converter", choices=["llama.cpp", "soaes"], default="llama.cpp")
    ap.add_argument("--llama-cpp-src", default=None,
                    help="llama-cpp-python sdist (.tar.gz) or a llama.cpp source dir holding convert_hf_to_gguf.py")
    ap.add_argument("--gguf", default=None, help="an existing F32 GGUF of the target (skips the conversion)")
    ap.add_argument("--check-converters", action="store_true",
                    help="convert with both converters and compare every tensor")
    ap.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared with llama.cpp per prompt")
    ap.add_argument("--compile", action="store_true", help="add our compiled decode step (torch.compile, inductor)")
    ap.add_argument("--no-bf16", action="store_true", help="skip our plain bfloat16 row")
    ap.add_argument("--spec", action="append", default=None,
                    help="name:key=value,... a speculative row (method=lookup: PromptLookupDecoder with n, max_ngram; "
                         "else SpeculativeDecoder keywords, n = fixed block size; compiled=true: the target's "
                         "one-token passes compiled); repeatable")
    ap.add_argument("--label", default="", help="a note on the run conditions, e.g. 'contended' or 'idle'")
    ap.add_argument("--out", required=True, help="output directory (peer.json, peer.md, the GGUF)")
    args = ap.parse_args()
    try:
        run(args)
    except (BenchError, SoaesError) as err:
        ap.exit(2, f"error: {err}\n")


def run(args: argparse.Namespace) -> None:
    try:
        import llama_cpp
    except ImportError as err:
        raise BenchError(f"llama-cpp-python is not importable ({err}); pip install llama-cpp-python (it builds "
                         "llama.cpp from source)") from None
    if args.max_new_tokens < 1 or args.repeats < 1 or args.threads < 1 or args.check_tokens < 0:
        raise BenchError("--max-new-tokens, --repeats and --threads must be >= 1, --check-tokens >= 0")
    torch.set_num_threads(args.threads)
    model_dir = Path(resolve_model_dir(args.target))
    if args.gguf and not Path(args.gguf).is_file():
        raise BenchError(f"{args.gguf}: no such file (--gguf)")
    if args.llama_cpp_src and not Path(args.llama_cpp_src).exists():
        raise BenchError(f"{args.llama_cpp_src}: no such file or directory (--llama-cpp-src)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # the F32 GGUF: llama.cpp's converter (default) or ours
    converters: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as work:
        want = {args.converter} | ({"llama.cpp", "soaes"} if args.check_converters else set())
        if args.gguf and not args.check_converters:
            converters[args.converter] = Path(args.gguf)
            want = set()
        if "llama.cpp" in want:
            if not args.llama_cpp_src:
                raise BenchError("--llama-cpp-src is needed to convert with llama.cpp's converter (the "
                                 "llama-cpp-python sdist .tar.gz or a llama.cpp checkout), or pass --gguf")
            script = converter_script(Path(args.llama_cpp_src), Path(work))
            converters["llama.cpp"] = convert_llama_cpp(script, model_dir, out / "target-f32-llama-cpp.gguf")
        if "soaes" in want:
            converters["soaes"] = export_gguf(model_dir, out / "soaes-export")
    gguf_path = converters[args.converter]
    weights_check = (compare_gguf_tensors(converters["llama.cpp"], converters["soaes"])
                     if args.check_converters else None)

    tok = load_tokenizer(args.target)
    prompts = [p.tolist() for p in load_prompts(args.prompts, tok, args.max_prompts)]
    n_new = args.max_new_tokens
    target = load_model(model_dir, dtype=torch.float32, device="cpu")
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=max(map(len, prompts)) + n_new + 8, n_batch=512,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

    def ours(gen: Any) -> Any:
        return lambda p: gen(torch.tensor([p]), max_new_tokens=n_new).sequences[0, len(p):].tolist()

    rows: dict[str, dict[str, Any]] = {"llama.cpp plain (F32 GGUF)": {"kind": "llama.cpp"}}
    jobs: dict[str, Any] = {"llama.cpp plain (F32 GGUF)": lambda p: llama_cpp_generate(llm, p, n_new)}
    for linear in ("stream", "module"):
        runner = CachedCausalLM(target, linear=linear)
        name = f"ours plain fp32 ({linear})"
        jobs[name] = ours(lambda ids, runner=runner, **kw: autoregressive_generate(runner, ids, **kw))
        rows[name] = {"kind": "plain_fp32", "linear": linear}
        if args.compile:
            from soaes_specdec.compiled_step import CompiledCachedCausalLM

            compiled = CompiledCachedCausalLM(target, linear=linear)
            name = f"ours plain fp32 compiled ({linear})"
            jobs[name] = ours(lambda ids, runner=compiled, **kw: autoregressive_generate(runner, ids, **kw))
            rows[name] = {"kind": "plain_fp32", "linear": linear, "compiled": "inductor"}
    if not args.no_bf16:
        bf16 = CachedCausalLM(load_model(model_dir, dtype=torch.bfloat16, device="cpu"))
        jobs["ours plain bf16"] = ours(lambda ids, **kw: autoregressive_generate(bf16, ids, **kw))
        rows["ours plain bf16"] = {"kind": "plain_bf16", "note": "bf16-rounded weights, not the same weights"}
    draft = load_any_draft(args.draft, dtype=torch.float32, device="cpu") if args.draft else None
    specs = args.spec or (["prompt lookup n=3:method=lookup,n=3"]
                          + (["draft:", "draft + lookup:lookup_tokens=3"] if draft is not None else []))
    for text in specs:
        name, kwargs = parse_spec(text)
        if kwargs.pop("compiled", False):  # the target's one-token passes through the compiled step
            from soaes_specdec.compiled_step import CompiledCachedCausalLM

            runner: CachedCausalLM = CompiledCachedCausalLM(target)
        else:
            runner = CachedCausalLM(target)
        if kwargs.pop("method", None) == "lookup":
            dec: Any = PromptLookupDecoder(runner, **{"num_speculative_tokens": kwargs.pop("n", 3), **kwargs})
        else:
            if draft is None:
                raise BenchError(f"--spec {text!r} needs --draft (or method=lookup)")
            n = kwargs.pop("n", None)
            dec = SpeculativeDecoder(runner, draft, None if n is None else int(n), **kwargs)
        jobs[f"ours speculative: {name}"] = ours(dec.generate)
        rows[f"ours speculative: {name}"] = {"kind": "speculative", "settings": text}

    warm_s = {}
    for name, job in jobs.items():  # warm-up (and compilation), not timed
        t0 = time.perf_counter()
        job(prompts[0])
        warm_s[name] = time.perf_counter() - t0
    load_before = os.getloadavg()
    passes: dict[str, list[float]] = {name: [] for name in jobs}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            outs = [job(p) for p in prompts]
            passes[name].append(len(prompts) * n_new / (time.perf_counter() - t0))
            tokens[name] = outs
    load_after = os.getloadavg()
    llm.close()

    peer = statistics.median(passes["llama.cpp plain (F32 GGUF)"])
    plain_ref = tokens["ours plain fp32 (stream)"]
    for name, row in rows.items():
        row.update(tokens_per_s=statistics.median(passes[name]), passes=passes[name], warmup_s=warm_s[name],
                   ratio_to_llama_cpp=statistics.median(passes[name]) / peer,
                   greedy_equals_ours_plain=sum(a == b for a, b in zip(tokens[name], plain_ref, strict=True)))
    k = min(args.check_tokens, n_new)
    equality = []
    for p, ours_t, theirs in zip(prompts, plain_ref, tokens["llama.cpp plain (F32 GGUF)"], strict=True):
        first = next((i for i in range(k) if ours_t[i] != theirs[i]), k)
        item: dict[str, Any] = {"prompt_tokens": len(p), "equal_prefix": first, "checked": k}
        if first < k:
            item.update(ours=ours_t[first], llama_cpp=theirs[first],
                        our_logit_margin=our_margin(target, p, ours_t, first, theirs[first]))
        equality.append(item)
    best = {kind: max((n for n, r in rows.items() if r["kind"] == kind), key=lambda n: rows[n]["tokens_per_s"],
                      default=None) for kind in ("plain_fp32", "speculative")}
    host = host_info()
    report = {"label": args.label, "host": host, "host_line": format_host(host),
              "llama_cpp": {"version": llama_cpp.__version__,
                            "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()},
              "target": args.target, "model_dir": str(model_dir), "draft": args.draft,
              "gguf": str(gguf_path), "converter": args.converter, "converter_check": weights_check,
              "prompts": args.prompts or "packaged bench prompts", "num_prompts": len(prompts),
              "max_new_tokens": n_new, "threads": args.threads, "repeats": args.repeats,
              "loadavg_before": load_before, "loadavg_after": load_after,
              "rows": rows, "best": best, "greedy_vs_llama_cpp": equality}
    atomic_write_json(out / "peer.json", report)
    atomic_write_text(out / "peer.md", render(report))
    print(render(report))


def render(report: dict[str, Any]) -> str:
    """The report as markdown: host, settings, one row per method with its ratio to llama.cpp, token equality."""
    label = f" ({report['label']})" if report["label"] else ""
    lines = [f"### llama.cpp peer{label}", "",
             f"Host: {report['host_line']}; llama-cpp-python {report['llama_cpp']['version']} "
             f"({report['llama_cpp']['system_info']}).",
             f"Target {report['target']}, F32 GGUF by {report['converter']}'s converter; {report['num_prompts']} "
             f"prompts x {report['max_new_tokens']} new tokens, greedy, {report['threads']} threads, median of "
             f"{report['repeats']} interleaved passes; load average {report['loadavg_before'][0]:.1f} before, "
             f"{report['loadavg_after'][0]:.1f} after.", ""]
    if report["converter_check"] is not None:
        check = report["converter_check"]
        lines += [f"Converters: llama.cpp's and soaes' F32 GGUFs hold the same {check['tensors']} tensors: "
                  f"{'yes' if check['same'] else 'no, differing: ' + ', '.join(check['differing'])}.", ""]
    lines += ["| method | tokens/s | × llama.cpp | greedy = ours plain (prompts) |", "| --- | ---: | ---: | ---: |"]
    n = report["num_prompts"]
    for name, row in report["rows"].items():
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {row['ratio_to_llama_cpp']:.2f} | "
                     f"{row['greedy_equals_ours_plain']}/{n} |")
    eq = report["greedy_vs_llama_cpp"]
    full = sum(e["equal_prefix"] == e["checked"] for e in eq)
    lines += ["", f"Greedy tokens, ours (plain fp32) vs llama.cpp, first {eq[0]['checked'] if eq else 0} per prompt: "
              f"{full}/{len(eq)} prompts equal throughout."]
    for i, e in enumerate(eq):
        if e["equal_prefix"] < e["checked"]:
            lines.append(f"- prompt {i}: first difference at new token {e['equal_prefix']} (ours {e['ours']}, "
                         f"llama.cpp {e['llama_cpp']}; our logit margin {e['our_logit_margin']:.3g})")
    best = report["best"]
    rows = report["rows"]
    lines += ["", "Best: " + "; ".join(f"{kind} = {name} ({rows[name]['ratio_to_llama_cpp']:.2f}× llama.cpp)"
                                      for kind, name in best.items() if name)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
