"""One chat completion against any OpenAI-compatible endpoint, with retries.

We use the official ``openai`` client for the wire protocol but run the retry loop
ourselves (client ``max_retries=0``): its built-in retries do not cover a 200 response
whose body is garbage (no JSON, no choices, no text), which judge proxies do return, and
tests need a fast, configurable backoff.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

# The one home of an endpoint's defaults (flags, `eval run` configs and library callers all fall back to them).
# `openai` is imported where it is used, so that `vicuna --help` can read these without its ~1 s import.
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TIMEOUT = 120.0  # seconds before one request times out
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 1.0  # first wait in seconds; doubles each retry (with jitter), capped at 60 s


@dataclass
class Endpoint:
    """Where and how to ask: an OpenAI-compatible base URL and a model name."""

    api_base: str | None
    model: str
    api_key_env: str = DEFAULT_API_KEY_ENV
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    backoff: float = DEFAULT_BACKOFF

    def client(self) -> openai.OpenAI:
        import openai

        # Local servers (vicuna serve) need no key; the client insists on one being set.
        key = os.environ.get(self.api_key_env) or "EMPTY"
        return openai.OpenAI(base_url=self.api_base, api_key=key, timeout=self.timeout, max_retries=0)


class CompletionFailed(Exception):
    """All attempts failed; ``attempts`` says how many were made."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


class _Garbage(Exception):
    """A 2xx response without a usable completion."""


def _is_retryable(e: Exception) -> bool:
    import openai

    if isinstance(e, (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                      openai.InternalServerError, openai.APIResponseValidationError, _Garbage)):
        return True
    # 408/409/425/429/5xx that the client maps to the generic APIStatusError
    return isinstance(e, openai.APIStatusError) and (e.status_code in (408, 409, 425, 429) or e.status_code >= 500)


def _retry_after(e: Exception) -> float | None:
    response = getattr(e, "response", None)
    try:
        value = response.headers.get("retry-after") if response is not None else None
        return min(float(value), 60.0) if value is not None else None
    except (TypeError, ValueError):
        return None


@dataclass
class Reply:
    """A completion's text, the attempts it took, and the token usage the endpoint reported."""

    text: str
    attempts: int
    usage: dict[str, int] | None = None


def _text(completion) -> str:
    try:
        text = completion.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        raise _Garbage(f"response without a completion: {str(completion)[:200]!r}") from None
    if not isinstance(text, str):
        raise _Garbage("response message has no text content")
    return text


def _usage(completion) -> dict[str, int] | None:
    usage = getattr(completion, "usage", None)
    try:
        return {"prompt_tokens": int(usage.prompt_tokens), "completion_tokens": int(usage.completion_tokens)}
    except (AttributeError, TypeError, ValueError):
        return None  # not every OpenAI-compatible server reports usage


def chat(
    endpoint: Endpoint,
    messages: list[dict],
    *,
    temperature: float = 0.0,
    max_tokens: int = 1024,
    client: openai.OpenAI | None = None,
) -> Reply:
    """One completion. Retries timeouts, 408/409/429/5xx and garbage with backoff."""
    client = client or endpoint.client()
    attempts = 0
    while True:
        attempts += 1
        try:
            completion = client.chat.completions.create(
                model=endpoint.model, messages=messages, temperature=temperature, max_tokens=max_tokens,
            )
            return Reply(_text(completion), attempts, _usage(completion))
        except Exception as e:  # noqa: BLE001 -- classified right below
            if not _is_retryable(e):
                raise CompletionFailed(_describe(e), attempts) from e
            if attempts > endpoint.retries:
                raise CompletionFailed(f"gave up after {attempts} attempts: {_describe(e)}", attempts) from e
            wait = _retry_after(e)
            if wait is None:
                wait = min(endpoint.backoff * 2 ** (attempts - 1), 60.0) * (0.5 + random.random() / 2)
            log.debug("attempt %d failed (%s); retrying in %.2fs", attempts, _describe(e), wait)
            time.sleep(wait)


def _describe(e: Exception) -> str:
    import openai

    if isinstance(e, openai.APIStatusError):
        return f"HTTP {e.status_code}: {str(e.message)[:300]}"
    if isinstance(e, openai.APITimeoutError):
        return "request timed out"
    return f"{type(e).__name__}: {str(e)[:300]}"
