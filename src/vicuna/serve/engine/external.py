"""What the engines whose scheduler lives in another library (vLLM, llama.cpp) share.

They take requests through :meth:`EngineBase.prepare` like our own engine (the same
template rendering, the same 400s, the same stop ids and sampling defaults), then hand
prompt ids and settings to the library, which batches them itself. Left to us: admission
(429 beyond ``max_batch_size + max_queue`` in flight), the counters behind /metrics and
``worker_get_status``, and the leading-space strip of chat answers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

from ...errors import InvalidRequest, Overloaded
from .base import EngineBase, EngineStats, Meter


class ExternalEngine(EngineBase):
    """Bookkeeping for a delegating engine; subclasses implement ``generate``, ``start`` and ``stop``."""

    backend = "external"

    def _init_bookkeeping(self) -> None:
        self._inflight = 0
        self._stats = EngineStats()
        self._meter = Meter()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def admitted(self, prompt_tokens: int) -> Iterator["Tracker"]:
        """Count one request in flight for its lifetime; refuse it (429) when too many already are."""
        with self._lock:
            if self._inflight >= self.config.max_batch_size + self.config.max_queue:
                raise Overloaded(f"the server is overloaded ({self._inflight} requests in flight for {self.name}); "
                                 "retry shortly", retry_after=2)
            self._inflight += 1
            self._stats.prompt_tokens += prompt_tokens
        tracker = Tracker(self)
        try:
            yield tracker
        finally:
            with self._lock:
                self._inflight -= 1
                if tracker.finished:
                    self._stats.requests_finished += 1
                else:
                    self._stats.requests_aborted += 1

    async def embed(self, texts: list[str], adapter: str | None = None) -> tuple[list[list[float]], int]:
        raise InvalidRequest(f"embeddings are served by the hf backend only; {self.name} runs on {self.backend}. "
                             "Run a `--backend hf` model for /v1/embeddings", param="model")

    @property
    def queue_length(self) -> int:
        return self._inflight

    def stats(self) -> EngineStats:
        with self._lock:
            s = EngineStats(**vars(self._stats))
        self._meter.fill(s)
        s.running = min(self._inflight, self.config.max_batch_size)
        s.waiting = self._inflight - s.running
        return s

    def info(self) -> dict[str, Any]:
        return {"model": self.name, "backend": self.backend, "context_length": self.max_model_len,
                "conv_template": getattr(self.template, "name", "jinja"),
                "max_batch_size": self.config.max_batch_size, "max_queue": self.config.max_queue}


class Tracker:
    """One request's counters: time to first token, tokens, whether it finished (vs aborted)."""

    def __init__(self, engine: ExternalEngine):
        self.engine = engine
        self.started = time.perf_counter()
        self.first = True
        self.finished = False

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        if self.first:
            self.first = False
            self.engine._meter.first_token(time.perf_counter() - self.started)
        self.engine._meter.tokens(n)


class LeadingStrip:
    """Drops whitespace before a chat answer's first visible character, as our own engine does
    (:attr:`vicuna.generation.SamplingParams.strip_leading`) for libraries that detokenize themselves."""

    def __init__(self, active: bool):
        self.active = active

    def __call__(self, text: str) -> str:
        if self.active and text:
            text = text.lstrip()
            self.active = not text
        return text
