"""The batching engine behind `soaes serve`: a bounded queue of requests and one thread that steps a
`soaes_specdec.session.DecodeSession`, admitting queued requests into free rows between steps, dropping cancelled
ones, and handing each request its text as it is decoded (cut at its stop strings)."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from soaes_core.errors import InvalidArgumentError, SoaesError
from soaes_specdec.sampling import SamplingParams
from soaes_specdec.session import DecodeSession

from .metrics import ServeMetrics


class QueueFullError(SoaesError):
    """The request queue is full (the server answers 429)."""


@dataclass(frozen=True)
class Event:
    """A piece of one request's output: new text, how many tokens it has generated so far, and the end."""

    text: str
    completion_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "error"
    error: str | None = None


class IncrementalText:
    """Token ids to text deltas: holds back an unfinished multi-byte character and any tail that could begin a stop
    string, and cuts the text before the first stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters handed out so far

    def add(self, tokens: Sequence[int], final: bool = False) -> tuple[str, bool]:
        """Append tokens; returns (new text, whether a stop string was reached). `final` flushes what was held."""
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            cut = max(min(hits), self.sent)
            delta, self.sent = text[self.sent:cut], cut
            return delta, True
        hold = 0
        if not final:
            hold = len(text) - len(text.rstrip("\ufffd"))  # an unfinished UTF-8 sequence decodes as U+FFFD
            for s in self.stop:
                hold = max(hold, next((k for k in range(min(len(s) - 1, len(text)), 0, -1)
                                       if text.endswith(s[:k])), 0))
        end = max(self.sent, len(text) - hold)
        delta, self.sent = text[self.sent:end], end
        return delta, False


class RequestHandle:
    """One request inside the engine: its inputs, and an asyncio queue of `Event`s fed from the engine thread."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams, seed: int | None,
                 text: IncrementalText, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_ids, self.max_tokens, self.params, self.seed = prompt_ids, max_tokens, params, seed
        self.text, self.loop = text, loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop decoding this request at the next step boundary (its client went away)."""
        self._cancelled.set()

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class ServeEngine:
    """Runs `decoder` (a `SpeculativeDecoder` or a plain model) over up to `max_batch` requests at a time; requests
    beyond them wait in a queue of `max_queue`, and one beyond that is refused (`QueueFullError`)."""

    def __init__(self, decoder: Any, tokenizer: Any, max_batch: int = 8, max_queue: int = 64,
                 max_context: int = 2048, metrics: ServeMetrics | None = None) -> None:
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise InvalidArgumentError(f"max_queue must be an int >= 0, got {max_queue!r}")
        self.tokenizer = tokenizer
        self.session = DecodeSession(decoder, max_rows=max_batch, max_tokens=max_context,
                                     eos_token_id=tokenizer.eos_token_id)
        self.context_window = max_context
        self.max_queue = max_queue
        self.metrics = metrics if metrics is not None else ServeMetrics()
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._running: dict[int, RequestHandle] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="soaes-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], max_tokens: int, params: SamplingParams, seed: int | None = None,
               stop: Sequence[str] = ()) -> RequestHandle:
        """Queue a request (call from the event loop); raises `QueueFullError` when `max_queue` are waiting."""
        handle = RequestHandle(prompt_ids, max_tokens, params, seed, IncrementalText(self.tokenizer, stop),
                               asyncio.get_running_loop())
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting): retry later")
            self._queue.append(handle)
            self.metrics.set_load(len(self._running), len(self._queue))
            self._cond.notify_all()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        handle.cancel()
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._queue and not self._running:
                    self._cond.wait()
                if self._closing:
                    break
                admitted = []
                while self._queue and len(self._running) + len(admitted) < self.session.max_rows:
                    handle = self._queue.popleft()
                    if not handle.cancelled:
                        admitted.append(handle)
            for handle in admitted:
                self._admit(handle)
            for row, handle in list(self._running.items()):
                if handle.cancelled:
                    self.session.remove_row(row)
                    del self._running[row]
            if self._running:
                self._step()
        for handle in [*self._running.values(), *self._queue]:
            handle.emit(Event("", handle.completion_tokens, True, "error", "the server is shutting down"))

    def _admit(self, handle: RequestHandle) -> None:
        try:
            row = self.session.add_row(handle.prompt_ids, handle.max_tokens, handle.params, handle.seed)
        except InvalidArgumentError as err:  # checked by the app already; kept as a guard
            handle.emit(Event("", 0, True, "error", str(err)))
            return
        self._running[row] = handle

    def _step(self) -> None:
        stats = self.session.stats
        before = (stats.proposed, stats.accepted, stats.target_calls)
        try:
            updates = self.session.step()
        except Exception as err:  # a decoder failure ends the running requests, not the server
            message = f"decoding failed: {type(err).__name__}: {err}"
            for row, handle in list(self._running.items()):
                handle.emit(Event("", handle.completion_tokens, True, "error", message))
                self.session.remove_row(row)
            self._running.clear()
            return
        now = time.perf_counter()
        for row, update in updates.items():
            handle = self._running[row]
            if update.tokens and handle.first_token_at is None:
                handle.first_token_at = now
            handle.completion_tokens += len(update.tokens)
            text, stopped = handle.text.add(update.tokens, final=update.finished)
            finished = update.finished or stopped
            if finished:
                handle.finish_reason = "stop" if stopped else update.finish_reason
                if not update.finished:
                    self.session.remove_row(row)
                del self._running[row]
            handle.emit(Event(text, handle.completion_tokens, finished, handle.finish_reason))
        with self._cond:
            queued = len(self._queue)
        self.metrics.observe_step(stats.proposed - before[0], stats.accepted - before[1],
                                  stats.target_calls - before[2], self.session.last_block_size,
                                  len(self._running), queued)


def build_engine(target: str, draft: str | None = None, num_speculative_tokens: int = 3, lookup_tokens: int = 0,
                 max_batch: int = 8, max_queue: int = 64, max_context: int = 2048) -> ServeEngine:
    """Load `target` (and `draft`: a layer or feature draft directory) in float32 and wrap them in an engine, as
    `soaes-specdec generate` builds its decoder; no draft means plain decoding. `max_context` is capped at the
    target's context."""
    import torch

    from soaes_core import load_model, load_tokenizer
    from soaes_specdec.decoding import SpeculativeDecoder
    from soaes_specdec.draft import load_any_draft

    if lookup_tokens and draft is None:
        raise InvalidArgumentError("--lookup-tokens adds prompt lookup to a draft's proposals: give --draft too")
    tokenizer = load_tokenizer(target)
    model = load_model(target, dtype=torch.float32)
    decoder: Any = model
    if draft is not None:
        draft_model = load_any_draft(draft, dtype=torch.float32, target=target, target_tokenizer=tokenizer)
        decoder = SpeculativeDecoder(model, draft_model, num_speculative_tokens, lookup_tokens=lookup_tokens)
    positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context < 2:
        raise InvalidArgumentError(f"max_context must be an int >= 2, got {max_context!r}")
    context = min(max_context, positions) if positions else max_context
    return ServeEngine(decoder, tokenizer, max_batch=max_batch, max_queue=max_queue, max_context=context)
