"""`soaes serve`: an OpenAI-compatible server for a target and its draft on our exact speculative decoder, with
requests batched into the decoder step by step (app.py: HTTP routes; engine.py: batching; metrics.py: /metrics)."""

from __future__ import annotations

import shlex


def serve_command(target: str, draft: str | None = None, port: int = 8000, host: str = "127.0.0.1",
                  num_speculative_tokens: int = 3, lookup_tokens: int = 0) -> str:
    """The shell command that serves `target` with `draft` (a layer or feature draft directory) on host:port."""
    args = ["soaes", "serve", "--target", str(target)]
    if draft is not None:
        args += ["--draft", str(draft), "-n", str(num_speculative_tokens)]
        if lookup_tokens:
            args += ["--lookup-tokens", str(lookup_tokens)]
    args += ["--host", host, "--port", str(port)]
    return shlex.join(args)


__all__ = ["serve_command"]
