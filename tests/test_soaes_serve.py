"""`soaes serve` through the real `openai` client against a server on 127.0.0.1 (uvicorn in a thread): chat and
text completions, streamed and not; greedy output equal to plain decoding and to `soaes generate`; sampling
reproducible under `seed` whatever else runs; every bad request answered with an OpenAI-style 4xx while the server
keeps serving; batching, the bounded queue (429), cancellation on disconnect, the API key and /metrics."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from soaes.serve import serve_command
from soaes.serve.app import create_app
from soaes.serve.engine import IncrementalText, ServeEngine, build_engine
from soaes_core import encode_chat_prompt, load_tokenizer
from soaes_data.synth_server import BackgroundServer
from soaes_specdec.decoding import SpeculativeDecoder, autoregressive_generate
from soaes_specdec.draft import make_layer_draft
from soaes_specdec.testing import identity_feature_draft

KEY = "test-key"
CONTEXT = 192
QUESTION = "What does a state-owned assets supervision commission do?"


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory, tiny_qwen2: Any, tiny_qwen2_dir: Path) -> Path:
    """A feature draft of the tiny target (deterministic, accepted in part), saved with the target's tokenizer."""
    out = tmp_path_factory.mktemp("feature-draft")
    identity_feature_draft(tiny_qwen2, 0.5).save_pretrained(out, load_tokenizer(tiny_qwen2_dir))
    return out


@pytest.fixture(scope="module")
def server(tiny_qwen2_dir: Path, draft_dir: Path) -> Iterator[BackgroundServer]:
    engine = build_engine(str(tiny_qwen2_dir), str(draft_dir), num_speculative_tokens=3, lookup_tokens=4,
                          max_batch=3, max_queue=2, max_context=CONTEXT)
    with BackgroundServer(create_app(engine, "tiny", api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_qwen2: Any, tiny_qwen2_dir: Path) -> Any:
    tokenizer = load_tokenizer(tiny_qwen2_dir)

    def plain(prompt: str, new: int) -> tuple[str, int]:
        out = autoregressive_generate(tiny_qwen2, torch.tensor(encode_chat_prompt(tokenizer, prompt)), new,
                                      eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out.new_tokens(), skip_special_tokens=True), len(out.new_tokens())

    return plain


def chat(client: openai.OpenAI, prompt: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], **kwargs)


