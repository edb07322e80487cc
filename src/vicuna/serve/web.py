"""The web UI: chat, anonymous arena battles, named side-by-side and the leaderboard.

One Gradio app on top of a :class:`~vicuna.serve.client.ModelClient`, so it runs the same
against in-process engines (``vicuna serve --model-path P --web``, mounted into the OpenAI
API app on one port) and against a controller (``vicuna serve web --controller URL``).

Layout: :class:`WebApp` holds the logic (limits, streaming, storage, votes) as plain
methods that take and return plain data, so tests can drive them without a browser;
:meth:`WebApp.build` wires them to Gradio components. Gradio is imported only there (the
import alone takes seconds).

Errors: every failure names what failed — our own limits (input too long, too many turns,
rate limited) pop up as titled messages; generation failures (model unavailable, context
too long, server busy, worker crashed) are written in the status line under the chat.
"""

import asyncio
import logging
import os
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..conversation import message_text
from ..errors import UsageError, VicunaError
from .arena import (
    ArenaStore, compute_leaderboard, identity_leak, leaderboard_figure, leaderboard_markdown, win_rate_markdown,
)

log = logging.getLogger(__name__)

VOTES = {"model_a": "A is better", "model_b": "B is better", "tie": "Tie", "tie (bothbad)": "Both are bad"}
VOTE_IDS = {"model_a": "a", "model_b": "b", "tie": "tie", "tie (bothbad)": "bothbad"}  # HTML ids of the buttons
FLAG_REASONS = ("Inappropriate", "Incorrect", "Other")  # shown behind the flag icon of each answer


class WebError(VicunaError):
    """A request the UI refuses, with a short title ("Rate limited") and what to do."""

    def __init__(self, title: str, message: str):
        super().__init__(message)
        self.title = title


@dataclass
class WebSettings:
    """Limits and defaults of the web UI (all settable on the command line)."""

    max_input_chars: int = 4000
    max_turns: int = 16
    rate_limit: int = 20  # messages per client per rate_window seconds; 0 = off
    rate_window: float = 60.0
    bootstrap_rounds: int = 1000
    max_tokens: int = 512  # default of the slider
    max_tokens_limit: int = 4096  # top of the slider
    concurrency: int = 64  # generations Gradio runs at once (the engine batches them)
    identity_words: tuple[str, ...] = ()  # extra words that void a battle vote (makers: "lmsys", "openai")
    battle_temperature: float = 0.7  # a blind battle samples with the server's settings, never the client's
    battle_top_p: float = 1.0
    vote_limit: int = 30  # votes per client per vote_window seconds; 0 = off
    vote_window: float = 3600.0
    arena_only: bool = False  # only the blind arena and the leaderboard: no model is served by name
    arena_weights: tuple[str, ...] = ()  # "NAME=WEIGHT": how often a model is drawn for a battle (default 1)
    title: str = "Vicuna"

    def weights(self) -> dict[str, float]:
        """``arena_weights`` as a mapping (a new model gets weight 4, say, to catch up on battles)."""
        out = {}
        for item in self.arena_weights:
            name, sep, value = item.rpartition("=")
            try:
                weight = float(value)
            except ValueError:
                weight = -1.0
            if not sep or not name or not weight >= 0:
                raise UsageError(f"--arena-weights: expected NAME=WEIGHT with a weight >= 0, got {item!r}")
            out[name] = weight
        return out


class RateLimiter:
    """At most ``limit`` events per ``window`` seconds per key (a sliding window).

    In memory: the UI runs in one process (Gradio's queue lives there), so a shared
    store would add latency for nothing.
    """

    def __init__(self, limit: int, window: float = 60.0):
        self.limit, self.window = limit, window
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str | None, now: float | None = None) -> float | None:
        """Record an event; returns None if allowed, else seconds until the next is."""
        if self.limit <= 0:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            events = self._events.setdefault(key or "?", deque())
            while events and events[0] <= now - self.window:
                events.popleft()
            if len(events) >= self.limit:
                return events[0] + self.window - now
            events.append(now)
            if len(self._events) > 10_000:  # forget idle clients
                for k in [k for k, q in self._events.items() if not q or q[-1] <= now - self.window]:
                    del self._events[k]
            return None


def describe_error(exc: BaseException, model: str) -> tuple[str, str]:
    """What failed, for the user: (short title, one sentence naming the model and the cause)."""
    code = getattr(exc, "code", None)
    status = getattr(exc, "status", None)
    msg = getattr(exc, "message", None) or str(exc)
    retry = getattr(exc, "retry_after", None)
    retry_hint = f" Try again in {retry:.0f} s." if retry else " Try again in a moment."
    if code == "content_flagged":
        return "Refused by moderation", msg
    if code == "context_length_exceeded":
        return "Context too long", f"{model}: {msg} Press Clear (or start a new round) for a shorter conversation."
    if code == "model_not_found" or status == 404:
        return "Model unavailable", f"{msg} Press ↻ Models to reload the list."
    if code == "model_unavailable" or status == 503:
        return "Model unavailable", f"{model} cannot answer right now ({msg}).{retry_hint}"
    if code == "rate_limit_exceeded" or status == 429:
        return "Server busy (rate limited)", f"{model} is at capacity ({msg}).{retry_hint}"
    if status == 400:
        return "Request rejected", f"{model}: {msg}"
    if status is not None:
        return f"{model} failed (HTTP {status})", msg
    return "Internal error", f"while {model} was answering: {type(exc).__name__}: {msg}"


def error_markdown(exc: BaseException, model: str) -> str:
    title, message = describe_error(exc, model)
    return f"**Error — {title}**: {message}"


def _plain(history: Sequence[dict]) -> list[dict[str, str]]:
    """Gradio chat history -> OpenAI-style messages with plain-text content."""
    return [{"role": m["role"], "content": message_text(m.get("content"))} for m in history
            if m.get("role") in ("user", "assistant", "system")]


def _turns(history: Sequence[dict]) -> int:
    return sum(1 for m in history if m.get("role") == "user")


