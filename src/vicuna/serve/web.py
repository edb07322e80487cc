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
from ..errors import VicunaError
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
    title: str = "Vicuna"


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

    def params(self, temperature: float, top_p: float, max_tokens: float) -> dict[str, Any]:
        return {"temperature": float(temperature), "top_p": float(top_p), "max_tokens": int(max_tokens)}

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

    async def _save(self, conv_id: str, mode: str, model: str, history: Sequence[dict], params: dict, finish: str,
                    error: str | None, ip: str | None) -> None:
        try:
            await asyncio.to_thread(self.store.save_conversation, conv_id, mode=mode, model=model,
                                    messages=_plain(history), params=params, finish=finish, error=error,
                                    ip_hash=self.store.hash_ip(ip))
        except Exception:  # a storage failure must not take the chat down; it is logged loudly
            log.exception("could not store conversation %s", conv_id)

    # -- chat ----------------------------------------------------------------------------

    def chat_add_user(self, text: str, history: list[dict], ip: str | None) -> tuple[str, list[dict]]:
        text = self.check_message(text, history, ip)
        if history and history[-1].get("role") == "user":  # the last answer failed: replace that prompt
            history = history[:-1]
        return "", [*history, {"role": "user", "content": text}]

    def chat_regenerate(self, history: list[dict], ip: str | None) -> list[dict]:
        """The history to answer again: without the last answer, or as is when that answer failed."""
        if not history:
            raise WebError("Nothing to regenerate", "Send a message first; Regenerate replaces the last answer.")
        self.check_rate(ip)
        return history[:-1] if history[-1].get("role") == "assistant" else list(history)

    async def chat_stream(self, history: list[dict], state: dict | None, model: str | None, temperature: float,
                          top_p: float, max_tokens: float, ip: str | None, stop_key: str | None = None
                          ) -> AsyncIterator[tuple[list[dict], str, dict | None]]:
        """Stream the answer to the last user message: yields (history, status, state).

        ``request_stop(stop_key)`` ends it early; the partial answer stays (stored as "stopped").
        """
        if not history or history[-1].get("role") != "user":
            yield history, "", state
            return
        if not model:
            yield history, "**No model selected**: pick one in *Model* (press *↻ Models* if the list is empty).", state
            return
        if not state or state.get("model") != model:
            state = {"conv_id": uuid.uuid4().hex, "model": model}
        params = self.params(temperature, top_p, max_tokens)
        messages = _plain(history)
        answer = {"role": "assistant", "content": ""}
        history = [*history, answer]
        finish, error = "cancelled", None
        stop = self._begin(stop_key)
        try:
            yield history, f"*{model} is answering…*", state
            async for piece in until_stopped(self.stream(model, messages, params), stop.event):
                answer["content"] += piece
                yield history, f"*{model} is answering…*", state
            if stop.event.is_set():
                finish = "stopped"
                if not answer["content"]:
                    history = history[:-1]  # nothing came: keep the prompt for Send/Regenerate to retry
                if stop.reason == "stop":  # after Clear nothing more is shown
                    yield history, "*Stopped.*", state
                return
            finish = "stop"
            yield history, "", state
        except Exception as e:
            if not isinstance(e, VicunaError):
                log.exception("chat with %s failed", model)
            finish, error = "error", error_markdown(e, model)
            if not answer["content"]:
                history = history[:-1]  # keep the prompt so Regenerate/Send can retry it
            yield history, error, state
        finally:
            self._end(stop_key, stop)
            await self._save(state["conv_id"], "chat", model, history, params, finish, error, ip)

    def feedback(self, state: dict | None, index: Any, liked: Any, ip: str | None) -> str:
        """Store a 👍/👎/flag on the answer at ``index``; returns a status line."""
        if not state:
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
        self.store.add_feedback(conv_id=state["conv_id"], model=state["model"], message_index=int(index), kind=kind,
                                note=note, ip_hash=self.store.hash_ip(ip))
        return {"upvote": "Thanks — 👍 recorded.", "downvote": "Thanks — 👎 recorded.",
                "flag": f"Thanks — answer flagged as *{note}*.", "retract": "Feedback withdrawn."}[kind]

    # -- arena (battle and named side-by-side) ---------------------------------------------

    async def arena_add_user(self, text: str, hist_a: list[dict], hist_b: list[dict], state: dict | None,
                             model_a: str | None, model_b: str | None, *, anonymous: bool, ip: str | None
                             ) -> tuple[str, list[dict], list[dict], dict]:
        """Validate, start a new round if needed (voted, or other models picked), append the prompt to both sides."""
        mode = "battle" if anonymous else "side_by_side"
        if state and not anonymous and state["models"] != [model_a, model_b]:
            state = None
        if not state or state.get("voted"):
            hist_a, hist_b = [], []
        text = self.check_message(text, hist_a, ip)
        if not state or state.get("voted"):
            if anonymous:
                try:
                    served = await self.models()
                except Exception as e:
                    raise WebError(*describe_error(e, "the model server")) from None
                if len(served) < 2:
                    raise WebError("Arena unavailable",
                                   f"A battle needs two models; the server has {len(served)} "
                                   f"({', '.join(served) or 'none'}).")
                pair = self.rng.sample(served, 2)
            else:
                if not model_a or not model_b:
                    raise WebError("Pick two models", "Choose a model for side A and one for side B.")
                if model_a == model_b:
                    raise WebError("Pick two models", f"Both sides are {model_a}; choose two different models.")
                pair = [model_a, model_b]
            state = {"mode": mode, "models": pair, "conv_ids": [uuid.uuid4().hex, uuid.uuid4().hex],
                     "voted": False, "answered": False}
        if hist_a and hist_a[-1].get("role") == "user":  # the last answers failed: replace that prompt
            hist_a, hist_b = hist_a[:-1], hist_b[:-1]
        user = {"role": "user", "content": text}
        state = {**state, "answered": False}
        return "", [*hist_a, user], [*hist_b, dict(user)], state

    async def arena_stream(self, hist_a: list[dict], hist_b: list[dict], state: dict | None, temperature: float,
                           top_p: float, max_tokens: float, ip: str | None, stop_key: str | None = None
                           ) -> AsyncIterator[tuple[list[dict], list[dict], str, dict | None]]:
        """Stream both answers at once: yields (hist_a, hist_b, status, state).

        ``state["answered"]`` turns true (votes allowed) once both answers ended, or were
        stopped with some text on both sides.
        """
        if not state or not hist_a or hist_a[-1].get("role") != "user":
            yield hist_a, hist_b, "", state
            return
        params = self.params(temperature, top_p, max_tokens)
        sides = ("A", "B")
        models = state["models"]
        label = (lambda i: f"model {sides[i]}") if state["mode"] == "battle" else (lambda i: models[i])
        hists = [list(hist_a), list(hist_b)]
        answers = [{"role": "assistant", "content": ""}, {"role": "assistant", "content": ""}]
        streams = [self.stream(models[i], _plain(hists[i]), params) for i in range(2)]
        for i in range(2):
            hists[i].append(answers[i])
        errors: list[str | None] = [None, None]
        finish = ["cancelled", "cancelled"]
        stop = self._begin(stop_key)
        try:
            yield hists[0], hists[1], "*Both models are answering…*", state
            async for i, piece, err in until_stopped(merge_streams(streams), stop.event):
                if piece is not None:
                    answers[i]["content"] += piece
                elif err is not None:
                    if not isinstance(err, VicunaError):
                        log.error("arena: %s failed: %r", models[i], err)
                    # In a battle the name stays hidden: describe the failure of "model A".
                    errors[i] = error_markdown(err, label(i))
                    if state["mode"] == "battle":
                        for j in range(2):
                            errors[i] = errors[i].replace(models[j], label(j))
                    finish[i] = "error"
                else:
                    finish[i] = "stop"
                yield hists[0], hists[1], " ".join(e for e in errors if e) or "*Both models are answering…*", state
            if stop.event.is_set():
                finish = ["stopped" if f == "cancelled" else f for f in finish]
                if stop.reason != "stop":  # New round: nothing more is shown
                    return
            ok = not any(errors) and (not stop.event.is_set() or all(a["content"] for a in answers))
            if not ok:  # drop both answers, keep the prompt: the next Send retries it on both sides
                hists = [h[:-1] for h in hists]
            state = {**state, "answered": ok}
            if not ok:
                status = " ".join(e for e in errors if e) or "*Stopped before both models answered.*"
            elif stop.event.is_set():
                status = "*Stopped.* Vote for the better answer (or keep chatting)."
            else:
                status = "Vote for the better answer (or keep chatting)."
            yield hists[0], hists[1], status, state
        finally:
            self._end(stop_key, stop)
            for i in range(2):
                await self._save(state["conv_ids"][i], state["mode"], models[i], hists[i], params, finish[i],
                                 errors[i], ip)

    async def vote(self, state: dict | None, hist_a: list[dict], hist_b: list[dict], winner: str, ip: str | None
                   ) -> tuple[str, dict]:
        """Store the vote; returns (Markdown revealing the names, new state)."""
        if not state or not state.get("answered"):
            raise WebError("Nothing to vote on", "Send a prompt and wait for both answers first.")
        if state.get("voted"):
            raise WebError("Already voted", "This round has a vote; send a new prompt to start the next round.")
        models = state["models"]
        anonymous = state["mode"] == "battle"
        void = None
        if anonymous:
            try:
                names = set(await self.models())
            except Exception:  # the list is only for the leak check; the battle's names suffice
                names = set()
            answers = {f"model {side}": [message_text(m.get("content")) for m in h if m.get("role") == "assistant"]
                       for side, h in zip("AB", (hist_a, hist_b))}
            void = identity_leak(answers, names | set(models), self.settings.identity_words)
        await asyncio.to_thread(
            self.store.add_vote, mode=state["mode"], model_a=models[0], model_b=models[1],
            conv_a=state["conv_ids"][0], conv_b=state["conv_ids"][1], winner=winner, anonymous=anonymous,
            void_reason=void, ip_hash=self.store.hash_ip(ip),
        )
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
        battles = self.store.battles(include_named=include_named)
        lb = compute_leaderboard(battles, rounds=rounds, online=online)
        return leaderboard_markdown(lb), win_rate_markdown(lb), leaderboard_figure(lb)

    # -- Gradio wiring ---------------------------------------------------------------------

    def build(self):
        """The Gradio Blocks (tabs: Chat, Arena (battle), Side-by-side (named), Leaderboard)."""
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
            with gr.Accordion("Parameters", open=False):
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature",
                                        info="0 = always the most likely token")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p")
                max_tokens = gr.Slider(1, s.max_tokens_limit, value=min(s.max_tokens, s.max_tokens_limit), step=1,
                                       label="Max new tokens")
            return temperature, top_p, max_tokens

        async def refresh_models():
            try:
                names = await self.models()
            except Exception as e:
                title, message = describe_error(e, "the model server")
                gr.Warning(message, title=f"Model list unavailable: {title}")
                names = []
            a = names[0] if names else None
            b = names[1] if len(names) > 1 else a
            return (gr.Dropdown(choices=names, value=a), gr.Dropdown(choices=names, value=a),
                    gr.Dropdown(choices=names, value=b))

        with gr.Blocks(title=s.title, analytics_enabled=False) as demo:
            gr.Markdown(
                f"# {s.title}\nChat with the served models, compare two of them blind in the **Arena**, "
                "and see the **Leaderboard** built from the votes. Conversations and votes are stored to build "
                "the leaderboard (with a salted hash of your IP address, never the address itself)."
            )
            with gr.Tabs():
                # ---- Chat -------------------------------------------------------------------
                with gr.Tab("Chat", id="chat"):
                    with gr.Row():
                        chat_model = gr.Dropdown([], label="Model", elem_id="chat-model", scale=4)
                        refresh = gr.Button("↻ Models", scale=1, elem_id="refresh-models")
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
                    temperature, top_p, max_tokens = sampling_controls()
                    chat_state = gr.State(None)

                    async def chat_send(text, history, state, model, t, p, n, request: gr.Request):
                        ip = ip_of(request)
                        try:
                            box, history = self.chat_add_user(text, history or [], ip)
                        except WebError as e:
                            yield gr.skip(), gr.skip(), refused(e), gr.skip()
                            return
                        yield box, history, "", state  # the prompt shows at once
                        async for h, status, st in self.chat_stream(history, state, model, t, p, n, ip,
                                                                    key_of(request, "chat")):
                            yield gr.skip(), h, status, st

                    async def chat_regen_fn(history, state, model, t, p, n, request: gr.Request):
                        ip = ip_of(request)
                        try:
                            history = self.chat_regenerate(history or [], ip)
                        except WebError as e:
                            yield gr.skip(), refused(e), gr.skip()
                            return
                        async for out in self.chat_stream(history, state, model, t, p, n, ip, key_of(request, "chat")):
                            yield out

                    params_in = [chat_model, temperature, top_p, max_tokens]
                    for trigger in (chat_box.submit, chat_send_btn.click):
                        trigger(chat_send, [chat_box, chatbot, chat_state, *params_in],
                                [chat_box, chatbot, chat_status, chat_state], show_progress="hidden")
                    chat_regen.click(chat_regen_fn, [chatbot, chat_state, *params_in],
                                     [chatbot, chat_status, chat_state], show_progress="hidden")
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

                # ---- Arena (battle) and Side-by-side (named) ---------------------------------
                arena_outputs = {}
                for anonymous in (True, False):
                    key = "arena" if anonymous else "sbs"
                    with gr.Tab("Arena (battle)" if anonymous else "Side-by-side (named)", id=key):
                        if anonymous:
                            gr.Markdown("Two anonymous models answer the same prompt. Vote for the better one; "
                                        "their names are revealed after your vote. A vote is void if an answer "
                                        "reveals which model wrote it.")
                            pick_a = pick_b = gr.State(None)
                        else:
                            gr.Markdown("Pick two models and compare their answers to the same prompt.")
                            with gr.Row():
                                pick_a = gr.Dropdown([], label="Model A", elem_id="sbs-model-a")
                                pick_b = gr.Dropdown([], label="Model B", elem_id="sbs-model-b")
                        with gr.Row():
                            bot_a = gr.Chatbot(label="Model A", elem_id=f"{key}-a", height=340, feedback_options=None)
                            bot_b = gr.Chatbot(label="Model B", elem_id=f"{key}-b", height=340, feedback_options=None)
                        reveal = gr.Markdown("", elem_id=f"{key}-reveal")
                        status = gr.Markdown("", elem_id=f"{key}-status")
                        with gr.Row():
                            vote_buttons = {
                                w: gr.Button(("← " if w == "model_a" else "→ " if w == "model_b" else "")
                                             + label, interactive=False, elem_id=f"{key}-vote-{VOTE_IDS[w]}")
                                for w, label in VOTES.items()
                            }
                        with gr.Row():
                            box = gr.Textbox(placeholder="Type a prompt for both models and press Enter",
                                             show_label=False, scale=6, elem_id=f"{key}-input",
                                             max_length=s.max_input_chars * 2)
                            send = gr.Button("Send", variant="primary", scale=1, elem_id=f"{key}-send")
                        with gr.Row():
                            stop = gr.Button("Stop", elem_id=f"{key}-stop")
                            new_round = gr.Button("New round", elem_id=f"{key}-new")
                        a_t, a_p, a_n = sampling_controls()
                        state = gr.State(None)
                        buttons = list(vote_buttons.values())

                        def make_handlers(anonymous=anonymous, n_buttons=len(buttons)):
                            def vote_buttons_update(enabled):
                                return [gr.Button(interactive=enabled)] * n_buttons

                            async def send(text, ha, hb, st, ma, mb, t, p, n, request: gr.Request):
                                ip = ip_of(request)
                                try:
                                    box, ha, hb, st = await self.arena_add_user(text, ha or [], hb or [], st, ma, mb,
                                                                                anonymous=anonymous, ip=ip)
                                except WebError as e:
                                    yield (gr.skip(),) * 5 + (refused(e),) + (gr.skip(),) * n_buttons
                                    return
                                names = st["models"]
                                labels = (("Model A", "Model B") if anonymous
                                          else (f"Model A: {names[0]}", f"Model B: {names[1]}"))
                                yield (box, gr.Chatbot(value=ha, label=labels[0]),
                                       gr.Chatbot(value=hb, label=labels[1]),
                                       st, "", "", *vote_buttons_update(False))
                                async for a, b, msg, st2 in self.arena_stream(ha, hb, st, t, p, n, ip,
                                                                               key_of(request, key)):
                                    can_vote = bool(st2 and st2.get("answered") and not st2.get("voted"))
                                    yield (gr.skip(), a, b, st2, gr.skip(), msg, *vote_buttons_update(can_vote))

                            def voter(winner):
                                async def do_vote(st, ha, hb, request: gr.Request):
                                    try:
                                        text, st2 = await self.vote(st, ha or [], hb or [], winner, ip_of(request))
                                    except WebError as e:
                                        return (gr.skip(), refused(e), gr.skip(), *[gr.skip()] * (n_buttons + 2))
                                    a, b = st2["models"]  # revealed: on the answers too
                                    return (text, "", st2, *vote_buttons_update(False),
                                            gr.Chatbot(label=f"Model A: {a}"), gr.Chatbot(label=f"Model B: {b}"))

                                return do_vote

                            return send, voter

                        send_fn, voter = make_handlers()
                        send_io = dict(inputs=[box, bot_a, bot_b, state, pick_a, pick_b, a_t, a_p, a_n],
                                       outputs=[box, bot_a, bot_b, state, reveal, status, *buttons],
                                       show_progress="hidden")
                        for trigger in (box.submit, send.click):
                            trigger(send_fn, **send_io)
                        async def stop_fn(request: gr.Request, key=key):
                            self.request_stop(key_of(request, key))

                        async def new_round_fn(request: gr.Request, key=key, n=len(buttons)):
                            self.request_stop(key_of(request, key), "clear")
                            return (gr.Chatbot(value=[], label="Model A"), gr.Chatbot(value=[], label="Model B"),
                                    None, "", "", *[gr.Button(interactive=False)] * n)

                        stop.click(stop_fn, None, None, queue=False)
                        new_round.click(new_round_fn, None, [bot_a, bot_b, state, reveal, status, *buttons],
                                        queue=False)
                        for w, btn in vote_buttons.items():
                            btn.click(voter(w), [state, bot_a, bot_b], [reveal, status, state, *buttons, bot_a, bot_b],
                                      show_progress="hidden")
                        arena_outputs[key] = (pick_a, pick_b)

                # ---- Leaderboard ------------------------------------------------------------
                with gr.Tab("Leaderboard", id="leaderboard") as lb_tab:
                    with gr.Row():
                        rounds = gr.Number(value=s.bootstrap_rounds, precision=0, minimum=1, maximum=100_000,
                                           label="Bootstrap rounds", elem_id="lb-rounds")
                        named = gr.Checkbox(False, label="Include named side-by-side votes")
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

            sbs_a, sbs_b = arena_outputs["sbs"]
            refresh.click(refresh_models, None, [chat_model, sbs_a, sbs_b])
            demo.load(refresh_models, None, [chat_model, sbs_a, sbs_b])
        demo.queue(default_concurrency_limit=s.concurrency)
        return demo


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


