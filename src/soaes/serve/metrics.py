"""Server counters and gauges, rendered in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

PREFIX = "soaes_serve_"


@dataclass
class _Summary:
    """Sum and count of observations (a Prometheus summary without quantiles)."""

    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1


@dataclass
class ServeMetrics:
    """What `/metrics` reports; every update takes the lock (the engine thread and request handlers both write)."""

    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (endpoint, outcome) -> count
    prompt_tokens: int = 0
    generation_tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0
    steps: int = 0
    block_size: float = 0.0
    queue_depth: int = 0
    running: int = 0
    latency: _Summary = field(default_factory=_Summary)
    ttft: _Summary = field(default_factory=_Summary)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_request(self, endpoint: str, outcome: str) -> None:
        """One finished request: outcome is "ok", "cancelled", "rejected" (429) or "error" (4xx)."""
        with self.lock:
            key = (endpoint, outcome)
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe_request(self, prompt_tokens: int, generation_tokens: int, latency_s: float,
                        ttft_s: float | None) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            self.latency.observe(latency_s)
            if ttft_s is not None:
                self.ttft.observe(ttft_s)

    def observe_step(self, proposed: int, accepted: int, target_calls: int, block_size: float, running: int,
                     queue_depth: int) -> None:
        """One engine step: decoder counters (deltas), the mean block size it proposed, rows and queue after it."""
        with self.lock:
            self.proposed += proposed
            self.accepted += accepted
            self.target_calls += target_calls
            self.steps += 1
            self.block_size = block_size
            self.running, self.queue_depth = running, queue_depth

    def set_load(self, running: int, queue_depth: int) -> None:
        with self.lock:
            self.running, self.queue_depth = running, queue_depth

    def render(self) -> str:
        """The Prometheus text format of every metric."""
        with self.lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP {PREFIX}{name} {help_text}")
                lines.append(f"# TYPE {PREFIX}{name} {kind}")
                lines.extend(f"{PREFIX}{name}{labels} {value:g}" for labels, value in samples)

            requests = [(f'{{endpoint="{e}",outcome="{o}"}}', float(n)) for (e, o), n in sorted(self.requests.items())]
            metric("requests_total", "counter", "Requests finished, by endpoint and outcome.", requests)
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                   [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens generated for finished requests.",
                   [("", self.generation_tokens)])
            metric("draft_tokens_proposed_total", "counter", "Draft and lookup tokens proposed for verification.",
                   [("", self.proposed)])
            metric("draft_tokens_accepted_total", "counter", "Proposed tokens the target accepted.",
                   [("", self.accepted)])
            rate = self.accepted / self.proposed if self.proposed else 0.0
            metric("acceptance_rate", "gauge", "Accepted / proposed tokens since start.", [("", rate)])
            metric("target_calls_total", "counter", "Target forward passes (prefill and decode).",
                   [("", self.target_calls)])
            metric("steps_total", "counter", "Decoding steps of the batching engine.", [("", self.steps)])
            metric("block_size", "gauge", "Mean tokens proposed per row in the last speculative block.",
                   [("", self.block_size)])
            metric("queue_depth", "gauge", "Requests waiting for a free row.", [("", self.queue_depth)])
            metric("running_requests", "gauge", "Requests being decoded.", [("", self.running)])
            for name, summary, text in (("request_latency_seconds", self.latency, "Request latency."),
                                        ("time_to_first_token_seconds", self.ttft, "Time to first token.")):
                metric(name, "summary", text, [("_sum", summary.total), ("_count", summary.count)])  # name_sum ...
            return "\n".join(lines) + "\n"