def _messages(state: dict | None) -> list[dict]:
    """The conversation the server holds for a chat session."""
    return list((state or {}).get("messages") or [])


def not_stored(problem: str) -> str:
    return f"**Not stored**: {problem}"


def _finish_of(error: BaseException) -> str:
    """How a failed answer is stored: "flagged" when moderation refused the input, else "error"."""
    return "flagged" if getattr(error, "code", None) == "content_flagged" else "error"


async def merge_streams(
    streams: Sequence[AsyncIterator[str]],
) -> AsyncIterator[tuple[int, str | None, BaseException | None]]:
    """Interleave text streams as they produce: ``(index, piece, None)``, and ``(index, None, error or
    None)`` when one ends.

    Both arena answers stream at once, so neither model waits for the other.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[str]) -> None:
        try:
            async for piece in stream:
                await queue.put((i, piece, None))
        except Exception as e:  # reported to the consumer, which shows it for that side
            await queue.put((i, None, e))
        else:
            await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            running -= item[1] is None
            yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Stop:
    """A running generation's stop switch: ``reason`` is "stop" (Stop button) or "clear" (Clear/New round)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = "stop"


async def until_stopped(stream: AsyncIterator, stop: asyncio.Event) -> AsyncIterator:
    """Items of ``stream`` until it ends or ``stop`` is set; then the stream is closed (the engine aborts).

    Why not Gradio's ``cancels=``: cancelling a job that has not streamed yet leaves a red
    "Error" over the chat in Gradio 6; stopping ourselves ends the job normally, keeps the
    partial answer on screen and lets us store it as "stopped".
    """
    it = stream.__aiter__()
    stopped = asyncio.ensure_future(stop.wait())
    nxt: asyncio.Future | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                return  # stopped while waiting for the next piece
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
            if stop.is_set():
                return
    finally:
        # Also reached when our consumer is cancelled (the browser went away) mid-wait.
        stopped.cancel()
        if nxt is not None and not nxt.done():
            nxt.cancel()  # throws CancelledError into the stream, which closes it
            await asyncio.gather(nxt, return_exceptions=True)
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