def soaes_generate(target: str, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """`soaes generate --method plain` (soaes-specdec's command): the streamed text and its new-token count."""
    from click.testing import CliRunner

    from soaes.cli import main

    res = CliRunner().invoke(main, ["generate", "--target", target, "--method", "plain", "--max-new-tokens",
                                    str(max_new_tokens), prompt])
    assert res.exit_code == 0, res.output
    return res.stdout.removesuffix("\n"), json.loads(res.stderr[res.stderr.index("{"):])["new_tokens"]


def assert_serving(client: openai.OpenAI) -> None:
    assert chat(client, "still there?", max_tokens=3, temperature=0).usage.completion_tokens >= 1


def test_greedy_chat_equals_plain_decoding_and_soaes_generate(client: openai.OpenAI, reference: Any,
                                                              tiny_qwen2_dir: Path) -> None:
    reply = chat(client, QUESTION, max_tokens=24, temperature=0)
    text, count = reference(QUESTION, 24)
    assert reply.choices[0].message.content == text
    assert reply.usage.completion_tokens == count and reply.choices[0].finish_reason in ("length", "stop")
    assert soaes_generate(str(tiny_qwen2_dir), QUESTION, 24)[0] == text
    assert reply.model == "tiny" and reply.object == "chat.completion"


def test_stop_strings_cut_the_reply_streamed_and_not(client: openai.OpenAI, reference: Any) -> None:
    text, _ = reference(QUESTION, 24)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text[:text.find(stop)]
    reply = chat(client, QUESTION, max_tokens=24, temperature=0, stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    chunks = list(chat(client, QUESTION, max_tokens=24, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut


def test_serve_cli_refuses_lookup_without_a_draft(tiny_qwen2_dir: Path) -> None:
    from click.testing import CliRunner

    from soaes.cli import main

    result = CliRunner().invoke(main, ["serve", "--target", str(tiny_qwen2_dir), "--lookup-tokens", "2"])
    assert result.exit_code == 2 and "error:" in result.output and "--draft" in result.output


def test_streamed_chat_equals_the_non_streamed_one(client: openai.OpenAI, reference: Any) -> None:
    prompt = "Name three duties of a supervisor. Name three duties of a supervisor."
    chunks = list(chat(client, prompt, max_tokens=30, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(prompt, 30)[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reference(prompt, 30)[1]


def test_text_completions_streamed_and_not(client: openai.OpenAI, tiny_qwen2: Any, tiny_qwen2_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    prompt = "The commission supervises"
    ids = tokenizer(prompt)["input_ids"]
    out = autoregressive_generate(tiny_qwen2, torch.tensor(ids), 16, eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out.new_tokens(), skip_special_tokens=True)
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert plain.choices[0].text == expected
    streamed = client.completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_sampling_is_reproducible_under_seed_with_other_requests_running(client: openai.OpenAI) -> None:
    args = {"max_tokens": 20, "temperature": 0.9, "top_p": 0.95}
    alone = chat(client, QUESTION, seed=1234, **args).choices[0].message.content
    results: dict[str, str] = {}

    def ask(name: str, prompt: str, **kw: Any) -> None:
        results[name] = chat(client, prompt, **kw).choices[0].message.content

    threads = [threading.Thread(target=ask, args=("seeded", QUESTION), kwargs={"seed": 1234, **args}),
               threading.Thread(target=ask, args=("other", "Something else entirely."),
                                kwargs={"seed": 7, "max_tokens": 30, "temperature": 0.5}),
               threading.Thread(target=ask, args=("greedy", "A third one."), kwargs={"max_tokens": 25,
                                                                                    "temperature": 0})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["seeded"] == alone
    assert chat(client, QUESTION, seed=4321, **args).choices[0].message.content != alone


def test_models_health_and_metrics(client: openai.OpenAI, server: BackgroundServer) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    root = server.base_url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").json() == {"status": "ok"}
    text = httpx.get(f"{root}/metrics").text
    for name in ("requests_total", "generation_tokens_total", "acceptance_rate", "block_size", "queue_depth",
                 "time_to_first_token_seconds_sum", "request_latency_seconds_count"):
        assert f"soaes_serve_{name}" in text
    assert float(re.search(r"^soaes_serve_draft_tokens_proposed_total (\S+)$", text, re.M).group(1)) > 0
    assert float(re.search(r"^soaes_serve_block_size (\S+)$", text, re.M).group(1)) > 0


def post(server: BackgroundServer, body: Any, path: str = "/chat/completions", key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, str):
        return httpx.post(server.base_url + path, content=body, headers={**headers, "Content-Type":
                                                                           "application/json"}, timeout=30)
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=30)


GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(("change", "status", "needle"), [
    ({"model": "gpt-4"}, 404, "not served"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": -3}, 400, "max_tokens"),
    ({"max_tokens": CONTEXT}, 400, "context window"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"temperature": -0.5}, 400, "temperature"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "word " * CONTEXT}]}, 400, "context window"),
    ({"n": 2}, 400, "n"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(client: openai.OpenAI,
                                                                        server: BackgroundServer, change: dict,
                                                                        status: int, needle: str) -> None:
    response = post(server, {**GOOD, **change})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"]
    with pytest.raises(openai.APIStatusError) as caught:  # the client raises its typed error for it
        client.chat.completions.create(**{**GOOD, **change})
    assert caught.value.status_code == status
    assert_serving(client)


def test_broken_json_wrong_key_and_unknown_route(client: openai.OpenAI, server: BackgroundServer) -> None:
    broken = post(server, '{"model": "tiny", "messages": [')
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    assert post(server, GOOD, key=None).status_code == 401
    assert post(server, GOOD, key="wrong").status_code == 401
    assert post(server, GOOD, path="/nothing").status_code == 404
    bad_ids = post(server, {"model": "tiny", "prompt": [1, 10**9], "max_tokens": 2}, path="/completions")
    assert bad_ids.status_code == 400 and "token ids" in bad_ids.json()["error"]["message"]
    assert_serving(client)


def test_a_client_that_disconnects_mid_stream_is_cancelled(client: openai.OpenAI, server: BackgroundServer) -> None:
    root = server.base_url.removesuffix("/v1")

    def cancelled() -> float:
        found = re.search(r'requests_total\{endpoint="/v1/chat/completions",outcome="cancelled"\} (\S+)',
                          httpx.get(f"{root}/metrics").text)
        return float(found.group(1)) if found else 0.0

    before = cancelled()
    stream = chat(client, QUESTION, max_tokens=120, temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while cancelled() <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cancelled() == before + 1
    assert_serving(client)


def test_a_full_queue_answers_429_and_every_other_request_completes(client: openai.OpenAI) -> None:
    outcomes: list[Any] = []
    start = threading.Barrier(10)

    def ask() -> None:
        start.wait(30)
        try:
            reply = chat(client, QUESTION, max_tokens=120, temperature=0)
            outcomes.append(reply.usage.completion_tokens)
        except openai.RateLimitError as err:
            outcomes.append(err.status_code)

    threads = [threading.Thread(target=ask) for _ in range(10)]  # 3 rows + 2 waiting: the rest is refused
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outcomes) == 10 and 429 in outcomes
    served = [o for o in outcomes if o != 429]
    assert len(served) >= 2 and len(set(served)) == 1  # greedy: the same reply for every one that got in
    assert_serving(client)


def test_incremental_text_holds_back_stop_prefixes(tiny_qwen2_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    ids = tokenizer("alpha beta gamma delta")["input_ids"]
    text = IncrementalText(tokenizer, stop=["gamma"])
    pieces = [text.add([i]) for i in ids]
    assert "".join(p for p, _ in pieces) == "alpha beta "
    assert [stopped for _, stopped in pieces].index(True) == len(ids) - 2


def test_serve_command() -> None:
    assert serve_command("runs/x/target", "runs/x/draft", port=9000) == (
        "soaes serve --target runs/x/target --draft runs/x/draft -n 3 --host 127.0.0.1 --port 9000")
    assert serve_command("embedded:smollm2-135m") == "soaes serve --target embedded:smollm2-135m --host 127.0.0.1 " \
                                                     "--port 8000"


@pytest.mark.slow
def test_embedded_greedy_chat_equals_soaes_generate(embedded_model: Any, embedded_tokenizer: Any) -> None:
    decoder = SpeculativeDecoder(embedded_model, make_layer_draft(embedded_model, 4), 3)
    engine = ServeEngine(decoder, embedded_tokenizer, max_batch=2, max_context=512)
    with BackgroundServer(create_app(engine, "smol")) as srv:
        api = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=120)
        reply = api.chat.completions.create(model="smol", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=32, temperature=0)
    text, new_tokens = soaes_generate("embedded:smollm2-135m", QUESTION, 32)
    assert reply.choices[0].message.content == text
    assert reply.usage.completion_tokens == new_tokens
