"""Load benchmark of `soaes serve` on loopback: 32 concurrent streaming chat clients x 8 requests each against a
batching server (`--max-batch 32`) and a one-request-at-a-time server (`--max-batch 1`), both started here as
`soaes serve` subprocesses on 127.0.0.1 and driven in alternating waves (ABBA order) so that the load of a shared
machine falls on both alike. Records every request's latency, time to first token and tokens, checks that none was
lost or failed and that both servers gave the same greedy text for each request, and writes a JSON report.

    .venv/bin/python benchmarks/serve/load_bench.py --draft runs/serve-bench/draft-train/draft \
        --out runs/serve-bench/load_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "packages/soaes-distill/src/soaes_distill/data/heldout_domain_prompts.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "soaes.cli", "serve", "--target", args.target, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", str(args.clients * 2), "--max-context", "512",
           "-n", str(args.num_speculative_tokens), "--served-model-name", "bench"]
    if args.draft:
        cmd += ["--draft", args.draft]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server (max-batch {max_batch}) exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server (max-batch {max_batch}) did not come up in 300 s")


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []
    usage = None
    try:
        stream = await client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
    except Exception as err:  # counted as a failure, never dropped
        return {"ok": False, "error": f"{type(err).__name__}: {err}", "latency_s": time.perf_counter() - t0}
    return {"ok": usage is not None, "latency_s": time.perf_counter() - t0, "ttft_s": first, "tokens": usage or 0,
            "text": "".join(parts)}


async def wave(base: str, prompts: list[str], clients: int, max_tokens: int, timeout_s: float
               ) -> tuple[float, list[dict[str, Any]]]:
    """`clients` concurrent requests (client i asks prompt i mod len(prompts)); returns (wall seconds, results)."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=timeout_s,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)))
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_request(client, prompts[i % len(prompts)], max_tokens)
                                     for i in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    for i, r in enumerate(results):
        r["client"] = i
    return wall, list(results)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summary(walls: list[float], results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results if r["ok"]]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "ok": len(ok), "failed": len(results) - len(ok), "tokens": tokens,
            "wall_s": round(sum(walls), 2), "tokens_per_s": round(tokens / sum(walls), 2),
            "latency_p50_s": round(percentile(lat, 50), 3), "latency_p99_s": round(percentile(lat, 99), 3),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p99_s": round(percentile(ttft, 99), 3),
            "latency_mean_s": round(statistics.mean(lat), 3)}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def metric(base: str, name: str) -> float | None:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(f"soaes_serve_{name} "):
            return float(line.split()[1])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="embedded:smollm2-135m")
    ap.add_argument("--draft", default=None)
    ap.add_argument("-n", "--num-speculative-tokens", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=8, help="requests per client (waves of the batching server)")
    ap.add_argument("--baseline-waves", type=int, default=2,
                    help="waves of the one-at-a-time server, interleaved with the first ones (its throughput does not "
                         "depend on how many; each takes clients x the time of one request)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32, help="--max-batch of the batching server")
    ap.add_argument("--timeout-s", type=float, default=600, help="per-request client timeout")
    ap.add_argument("--out", default="runs/serve-bench/load_bench.json")
    args = ap.parse_args()
    prompts = [json.loads(line)["messages"][0]["content"] for line in PROMPTS.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    configs = {"batched": args.batch, "one_at_a_time": 1}
    servers = {name: start_server(args, b) for name, b in configs.items()}
    walls: dict[str, list[float]] = {name: [] for name in configs}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    t_start = time.perf_counter()
    try:
        for _, base in servers.values():  # warm-up: one request each, not counted
            asyncio.run(wave(base, prompts, 1, 4, args.timeout_s))
        for r in range(args.requests):
            order = list(configs) if r % 2 == 0 else list(configs)[::-1]  # ABBA
            for name in order:
                if name == "one_at_a_time" and r >= args.baseline_waves:
                    continue
                wall, res = asyncio.run(wave(servers[name][1], prompts, args.clients, args.max_tokens,
                                             args.timeout_s))
                walls[name].append(wall)
                results[name].extend({**x, "wave": r} for x in res)
                print(f"wave {r} {name}: {wall:.1f}s, {sum(x['tokens'] for x in res if x['ok'])} tokens, "
                      f"{sum(not x['ok'] for x in res)} failed", flush=True)
        server_metrics = {name: {"acceptance_rate": metric(base, "acceptance_rate"),
                                 "block_size": metric(base, "block_size"),
                                 "requests_ok": metric(base, 'requests_total{endpoint="/v1/chat/completions",'
                                                             'outcome="ok"}')}
                          for name, (_, base) in servers.items()}
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    report: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_avg_end": os.getloadavg(), "target": args.target,
        "draft": args.draft, "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "num_speculative_tokens": args.num_speculative_tokens,
        "baseline_waves": args.baseline_waves,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
        "configs": {name: {"max_batch": configs[name], **summary(walls[name], results[name]),
                           **server_metrics[name]} for name in configs},
    }
    by_key = {name: {(x["wave"], x["client"]): x.get("text") for x in results[name]} for name in configs}
    report["same_greedy_text"] = all(by_key["batched"][k] == t for k, t in by_key["one_at_a_time"].items())
    b, s = report["configs"]["batched"], report["configs"]["one_at_a_time"]
    report["speedup_tokens_per_s"] = round(b["tokens_per_s"] / s["tokens_per_s"], 2)
    paired = range(min(args.baseline_waves, args.requests))  # the waves both servers ran, interleaved
    paired_tokens = sum(x["tokens"] for x in results["batched"] if x["ok"] and x["wave"] in paired)
    paired_rate = paired_tokens / sum(walls["batched"][w] for w in paired)
    report["speedup_paired_waves"] = round(paired_rate / s["tokens_per_s"], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "requests": results}, indent=1, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
