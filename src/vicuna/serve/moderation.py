"""Moderation: flagged input is refused before any model sees it.

A moderator is a local word list (:class:`WordList`) or an OpenAI-compatible moderation
endpoint (:class:`ModerationEndpoint`: ``POST URL {"input": [...]}`` answered with
``{"results": [{"flagged": bool, "categories": {...}}]}``). :class:`ModeratedClient` wraps any
:class:`~vicuna.serve.model_client.ModelClient`, so the API, the chat and the arena are all covered by
one check: the user and system text of every request is checked first, and a flagged request
raises :class:`Flagged` (a 400, code ``content_flagged``) without the model being asked. When the
moderation endpoint cannot be reached the request is refused too (503): unchecked input is not
passed on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from ..conversation import message_text
from ..errors import InvalidRequest, Unavailable, UsageError
from .model_client import Embeddings, _ClientBase
from .core import Delta, GenerateRequest

log = logging.getLogger(__name__)


class Flagged(InvalidRequest):
    code = "content_flagged"


@dataclass
class ModerationConfig:
    """`--moderation-endpoint URL` or `--moderation-words FILE`: what every model's input must pass."""

    moderation_endpoint: str | None = field(default=None, metadata={
        "metavar": "URL", "help": "an OpenAI-compatible moderation URL (e.g. https://api.openai.com/v1/moderations; "
        "its key from $OPENAI_API_KEY): flagged input is refused and never sent to a model"})
    moderation_words: str | None = field(default=None, metadata={
        "metavar": "FILE", "help": "a local moderation list instead: one blocked word or phrase per line"})

    def __post_init__(self):
        if self.moderation_endpoint and self.moderation_words:
            raise UsageError("give --moderation-endpoint or --moderation-words, not both")

    def wrap(self, client: Any) -> Any:
        """``client`` behind the moderator (unchanged without one)."""
        if self.moderation_endpoint:
            return ModeratedClient(client, ModerationEndpoint(self.moderation_endpoint))
        if self.moderation_words:
            return ModeratedClient(client, WordList.from_file(self.moderation_words))
        return client


class WordList:
    """Refuses text containing any of ``words`` (whole words or phrases, any case)."""

    def __init__(self, words: list[str]):
        words = [w.strip() for w in words if w.strip()]
        if not words:
            raise UsageError("the moderation word list is empty")
        self.pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "WordList":
        """One word or phrase per line; blank lines and ``#`` comments are skipped."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UsageError(f"cannot read the moderation word list {path}: {e.strerror or e}") from None
        return cls([line for line in lines if not line.lstrip().startswith("#")])

    async def flagged(self, texts: list[str]) -> str | None:
        return "it contains a blocked term" if any(self.pattern.search(t) for t in texts) else None

    async def close(self) -> None:
        return None


class ModerationEndpoint:
    """An OpenAI-compatible ``/v1/moderations`` URL (its key, if any, from ``api_key_env``)."""

    def __init__(self, url: str, *, api_key_env: str | None = "OPENAI_API_KEY", model: str | None = None,
                 timeout: float = 10.0):
        import httpx

        self.url, self.model, self.timeout = url, model, timeout
        key = os.environ.get(api_key_env) if api_key_env else None
        self.http = httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"} if key else {})

    async def flagged(self, texts: list[str]) -> str | None:
        import httpx

        body: dict[str, Any] = {"input": texts}
        if self.model:
            body["model"] = self.model
        try:
            r = await self.http.post(self.url, json=body, timeout=self.timeout)
            r.raise_for_status()
            results = r.json()["results"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            log.error("moderation endpoint %s failed: %s", self.url, type(e).__name__)
            raise Unavailable("the moderation service cannot be reached, so the message was not sent; retry "
                              "shortly", retry_after=5) from None
        hits = [r for r in results if r.get("flagged")]
        if not hits:
            return None
        categories = sorted({c for r in hits for c, on in (r.get("categories") or {}).items() if on})
        return "it was flagged" + (f" ({', '.join(categories)})" if categories else "")

    async def close(self) -> None:
        await self.http.aclose()


class ModeratedClient(_ClientBase):
    """``base`` behind a moderator: nothing flagged is sent to a model."""

    def __init__(self, base: Any, moderator: WordList | ModerationEndpoint, *, cache_size: int = 4096):
        self.base, self.moderator = base, moderator
        self.engines = getattr(base, "engines", None)
        self._verdicts: OrderedDict[str, str | None] = OrderedDict()  # a conversation's old turns: checked once
        self.cache_size = cache_size

    async def _check(self, model: str, request: GenerateRequest) -> None:
        if request.messages is not None:
            texts = [message_text(m.get("content")) for m in request.messages if m.get("role") in ("user", "system")]
        else:
            texts = [request.prompt or ""]
        unseen = [t for t in dict.fromkeys(texts) if t not in self._verdicts]
        if unseen:
            verdict = await self.moderator.flagged(unseen)
            for t in unseen:  # one verdict for the batch: cache only what passed
                if verdict is None:
                    self._verdicts[t] = None
            while len(self._verdicts) > self.cache_size:
                self._verdicts.popitem(last=False)
            if verdict is not None:
                log.warning("moderation refused a request for %s: %s", model, verdict)
                raise Flagged(f"Your message was not sent to the model: {verdict} (moderation).", param="messages"
                              if request.messages is not None else "prompt")

    async def list_models(self) -> list[str]:
        return await self.base.list_models()

    def generate(self, model: str, request: GenerateRequest) -> AsyncIterator[Delta]:
        return self.choices(model, request, 1)[0]

    def choices(self, model: str, request: GenerateRequest, n: int) -> list[AsyncIterator[Delta]]:
        checked: list[asyncio.Future] = []

        async def guarded(stream: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
            try:
                if not checked:
                    checked.append(asyncio.ensure_future(self._check(model, request)))
                await checked[0]  # flagged: the model's stream is never started
                async for delta in stream:
                    yield delta
            finally:
                await stream.aclose()

        return [guarded(s) for s in self.base.choices(model, request, n)]

    def describe(self, model: str) -> dict[str, Any] | None:
        return self.base.describe(model)

    async def embed(self, model: str, inputs: list[str]) -> Embeddings:
        verdict = await self.moderator.flagged(inputs)
        if verdict is not None:
            raise Flagged(f"The input was not sent to the model: {verdict} (moderation).", param="input")
        return await self.base.embed(model, inputs)

    async def tokenize(self, model: str, **how) -> dict[str, Any]:
        return await self.base.tokenize(model, **how)

    async def detokenize(self, model: str, tokens: list[int]) -> dict[str, Any]:
        return await self.base.detokenize(model, tokens)

    async def close(self) -> None:
        await self.moderator.close()
        await self.base.close()