class WebApp:
    """The UI's logic on top of a model client and the arena store."""

    def __init__(self, client: Any, store: ArenaStore, settings: WebSettings | None = None, *,
                 rng: random.Random | None = None):
        self.client = client
        self.store = store
        self.settings = settings or WebSettings()
        self.limiter = RateLimiter(self.settings.rate_limit, self.settings.rate_window)
        self.vote_limiter = RateLimiter(self.settings.vote_limit, self.settings.vote_window)
        self.rng = rng or random.Random()
        self._running: dict[str, _Stop] = {}  # stop key (browser session + tab) -> the generation running there

    def _begin(self, key: str | None) -> _Stop:
        stop = _Stop()
        if key:
            self._running[key] = stop
        return stop

    def _end(self, key: str | None, stop: _Stop) -> None:
        if key and self._running.get(key) is stop:
            del self._running[key]

    def request_stop(self, key: str | None, reason: str = "stop") -> bool:
        """Stop the generation running under ``key`` (call on the event loop); False if none runs."""
        stop = self._running.get(key) if key else None
        if stop is None:
            return False
        stop.reason = reason
        stop.event.set()
        return True

    # -- shared --------------------------------------------------------------------------

    async def models(self) -> list[str]:
        return list(await self.client.list_models())

    def check_message(self, text: str, history: Sequence[dict], ip: str | None) -> str:
        """Apply the input limits; returns the stripped text or raises WebError."""
        text = (text or "").strip()
        s = self.settings
        if not text:
            raise WebError("Empty message", "Type a message first.")
        if len(text) > s.max_input_chars:
            raise WebError("Message too long",
                           f"Your message has {len(text):,} characters; the limit is {s.max_input_chars:,}. "
                           "Shorten it.")
        if _turns(history) >= s.max_turns:
            raise WebError("Too many turns",
                           f"This conversation reached the limit of {s.max_turns} turns. "
                           "Press Clear (or start a new round).")
        self.check_rate(ip)
        return text

    def check_rate(self, ip: str | None) -> None:
        wait = self.limiter.check(self.store.hash_ip(ip))
        if wait is not None:
            s = self.settings
            raise WebError("Rate limited", f"You sent more than {s.rate_limit} messages in {s.rate_window:.0f} s. "
                                           f"Try again in {max(1, round(wait))} s.")

    def params(self, temperature: float | None, top_p: float | None, max_tokens: float) -> dict[str, Any]:
        """Sampling settings from the sliders (chat and the named side-by-side); None: the model's default."""
        return {"temperature": None if temperature is None else float(temperature),
                "top_p": None if top_p is None else float(top_p), "max_tokens": int(max_tokens)}

    def battle_params(self) -> dict[str, Any]:
        """A blind battle's sampling settings: the server's, never the browser's.

        With a temperature of 0 (or a seed) of its choosing, a client could replay the prompt
        against the named models (the API, the Chat tab) and recognise both answers.
        """
        s = self.settings
        return {"temperature": s.battle_temperature, "top_p": s.battle_top_p, "max_tokens": s.max_tokens}

    async def stream(self, model: str, messages: list[dict], params: dict[str, Any]) -> AsyncIterator[str]:
        """The client's text stream, with *Max new tokens* as an upper bound rather than a demand.

        The API answers an explicit ``max_tokens`` that does not fit in the context with a 400
        (OpenAI semantics). A chat UI's slider means "at most", so on that error, before any
        text, we ask again without ``max_tokens``: the engine then fills what is left of the
        context, which is less than the slider (the first request did not fit). A prompt that
        alone is too long still fails, with the engine's explanation.
        """
        started = False
        try:
            async for piece in self.client.stream_chat(model, messages, **params):
                started = True
                yield piece
            return
        except Exception as e:
            if started or getattr(e, "code", None) != "context_length_exceeded" or params.get("max_tokens") is None:
                raise
        async for piece in self.client.stream_chat(model, messages, **{**params, "max_tokens": None}):
            yield piece

    async def _save(self, conv_id: str, mode: str, model: str, messages: Sequence[dict], params: dict, finish: str,
                    error: str | None, ip: str | None) -> str | None:
        """Store one conversation; returns why it could not be stored (shown to the user), or None.

        A storage failure must not take the chat down, but it must not pass silently either.
        """
        served = self.client.describe(model) or {}
        try:
            await asyncio.to_thread(self.store.save_conversation, conv_id, mode=mode, model=model,
                                    messages=_plain(messages), params=params, finish=finish, error=error,
                                    ip_hash=self.store.hash_ip(ip), served_by=served.get("served_by", "local"),
                                    upstream_model=served.get("upstream_model"))
        except Exception as e:  # noqa: BLE001 - reported to the user and logged
            log.error("could not store conversation %s: %s", conv_id, e)
            return str(e) if isinstance(e, VicunaError) else f"{type(e).__name__}: {e}"
        return None

    # -- chat ----------------------------------------------------------------------------
    #
    # The conversation lives in ``state`` (a gr.State: held by the server, per browser session),
    # never in what the browser sends back: the Chatbot is a display. What a model is sent, what
    # is stored and what a vote is checked against are the user's own messages and the models'
    # own answers, so a client cannot put words in a model's mouth.

    def chat_add_user(self, text: str, state: dict | None, ip: str | None) -> tuple[str, list[dict], dict]:
        """Validate the message and append it to the conversation; returns (box, shown history, state)."""
        messages = _messages(state)
        text = self.check_message(text, messages, ip)
        if messages and messages[-1]["role"] == "user":  # the last answer failed: replace that prompt
            messages = messages[:-1]
        messages = [*messages, {"role": "user", "content": text}]
        return "", messages, {**(state or {}), "messages": messages}

    def chat_regenerate(self, state: dict | None, ip: str | None) -> dict:
        """The conversation to answer again: without the last answer, or as is when that answer failed."""
        messages = _messages(state)
        if not messages:
            raise WebError("Nothing to regenerate", "Send a message first; Regenerate replaces the last answer.")
        self.check_rate(ip)
        return {**state, "messages": messages[:-1] if messages[-1]["role"] == "assistant" else messages}

    async def chat_stream(self, state: dict | None, model: str | None, temperature: float, top_p: float,
                          max_tokens: float, ip: str | None, stop_key: str | None = None
                          ) -> AsyncIterator[tuple[list[dict], str, dict | None]]:
        """Stream the answer to the last user message: yields (shown history, status, state).

        ``request_stop(stop_key)`` ends it early; the partial answer stays (stored as "stopped").
        """
        messages = _messages(state)
        if not messages or messages[-1]["role"] != "user":
            yield messages, "", state
            return
        if not model:
            yield messages, ("**No model selected**: pick one in *Model* (press *↻ Models* if the list is "
                             "empty)."), state
            return
        if state.get("model") != model:  # another model: a new stored conversation (the history stays)
            state = {**state, "conv_id": uuid.uuid4().hex, "model": model}
        params = self.params(temperature, top_p, max_tokens)
        answer = {"role": "assistant", "content": ""}
        shown = [*messages, answer]
        finish, error, status = "cancelled", None, None
        stop = self._begin(stop_key)

        def out(status_line: str):
            return shown, status_line, {**state, "messages": shown}

        try:
            yield out(f"*{model} is answering…*")
            async for piece in until_stopped(self.stream(model, messages, params), stop.event):
                answer["content"] += piece
                yield out(f"*{model} is answering…*")
            if stop.event.is_set():
                finish = "stopped"
                status = "*Stopped.*" if stop.reason == "stop" else None  # after Clear nothing more is shown
            else:
                finish, status = "stop", ""
        except Exception as e:
            if not isinstance(e, VicunaError):
                log.exception("chat with %s failed", model)
            finish, error = _finish_of(e), error_markdown(e, model)
            status = error
        finally:
            self._end(stop_key, stop)
            if finish != "stop" and not answer["content"]:
                shown = messages  # nothing came: keep the prompt for Send/Regenerate to retry
            problem = await self._save(state["conv_id"], "chat", model, shown, params, finish, error, ip)
        if status is not None:
            yield out(" ".join(x for x in (status, problem and not_stored(problem)) if x))

    def feedback(self, state: dict | None, index: Any, liked: Any, ip: str | None) -> str:
        """Store a 👍/👎/flag on the answer at ``index``; returns a status line."""
        if not state or "conv_id" not in state:
            raise WebError("No conversation", "Rate an answer after the model has replied.")
        if isinstance(index, (list, tuple)):
            index = index[0]
        if liked is True:
            kind, note = "upvote", None
        elif liked is False:
            kind, note = "downvote", None
        elif liked is None or liked == "":
            kind, note = "retract", None
        else:
            kind, note = "flag", str(liked)
        try:
            self.store.add_feedback(conv_id=state["conv_id"], model=state["model"], message_index=int(index),
                                    kind=kind, note=note, ip_hash=self.store.hash_ip(ip))
        except VicunaError as e:
            raise WebError("Feedback not stored", str(e)) from None
        return {"upvote": "Thanks — 👍 recorded.", "downvote": "Thanks — 👎 recorded.",
                "flag": f"Thanks — answer flagged as *{note}*.", "retract": "Feedback withdrawn."}[kind]

    # -- arena (battle and named side-by-side) ---------------------------------------------
    #
    # A round's state: {"mode", "models", "conv_ids", "turns": [side A's messages, side B's],
    # "answered" (a vote is allowed), "voted"}; held by the server, as the chat's.

    async def arena_add_user(self, text: str, state: dict | None, model_a: str | None, model_b: str | None, *,
                             anonymous: bool, ip: str | None) -> tuple[str, list[dict], list[dict], dict]:
        """Validate, start a new round if needed (voted, or other models picked), append the prompt to both sides."""
        mode = "battle" if anonymous else "side_by_side"
        if state and (state.get("voted") or (not anonymous and state["models"] != [model_a, model_b])):
            state = None
        text = self.check_message(text, state["turns"][0] if state else [], ip)
        if not state:
            state = {"mode": mode, "models": await self._pair(anonymous, model_a, model_b),
                     "conv_ids": [uuid.uuid4().hex, uuid.uuid4().hex], "voted": False, "turns": [[], []]}
        user = {"role": "user", "content": text}
        # the last answers failed: replace that prompt
        turns = [[*(t[:-1] if t and t[-1]["role"] == "user" else t), dict(user)] for t in state["turns"]]
        return "", turns[0], turns[1], {**state, "turns": turns, "answered": False}

    async def _pair(self, anonymous: bool, model_a: str | None, model_b: str | None) -> list[str]:
        if not anonymous:
            if not model_a or not model_b:
                raise WebError("Pick two models", "Choose a model for side A and one for side B.")
            if model_a == model_b:
                raise WebError("Pick two models", f"Both sides are {model_a}; choose two different models.")
            return [model_a, model_b]
        try:
            served = await self.models()
        except Exception as e:
            raise WebError(*describe_error(e, "the model server")) from None
        if len(served) < 2:
            raise WebError("Arena unavailable",
                           f"A battle needs two models; the server has {len(served)} ({', '.join(served) or 'none'}).")
        return self._draw(served)

    def _draw(self, served: list[str]) -> list[str]:
        """Two distinct models, each drawn with probability proportional to its arena weight (default 1),
        in random order (a new model with a larger weight gets more battles)."""
        weights = self.settings.weights()
        pool = [m for m in served if weights.get(m, 1.0) > 0]
        if len(pool) < 2:
            raise WebError("Arena unavailable", f"A battle needs two models with an arena weight above 0; "
                                                f"{len(pool)} of the {len(served)} served have one.")
        first = self.rng.choices(pool, [weights.get(m, 1.0) for m in pool])[0]
        rest = [m for m in pool if m != first]
        pair = [first, self.rng.choices(rest, [weights.get(m, 1.0) for m in rest])[0]]
        self.rng.shuffle(pair)
        return pair

    async def arena_stream(self, state: dict | None, temperature: float | None, top_p: float | None,
                           max_tokens: float | None, ip: str | None, stop_key: str | None = None
                           ) -> AsyncIterator[tuple[list[dict], list[dict], str, dict | None]]:
        """Stream both answers at once: yields (shown A, shown B, status, state).

        ``state["answered"]`` turns true (votes allowed) once both answers ended, or were stopped
        with some text on both sides — and both conversations are stored. A battle ignores the
        sampling arguments (:meth:`battle_params`).
        """
        turns = state["turns"] if state else [[], []]
        if not turns[0] or turns[0][-1]["role"] != "user":
            yield turns[0], turns[1], "", state
            return
        battle = state["mode"] == "battle"
        params = self.battle_params() if battle else self.params(temperature, top_p, max_tokens)
        models = state["models"]
        label = (lambda i: f"model {'AB'[i]}") if battle else (lambda i: models[i])
        answers = [{"role": "assistant", "content": ""}, {"role": "assistant", "content": ""}]
        shown = [[*turns[i], answers[i]] for i in range(2)]
        streams = [self.stream(models[i], _plain(turns[i]), params) for i in range(2)]
        errors: list[str | None] = [None, None]
        finish = ["cancelled", "cancelled"]
        ok, status = False, None
        stop = self._begin(stop_key)

        def out(status_line: str, answered: bool = False):
            return shown[0], shown[1], status_line, {**state, "turns": shown, "answered": answered}

        try:
            yield out("*Both models are answering…*")
            async for i, piece, err in until_stopped(merge_streams(streams), stop.event):
                if piece is not None:
                    answers[i]["content"] += piece
                elif err is not None:
                    if not isinstance(err, VicunaError):
                        log.error("arena: %s failed: %r", models[i], err)
                    # In a battle the name stays hidden: describe the failure of "model A".
                    errors[i] = error_markdown(err, label(i))
                    if battle:
                        for j in range(2):
                            errors[i] = errors[i].replace(models[j], label(j))
                    finish[i] = _finish_of(err)
                else:
                    finish[i] = "stop"
                yield out(" ".join(dict.fromkeys(e for e in errors if e)) or "*Both models are answering…*")
            stopped = stop.event.is_set()
            if stopped:
                finish = ["stopped" if f == "cancelled" else f for f in finish]
            ok = not any(errors) and (not stopped or all(a["content"] for a in answers))
            if stopped and stop.reason != "stop":
                status = None  # New round: nothing more is shown
            elif not ok:
                status = " ".join(dict.fromkeys(e for e in errors if e)) or "*Stopped before both models answered.*"
            else:
                status = ("*Stopped.* " if stopped else "") + "Vote for the better answer (or keep chatting)."
        finally:
            self._end(stop_key, stop)
            if not ok:  # drop both answers, keep the prompt: the next Send retries it on both sides
                shown = [list(t) for t in turns]
            problems = await asyncio.gather(*(
                self._save(state["conv_ids"][i], state["mode"], models[i], shown[i], params, finish[i], errors[i], ip)
                for i in range(2)))
        if status is not None:
            problem = next((p for p in problems if p), None)
            if problem:  # a vote needs both conversations in the database
                ok, status = False, not_stored(problem) + " No vote can be cast on this round."
            yield out(status, answered=ok)

    async def vote(self, state: dict | None, winner: str, ip: str | None) -> tuple[str, dict]:
        """Store the vote; returns (Markdown revealing the names, new state)."""
        if not state or not state.get("answered"):
            raise WebError("Nothing to vote on", "Send a prompt and wait for both answers first.")
        if state.get("voted"):
            raise WebError("Already voted", "This round has a vote; send a new prompt to start the next round.")
        identity = self.store.hash_ip(ip)
        wait = self.vote_limiter.check(identity)
        if wait is not None:
            s = self.settings
            raise WebError("Vote limit reached", f"You cast {s.vote_limit} votes in the last "
                                                 f"{s.vote_window / 60:.0f} minutes. Try again in "
                                                 f"{max(1, round(wait / 60))} min.")
        models = state["models"]
        anonymous = state["mode"] == "battle"
        void = None
        if anonymous:
            try:
                names = set(await self.models())
            except Exception:  # the list is only for the leak check; the battle's names suffice
                names = set()
            answers = {f"model {side}": [message_text(m["content"]) for m in turns if m["role"] == "assistant"]
                       for side, turns in zip("AB", state["turns"])}
            upstreams = {(self.client.describe(m) or {}).get("upstream_model") for m in models} - {None}
            void = identity_leak(answers, names | set(models) | upstreams, self.settings.identity_words)
        try:
            await asyncio.to_thread(
                self.store.add_vote, mode=state["mode"], model_a=models[0], model_b=models[1],
                conv_a=state["conv_ids"][0], conv_b=state["conv_ids"][1], winner=winner, anonymous=anonymous,
                void_reason=void, ip_hash=identity,
            )
        except VicunaError as e:
            raise WebError("Vote not stored", str(e)) from None
        lines = [f"### Model A: **{models[0]}** · Model B: **{models[1]}**", f"Your vote: **{VOTES[winner]}**."]
        if void:
            lines.append(f"This vote is stored but **void** (not counted): {void}.")
        lines.append("Type a new prompt (or press *New round*) to play again.")
        return "\n\n".join(lines), {**state, "voted": True}

    # -- leaderboard -----------------------------------------------------------------------

    def leaderboard(self, rounds: float, include_named: bool, online: bool):
        """(ratings Markdown, win-rate Markdown, matplotlib figure) from the stored votes."""
        rounds = int(rounds or self.settings.bootstrap_rounds)
        if not 1 <= rounds <= 100_000:
            raise WebError("Bad bootstrap rounds", f"Bootstrap rounds must be between 1 and 100000, got {rounds}.")
        try:
            battles = self.store.battles(include_named=include_named)
        except VicunaError as e:
            raise WebError("Leaderboard unavailable", str(e)) from None
        lb = compute_leaderboard(battles, rounds=rounds, online=online)
        return leaderboard_markdown(lb), win_rate_markdown(lb), leaderboard_figure(lb)

    # -- Gradio wiring ---------------------------------------------------------------------

    def build(self):
        """The Gradio Blocks (tabs: Chat, Arena (battle), Side-by-side (named), Leaderboard; with
        ``arena_only`` just the battle and the leaderboard).

        No event reads a Chatbot: the conversations are in gr.State (server-side), the Chatbots only
        show them.
        """
        gr = _gradio()

        s = self.settings

        def ip_of(request: gr.Request | None) -> str | None:
            client = getattr(request, "client", None)
            return getattr(client, "host", None)

        def key_of(request: gr.Request | None, tab: str) -> str | None:
            """Stop key: one running generation per browser session and tab."""
            session = getattr(request, "session_hash", None)
            return f"{session}:{tab}" if session else None

        def refused(e: WebError) -> str:
            """Show a refusal where the user looks (the status line, plus a toast), not as a red "Error" overlay."""
            gr.Warning(str(e), title=e.title)
            return f"**{e.title}**: {e}"

        def sampling_controls():
            """(model defaults?, temperature, top p, max new tokens). With "model defaults" ticked (the
            default) temperature and top p are left to the model's generation_config; moving either
            slider unticks it."""
            with gr.Accordion("Parameters", open=False):
                defaults = gr.Checkbox(True, label="Model defaults", info="the model's own temperature and top p")
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature",
                                        info="0 = always the most likely token")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p")
                max_tokens = gr.Slider(1, s.max_tokens_limit, value=min(s.max_tokens, s.max_tokens_limit), step=1,
                                       label="Max new tokens")
            for slider in (temperature, top_p):
                slider.input(lambda: False, None, defaults, queue=False, show_progress="hidden")
            return defaults, temperature, top_p, max_tokens

        pickers: list = []  # model dropdowns: (component, which default: 0 = first model, 1 = second)

        async def refresh_models():
            try:
                names = await self.models()
            except Exception as e:
                title, message = describe_error(e, "the model server")
                gr.Warning(message, title=f"Model list unavailable: {title}")
                names = []
            defaults = (names[0] if names else None, names[1] if len(names) > 1 else (names[0] if names else None))
            return tuple(gr.Dropdown(choices=names, value=defaults[which]) for _, which in pickers)

        with gr.Blocks(title=s.title, analytics_enabled=False) as demo:
            gr.Markdown(
                f"# {s.title}\n" + ("Compare two anonymous models in the **Arena** and see the **Leaderboard** "
                                    "built from the votes." if s.arena_only else
                                    "Chat with the served models, compare two of them blind in the **Arena**, "
                                    "and see the **Leaderboard** built from the votes.")
                + " Conversations and votes are stored to build the leaderboard (with a salted hash of your IP "
                "address, never the address itself)."
            )
            refresh = None
            with gr.Tabs():
                if not s.arena_only:
                    refresh = self._chat_tab(gr, pickers, ip_of, key_of, refused, sampling_controls)
                for anonymous in (True,) if s.arena_only else (True, False):
                    self._arena_tab(gr, anonymous, pickers, ip_of, key_of, refused, sampling_controls)
                self._leaderboard_tab(gr, refused)
            if pickers:
                outputs = [c for c, _ in pickers]
                refresh.click(refresh_models, None, outputs)
                demo.load(refresh_models, None, outputs)
        demo.queue(default_concurrency_limit=s.concurrency)
        return demo

    def _chat_tab(self, gr, pickers, ip_of, key_of, refused, sampling_controls):
        """The Chat tab; returns its ↻ Models button."""
        s = self.settings
        with gr.Tab("Chat", id="chat"):
            with gr.Row():
                chat_model = gr.Dropdown([], label="Model", elem_id="chat-model", scale=4)
                refresh = gr.Button("↻ Models", scale=1, elem_id="refresh-models")
            pickers.append((chat_model, 0))
            chatbot = gr.Chatbot(label="Chat", elem_id="chat-bot", height=380,
                                 feedback_options=("Like", "Dislike", *FLAG_REASONS))
            chat_status = gr.Markdown("", elem_id="chat-status")
            with gr.Row():
                chat_box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                      scale=6, elem_id="chat-input", max_length=s.max_input_chars * 2)
                chat_send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
            with gr.Row():
                chat_stop = gr.Button("Stop", elem_id="chat-stop")
                chat_regen = gr.Button("Regenerate", elem_id="chat-regenerate")
                chat_clear = gr.Button("Clear", elem_id="chat-clear")
            sampling = sampling_controls()
            chat_state = gr.State(None)

            async def chat_send(text, state, model, d, t, p, n, request: gr.Request):
                t, p = (None, None) if d else (t, p)
                ip = ip_of(request)
                try:
                    box, shown, state = self.chat_add_user(text, state, ip)
                except WebError as e:
                    yield gr.skip(), gr.skip(), refused(e), gr.skip()
                    return
                yield box, shown, "", state  # the prompt shows at once
                async for h, status, st in self.chat_stream(state, model, t, p, n, ip, key_of(request, "chat")):
                    yield gr.skip(), h, status, st

            async def chat_regen_fn(state, model, d, t, p, n, request: gr.Request):
                t, p = (None, None) if d else (t, p)
                ip = ip_of(request)
                try:
                    state = self.chat_regenerate(state, ip)
                except WebError as e:
                    yield gr.skip(), refused(e), gr.skip()
                    return
                async for out in self.chat_stream(state, model, t, p, n, ip, key_of(request, "chat")):
                    yield out

            params_in = [chat_model, *sampling]
            for trigger in (chat_box.submit, chat_send_btn.click):
                trigger(chat_send, [chat_box, chat_state, *params_in], [chat_box, chatbot, chat_status, chat_state],
                        show_progress="hidden")
            chat_regen.click(chat_regen_fn, [chat_state, *params_in], [chatbot, chat_status, chat_state],
                             show_progress="hidden")

            async def chat_stop_fn(request: gr.Request):
                self.request_stop(key_of(request, "chat"))

            async def chat_clear_fn(request: gr.Request):
                self.request_stop(key_of(request, "chat"), "clear")
                return [], None, ""

            chat_stop.click(chat_stop_fn, None, None, queue=False)
            chat_clear.click(chat_clear_fn, None, [chatbot, chat_state, chat_status], queue=False)

            def on_like(state, data: gr.LikeData, request: gr.Request):
                try:
                    return self.feedback(state, data.index, data.liked, ip_of(request))
                except WebError as e:
                    return refused(e)

            chatbot.like(on_like, [chat_state], [chat_status], show_progress="hidden")
        return refresh

    def _arena_tab(self, gr, anonymous, pickers, ip_of, key_of, refused, sampling_controls):
        """Arena (battle: anonymous, the server's sampling) or Side-by-side (named: picked models, sliders)."""
        s = self.settings
        key = "arena" if anonymous else "sbs"
        with gr.Tab("Arena (battle)" if anonymous else "Side-by-side (named)", id=key):
            if anonymous:
                gr.Markdown("Two anonymous models answer the same prompt. Vote for the better one; their names "
                            "are revealed after your vote. A vote is void if an answer reveals which model "
                            "wrote it.")
                picks = []
            else:
                gr.Markdown("Pick two models and compare their answers to the same prompt.")
                with gr.Row():
                    picks = [gr.Dropdown([], label="Model A", elem_id="sbs-model-a"),
                             gr.Dropdown([], label="Model B", elem_id="sbs-model-b")]
                pickers.extend(zip(picks, (0, 1)))
            with gr.Row():
                bot_a = gr.Chatbot(label="Model A", elem_id=f"{key}-a", height=340, feedback_options=None)
                bot_b = gr.Chatbot(label="Model B", elem_id=f"{key}-b", height=340, feedback_options=None)
            reveal = gr.Markdown("", elem_id=f"{key}-reveal")
            status = gr.Markdown("", elem_id=f"{key}-status")
            with gr.Row():
                vote_buttons = {w: gr.Button(("← " if w == "model_a" else "→ " if w == "model_b" else "") + label,
                                             interactive=False, elem_id=f"{key}-vote-{VOTE_IDS[w]}")
                                for w, label in VOTES.items()}
            with gr.Row():
                box = gr.Textbox(placeholder="Type a prompt for both models and press Enter", show_label=False,
                                 scale=6, elem_id=f"{key}-input", max_length=s.max_input_chars * 2)
                send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{key}-send")
            with gr.Row():
                stop = gr.Button("Stop", elem_id=f"{key}-stop")
                new_round = gr.Button("New round", elem_id=f"{key}-new")
            sliders = [] if anonymous else list(sampling_controls())  # a battle samples with the server's settings
            state = gr.State(None)
            buttons = list(vote_buttons.values())

            def enable_votes(enabled):
                return [gr.Button(interactive=enabled)] * len(buttons)

            async def send_round(text, st, model_a, model_b, t, p, n, request):
                ip = ip_of(request)
                try:
                    box_, shown_a, shown_b, st = await self.arena_add_user(text, st, model_a, model_b,
                                                                           anonymous=anonymous, ip=ip)
                except WebError as e:
                    yield (gr.skip(),) * 4 + (gr.skip(), refused(e)) + (gr.skip(),) * len(buttons)
                    return
                names = st["models"]
                labels = ("Model A", "Model B") if anonymous else (f"Model A: {names[0]}", f"Model B: {names[1]}")
                yield (box_, gr.Chatbot(value=shown_a, label=labels[0]), gr.Chatbot(value=shown_b, label=labels[1]),
                       st, "", "", *enable_votes(False))
                async for a, b, msg, st2 in self.arena_stream(st, t, p, n, ip, key_of(request, key)):
                    can_vote = bool(st2 and st2.get("answered") and not st2.get("voted"))
                    yield (gr.skip(), a, b, st2, gr.skip(), msg, *enable_votes(can_vote))

            if anonymous:  # no pickers, no sliders
                async def send_fn(text, st, request: gr.Request):
                    async for out in send_round(text, st, None, None, None, None, None, request):
                        yield out
            else:
                async def send_fn(text, st, model_a, model_b, d, t, p, n, request: gr.Request):
                    t, p = (None, None) if d else (t, p)
                    async for out in send_round(text, st, model_a, model_b, t, p, n, request):
                        yield out

            def voter(winner):
                async def do_vote(st, request: gr.Request):
                    try:
                        text, st2 = await self.vote(st, winner, ip_of(request))
                    except WebError as e:
                        return (gr.skip(), refused(e), gr.skip(), *[gr.skip()] * (len(buttons) + 2))
                    a, b = st2["models"]  # revealed: on the answers too
                    return (text, "", st2, *enable_votes(False), gr.Chatbot(label=f"Model A: {a}"),
                            gr.Chatbot(label=f"Model B: {b}"))

                return do_vote

            send_io = dict(inputs=[box, state, *picks, *sliders],
                           outputs=[box, bot_a, bot_b, state, reveal, status, *buttons], show_progress="hidden")
            for trigger in (box.submit, send.click):
                trigger(send_fn, **send_io)

            async def stop_fn(request: gr.Request):
                self.request_stop(key_of(request, key))

            async def new_round_fn(request: gr.Request):
                self.request_stop(key_of(request, key), "clear")
                return (gr.Chatbot(value=[], label="Model A"), gr.Chatbot(value=[], label="Model B"), None, "", "",
                        *enable_votes(False))

            stop.click(stop_fn, None, None, queue=False)
            new_round.click(new_round_fn, None, [bot_a, bot_b, state, reveal, status, *buttons], queue=False)
            for w, btn in vote_buttons.items():
                btn.click(voter(w), [state], [reveal, status, state, *buttons, bot_a, bot_b], show_progress="hidden")

    def _leaderboard_tab(self, gr, refused):
        s = self.settings
        with gr.Tab("Leaderboard", id="leaderboard") as lb_tab:
            with gr.Row():
                rounds = gr.Number(value=s.bootstrap_rounds, precision=0, minimum=1, maximum=100_000,
                                   label="Bootstrap rounds", elem_id="lb-rounds")
                named = gr.Checkbox(False, label="Include named side-by-side votes", visible=not s.arena_only)
                online = gr.Checkbox(False, label="Show online Elo")
                lb_refresh = gr.Button("↻ Refresh", elem_id="lb-refresh")
            lb_table = gr.Markdown("", elem_id="lb-table")
            lb_plot = gr.Plot(label="Ratings with confidence intervals")
            gr.Markdown("#### Win rate (row beats column; ties count ½)")
            lb_matrix = gr.Markdown("", elem_id="lb-matrix")

            def lb_fn(r, inc, onl):
                try:
                    return self.leaderboard(r, inc, onl)
                except WebError as e:
                    return refused(e), gr.skip(), gr.skip()

            lb_io = dict(fn=lb_fn, inputs=[rounds, named, online], outputs=[lb_table, lb_matrix, lb_plot])
            lb_refresh.click(**lb_io)
            lb_tab.select(**lb_io)