def settings_from_args(args) -> WebSettings:
    d = WebSettings()
    s = WebSettings(
        max_input_chars=getattr(args, "max_input_chars", d.max_input_chars),
        max_turns=getattr(args, "max_turns", d.max_turns),
        rate_limit=getattr(args, "rate_limit", d.rate_limit),
        bootstrap_rounds=getattr(args, "leaderboard_bootstrap", d.bootstrap_rounds),
        concurrency=getattr(args, "web_concurrency", d.concurrency),
        identity_words=tuple(w.strip() for w in (getattr(args, "identity_words", "") or "").split(",") if w.strip()),
    )
    from ..errors import UsageError

    for name in ("max_input_chars", "max_turns", "bootstrap_rounds", "concurrency"):
        if getattr(s, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.rate_limit < 0:
        raise UsageError(f"--rate-limit must be >= 0 (0 = unlimited), got {s.rate_limit}")
    return s


def maybe_mount_web(app, client: Any, args):
    """If ``args.web``: mount the UI at / of ``app`` (the OpenAI API app). Returns the app."""
    if not getattr(args, "web", False):
        return app
    store = ArenaStore(getattr(args, "arena_db", "arena.db"))
    log.info("web UI at / (arena database %s)", store.path)
    return mount_web(app, client, store, settings_from_args(args))


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
    from .client import ControllerClient
    from .server import run_server

    settings = settings_from_args(args)
    store = ArenaStore(args.arena_db)
    client = ControllerClient(args.controller, secret=args.secret or os.environ.get("VICUNA_SECRET") or None)
    app = create_web_app(client, store, settings)
    print(f"web UI on http://{args.host}:{args.port} (models from {args.controller}; arena database {store.path})",
          flush=True)
    # One worker process: Gradio's queue and the rate limiter live in it; run_server keeps lifespan on,
    # which starts Gradio's queue.
    run_server(app, args.host, args.port, "info" if args.debug else "warning")
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
    p.add_argument("--controller", required=True, help="controller URL, e.g. http://127.0.0.1:21001")
    p.add_argument("--secret", default=None, help="shared secret of the controller (or set $VICUNA_SECRET)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    add_web_arguments(p, web_flag=False)
