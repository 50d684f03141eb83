"""A minimal OpenAI-compatible chat server around any `Generator` (e.g. a local model), for serving a
synthesis model without vLLM and for end-to-end tests of `OpenAICompatGenerator` on 127.0.0.1."""

# no `from __future__ import annotations`: FastAPI must see the request model classes, not strings
import threading
import time
from typing import Any

from .synth import Generator


def make_app(generator: Generator, model_name: str = "local") -> Any:
    """FastAPI app with `GET /v1/models` and `POST /v1/chat/completions` (non-streaming)."""
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    class ChatMessage(BaseModel):
        role: str
        content: str

    class ChatRequest(BaseModel):
        model: str
        messages: list[ChatMessage]
        max_tokens: int = 256
        temperature: float = 0.0

    app = FastAPI(title="soaes-data synthesis server")
    lock = threading.Lock()  # one generation at a time: the model is not thread-safe

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "soaes"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict[str, Any]:
        if req.model != model_name:
            raise HTTPException(status_code=404, detail=f"model {req.model!r} not served (have {model_name!r})")
        if not 1 <= req.max_tokens <= 8192:
            raise HTTPException(status_code=400, detail="max_tokens must be in [1, 8192]")
        conv = [{"role": m.role, "content": m.content} for m in req.messages]
        with lock:
            text = generator.generate([conv], req.max_tokens, req.temperature)[0]
        return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    return app


class BackgroundServer:
    """Run an ASGI app with uvicorn in a daemon thread on `host:port` (port 0: pick a free one)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("synthesis server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