# -- mounting and the command line ---------------------------------------------------------


def _gradio():
    """Import Gradio with its telemetry and version look-ups off (servers are often offline)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio

    return gradio


def mount_web(app, client: Any, store: ArenaStore, settings: WebSettings | None = None, *, path: str = "/"):
    """Mount the UI into a FastAPI ``app`` at ``path``. Call after defining the app's own routes."""
    gr = _gradio()

    demo = WebApp(client, store, settings).build()
    return gr.mount_gradio_app(app, demo, path=path, footer_links=[])


def add_web_arguments(parser, *, web_flag: bool = True) -> None:
    """The UI's options, shared by `vicuna serve --web` and `vicuna serve web`."""
    g = parser.add_argument_group("web UI (chat, arena, leaderboard)")
    if web_flag:
        g.add_argument("--web", action="store_true",
                       help="also serve the web UI at / on the same port as the API (chat, arena, leaderboard)")
    d = WebSettings()
    g.add_argument("--arena-db", default="arena.db",
                   help="SQLite file storing conversations, votes and feedback (created if missing; the IP-hash "
                        "salt goes to FILE.salt beside it)")
    g.add_argument("--max-input-chars", type=int, default=d.max_input_chars, help="longest message a user may send")
    g.add_argument("--max-turns", type=int, default=d.max_turns, help="most user messages per conversation")
    g.add_argument("--rate-limit", type=int, default=d.rate_limit,
                   help="messages per client IP per minute (0: unlimited)")
    g.add_argument("--leaderboard-bootstrap", type=int, default=d.bootstrap_rounds,
                   help="default bootstrap rounds for the leaderboard's confidence intervals")
    g.add_argument("--web-concurrency", type=int, default=d.concurrency,
                   help="generations the UI runs at once (the engine batches them)")
    g.add_argument("--identity-words", default="", metavar="WORDS",
                   help="comma-separated words that void a battle vote when an answer contains them, besides the "
                        "served model names and their distinctive parts (e.g. lmsys,openai,anthropic)")
    g.add_argument("--battle-temperature", type=float, default=d.battle_temperature,
                   help="sampling temperature of blind battles (set by the server: a client choosing 0 could "
                        "replay the prompt against the named models and recognise the answers)")
    g.add_argument("--vote-limit", type=int, default=d.vote_limit,
                   help="arena votes per client per hour (0: unlimited)")
    g.add_argument("--arena-weights", default="", metavar="NAME=W,...",
                   help="how often each model is drawn for a battle, relative to the default 1 (e.g. new-model=4 "
                        "to give a new model more battles, old-model=0 to retire one)")
    g.add_argument("--arena-only", action="store_true",
                   help="serve only the blind arena and the leaderboard: no Chat or named side-by-side tab, and "
                        "with `vicuna serve --web` no /v1 API on that port, so no one can query the arena's models "
                        "by name to recognise their answers")
    add_trusted_proxies_argument(g)


def add_trusted_proxies_argument(group) -> None:
    """--trusted-proxies (the web UI and `vicuna serve api`): whose X-Forwarded-For is believed."""
    group.add_argument("--trusted-proxies", default="", metavar="ADDRS",
                       help="comma-separated addresses of reverse proxies whose X-Forwarded-For header names the "
                            "client (e.g. 127.0.0.1 for an nginx on this host); from anyone else the header is "
                            "ignored, so rate and vote limits cannot be dodged by forging it (default: none)")


def settings_from_args(args) -> WebSettings:
    d = WebSettings()
    s = WebSettings(
        max_input_chars=getattr(args, "max_input_chars", d.max_input_chars),
        max_turns=getattr(args, "max_turns", d.max_turns),
        rate_limit=getattr(args, "rate_limit", d.rate_limit),
        bootstrap_rounds=getattr(args, "leaderboard_bootstrap", d.bootstrap_rounds),
        concurrency=getattr(args, "web_concurrency", d.concurrency),
        identity_words=tuple(w.strip() for w in (getattr(args, "identity_words", "") or "").split(",") if w.strip()),
        battle_temperature=getattr(args, "battle_temperature", d.battle_temperature),
        vote_limit=getattr(args, "vote_limit", d.vote_limit),
        arena_only=getattr(args, "arena_only", d.arena_only),
        arena_weights=tuple(w.strip() for w in (getattr(args, "arena_weights", "") or "").split(",") if w.strip()),
    )
    s.weights()  # a malformed entry is a usage error now, not at the first battle
    from ..errors import UsageError

    for name in ("max_input_chars", "max_turns", "bootstrap_rounds", "concurrency"):
        if getattr(s, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in ("rate_limit", "vote_limit"):
        if getattr(s, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (0 = unlimited), got {getattr(s, name)}")
    if not 0 <= s.battle_temperature <= 2:
        raise UsageError(f"--battle-temperature must be in [0, 2], got {s.battle_temperature}")
    return s


def maybe_mount_web(app, client: Any, args):
    """If ``args.web``: mount the UI at / of ``app`` (the OpenAI API app). Returns the app."""
    if not getattr(args, "web", False):
        return app
    store = ArenaStore(getattr(args, "arena_db", "arena.db"))
    settings = settings_from_args(args)
    log.info("web UI at / (arena database %s)", store.path)
    if settings.arena_only:
        app.add_middleware(_NoNamedModels)
    return mount_web(app, client, store, settings)


class _NoNamedModels:
    """ASGI middleware for ``--arena-only``: the API on this port answers 404, so the arena's models
    cannot be asked by name (and their answers recognised in a battle)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            from fastapi.responses import JSONResponse

            body = {"error": {"message": "this server runs a blind arena (--arena-only): its models are not served "
                                         "by name here", "type": "invalid_request_error", "param": None,
                              "code": "not_found"}}
            return await JSONResponse(body, status_code=404)(scope, receive, send)
        return await self.app(scope, receive, send)


def create_web_app(client: Any, store: ArenaStore, settings: WebSettings | None = None):
    """A stand-alone app: the UI at / and ``GET /health``."""
    from fastapi import FastAPI

    app = FastAPI(title="vicuna web")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return mount_web(app, client, store, settings)


def run_web(args) -> int:
    """`vicuna serve web`: the UI in front of a controller."""
    from .cli import controller_url, front_client
    from .client import ControllerClient
    from .server import run_server, trusted_proxies

    settings = settings_from_args(args)
    store = ArenaStore(args.arena_db)
    controller = controller_url(args)
    base = ControllerClient(controller, secret=args.secret or os.environ.get("VICUNA_SECRET") or None) \
        if controller else None
    app = create_web_app(front_client(base, args), store, settings)
    source = " and ".join(x for x in (controller, args.endpoints) if x)
    print(f"web UI on http://{args.host}:{args.port} (models from {source}; arena database {store.path})",
          flush=True)
    # One worker process: Gradio's queue and the rate limiter live in it; run_server keeps lifespan on,
    # which starts Gradio's queue.
    run_server(app, args.host, args.port, "info" if args.debug else "warning",
               trusted_proxies=trusted_proxies(args))
    return 0


def add_web_command(verbs) -> None:
    """Register `vicuna serve web` (called by vicuna.serve.cli)."""
    from ..cli import command

    p = command(
        verbs, "web", run_web, help="web UI (chat, arena, leaderboard) in front of a controller",
        description=(
            "Serve the web UI: Chat (streaming, stop, regenerate, parameters, 👍/👎/flag), Arena (two anonymous\n"
            "models, vote, names revealed after the vote), Side-by-side (named) and Leaderboard (Bradley-Terry\n"
            "ratings with bootstrap intervals). Models come from the controller; every conversation, vote and\n"
            "flag is stored in the SQLite file --arena-db.\n\n"
            "For one machine, `vicuna serve --model-path P --web` serves the API and this UI on one port.\n\n"
            "example:\n"
            "  vicuna serve controller --port 21001 &\n"
            "  vicuna serve worker --model-path lmsys/vicuna-7b-v1.5 --controller http://127.0.0.1:21001 &\n"
            "  vicuna serve web --controller http://127.0.0.1:21001 --port 7860 --arena-db arena.db\n"
            "  # later: vicuna arena leaderboard --db arena.db"
        ),
    )
    p.add_argument("--controller", default=None,
                   help="controller URL (default http://127.0.0.1:21001; none with --endpoints alone)")
    p.add_argument("--secret", default=None, help="shared secret of the controller (or set $VICUNA_SECRET)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    add_web_arguments(p, web_flag=False)
    from .cli import add_upstream_args

    add_upstream_args(p)
