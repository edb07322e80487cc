"""The web UI's logic (limits, streaming, storage, votes, error messages) driven without a browser.

A small in-test client streams canned text through the real ModelClient interface; the
browser test (test_web_browser.py) runs the same code against real served models.
"""

from __future__ import annotations

import asyncio
import copy
import random

import pytest

from vicuna.errors import ContextLengthExceeded, ModelNotFound, Overloaded, ServeError, Unavailable
from vicuna.serve.arena import ArenaStore
from vicuna.serve.web import RateLimiter, WebApp, WebError, WebSettings, describe_error, merge_streams

IP = "198.51.100.9"


class ScriptedClient:
    """Streams ``answers[model]`` word by word (or raises ``errors[model]`` after ``fail_after`` pieces)."""

    def __init__(self, answers: dict[str, str], errors: dict[str, Exception] | None = None, fail_after: int = 0,
                 delay: float = 0.0):
        self.answers, self.errors, self.fail_after, self.delay = answers, errors or {}, fail_after, delay
        self.calls: list[tuple[str, list[dict], dict]] = []

    async def list_models(self) -> list[str]:
        return list(self.answers)

    def describe(self, model):
        return None

    async def stream_chat(self, model, messages, **params):
        self.calls.append((model, messages, params))
        for n, word in enumerate(self.answers[model].split(" ")):
            if model in self.errors and n >= self.fail_after:
                raise self.errors[model]
            await asyncio.sleep(self.delay)
            yield word if n == 0 else " " + word
        if model in self.errors:
            raise self.errors[model]


def collect(agen) -> list:
    """All items of an async generator, each deep-copied as Gradio would serialise it at that moment."""
    async def run():
        return [copy.deepcopy(x) async for x in agen]

    return asyncio.run(run())


@pytest.fixture
def store(tmp_path):
    s = ArenaStore(tmp_path / "arena.db", salt="test-salt")
    yield s
    s.close()


def session(*messages: dict) -> dict:
    """A chat session's server-held state holding ``messages``."""
    return {"messages": list(messages)}


def make_app(store, client=None, **settings) -> WebApp:
    client = client or ScriptedClient({"alpha": "Hello there, first answer", "bravo": "A second answer"})
    return WebApp(client, store, WebSettings(**settings), rng=random.Random(0))


def test_limits_are_specific(store):
    app = make_app(store, max_input_chars=20, max_turns=2, rate_limit=3)
    with pytest.raises(WebError) as e:
        app.chat_add_user("   ", None, IP)
    assert e.value.title == "Empty message"
    with pytest.raises(WebError, match="has 21 characters; the limit is 20") as e:
        app.chat_add_user("x" * 21, None, IP)
    assert e.value.title == "Message too long"
    two_turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    with pytest.raises(WebError, match="limit of 2 turns") as e:
        app.chat_add_user("hi", session(*two_turns), IP)
    assert e.value.title == "Too many turns"
    box, shown, state = app.chat_add_user("  hi ", None, IP)
    assert box == "" and shown == state["messages"] == [{"role": "user", "content": "hi"}]
    app.chat_add_user("hi", None, IP)
    app.chat_add_user("hi", None, IP)  # refused messages did not count: this is the third
    with pytest.raises(WebError, match=r"more than 3 messages in 60 s\. Try again in \d+ s") as e:
        app.chat_add_user("hi", None, IP)
    assert e.value.title == "Rate limited"
    app.chat_add_user("hi", None, "192.0.2.1")  # another client is not limited


def test_rate_limiter_window():
    rl = RateLimiter(2, window=10)
    assert rl.check("k", now=0) is None and rl.check("k", now=1) is None
    assert rl.check("k", now=2) == pytest.approx(8)
    assert rl.check("k", now=10.5) is None  # the first event left the window
    assert RateLimiter(0).check("k") is None  # 0 = unlimited


def test_chat_streams_and_stores(store):
    client = ScriptedClient({"alpha": "one two three four"})
    app = make_app(store, client)
    _, _, state = app.chat_add_user("Count please", None, IP)
    outs = collect(app.chat_stream(state, "alpha", 0.3, 0.9, 64, IP))
    texts = [h[-1]["content"] for h, _, _ in outs if h[-1]["role"] == "assistant"]
    assert texts[-1] == "one two three four"
    assert len(set(texts)) >= 4  # streamed piece by piece, not in one block
    assert "answering" in outs[1][1] and outs[-1][1] == ""
    state = outs[-1][2]
    assert client.calls[0] == ("alpha", [{"role": "user", "content": "Count please"}],
                               {"temperature": 0.3, "top_p": 0.9, "max_tokens": 64})
    conv = store.conversation(state["conv_id"])
    assert conv["mode"] == "chat" and conv["model"] == "alpha" and conv["finish"] == "stop"
    assert conv["messages"][-1] == {"role": "assistant", "content": "one two three four"}
    assert conv["params"] == {"temperature": 0.3, "top_p": 0.9, "max_tokens": 64}
    assert conv["ip_hash"] == store.hash_ip(IP) and IP not in str(conv)

    assert state["messages"] == outs[-1][0]  # the server's copy is what was shown
    # Regenerate replaces the last answer.
    regen = app.chat_regenerate(state, IP)
    assert regen["messages"][-1]["role"] == "user"
    outs2 = collect(app.chat_stream(regen, "alpha", 0.3, 0.9, 64, IP))
    assert outs2[-1][2]["conv_id"] == state["conv_id"]
    assert client.calls[1][1] == [{"role": "user", "content": "Count please"}]
    with pytest.raises(WebError, match="Send a message first"):
        app.chat_regenerate(None, IP)

    # Feedback on the answer at index 1.
    assert "👍" in app.feedback(state, 1, True, IP)
    assert "flagged" in app.feedback(state, [1, 0], "Incorrect", IP)
    assert app.feedback(state, 1, None, IP) == "Feedback withdrawn."
    kinds = [(f["kind"], f["note"], f["message_index"]) for f in store.iter_feedback()]
    assert kinds == [("upvote", None, 1), ("flag", "Incorrect", 1), ("retract", None, 1)]

    # Switching the model starts a new stored conversation (the history stays on screen).
    client.answers["bravo"] = "bravo here"
    _, _, state2 = app.chat_add_user("again", outs2[-1][2], IP)
    outs3 = collect(app.chat_stream(state2, "bravo", 0.7, 1, 8, IP))
    new_state = outs3[-1][2]
    assert new_state["conv_id"] != state["conv_id"] and new_state["model"] == "bravo"
    assert store.conversation(new_state["conv_id"])["messages"][-1]["content"] == "bravo here"
    assert store.conversation(state["conv_id"])["model"] == "alpha"


def test_client_gone_keeps_partial_answer_as_cancelled(store):
    app = make_app(store, ScriptedClient({"alpha": "a b c d e f g h"}, delay=0.01))

    async def run():
        agen = app.chat_stream(session({"role": "user", "content": "go"}), "alpha", 0.7, 1, 16, IP)
        seen = []
        async for out in agen:
            seen.append(out)
            if len(seen) == 3:
                break
        await agen.aclose()  # what Gradio does to the generator when the browser goes away
        return seen

    seen = asyncio.run(run())
    conv = store.conversation(seen[-1][2]["conv_id"])
    assert conv["finish"] == "cancelled" and conv["messages"][-1]["content"] == "a b"


class StallingClient(ScriptedClient):
    """Sends a few words, then stalls (a model stuck in a queue); records that its stream was closed."""

    closed = 0

    async def stream_chat(self, model, messages, **params):
        try:
            for word in ("one", " two"):
                yield word
            await asyncio.sleep(3600)
        finally:
            StallingClient.closed += 1


async def chat_until_stalled(app: WebApp, stop_key: str) -> tuple[asyncio.Task, list]:
    """Start a chat with a StallingClient's "alpha" and return once its words are out and it stalls:
    (the task consuming the stream, the list it appends each output to)."""
    outs = []

    async def consume():
        async for out in app.chat_stream(session({"role": "user", "content": "go"}), "alpha", 0.7, 1, 16, IP,
                                          stop_key=stop_key):
            outs.append(copy.deepcopy(out))
    task = asyncio.create_task(consume())
    while not outs or outs[-1][0][-1]["content"] != "one two":
        await asyncio.sleep(0.01)
    return task, outs


def test_stop_button_ends_a_stalled_stream_and_keeps_the_text(store):
    app = make_app(store, StallingClient({"alpha": "", "bravo": ""}))

    async def run(reason):
        task, outs = await chat_until_stalled(app, "s1:chat")
        assert app.request_stop("s1:chat", reason)
        await asyncio.wait_for(task, 5)
        return outs

    outs = asyncio.run(run("stop"))
    history, status, state = outs[-1]
    assert status == "*Stopped.*" and history[-1]["content"] == "one two"
    conv = store.conversation(state["conv_id"])
    assert conv["finish"] == "stopped" and conv["messages"][-1]["content"] == "one two"
    assert StallingClient.closed == 1  # the model's stream was closed: the engine frees the slot
    assert not app.request_stop("s1:chat")  # nothing runs any more

    outs = asyncio.run(run("clear"))
    assert outs[-1][1] != "*Stopped.*"  # after Clear nothing more is shown
    assert StallingClient.closed == 2


def test_stopped_battle_can_still_be_voted_on(store):
    app = make_app(store, StallingClient({"alpha": "", "bravo": ""}))

    async def run():
        _, ha, hb, state = await app.arena_add_user("hi", None, None, None, anonymous=True, ip=IP)
        outs = []
        async def consume():
            async for out in app.arena_stream(state, 0.7, 1, 16, IP, stop_key="s:arena"):
                outs.append(copy.deepcopy(out))
        task = asyncio.create_task(consume())
        while not outs or outs[-1][0][-1]["content"] != "one two" or outs[-1][1][-1]["content"] != "one two":
            await asyncio.sleep(0.01)
        app.request_stop("s:arena")
        await asyncio.wait_for(task, 5)
        return outs

    ha, hb, status, state = asyncio.run(run())[-1]
    assert state["answered"] and status.startswith("*Stopped.* Vote")
    reveal, _ = asyncio.run(app.vote(state, "model_a", IP))
    assert "A is better" in reveal
    assert [c["finish"] for c in store.iter_conversations()] == ["stopped", "stopped"]


@pytest.mark.parametrize(
    "error, title, words",
    [
        (ContextLengthExceeded("This model's maximum context length is 64 tokens; the prompt has 80."),
         "Context too long", ["64 tokens", "Clear"]),
        (Unavailable("no live worker for model 'alpha'", retry_after=5), "Model unavailable", ["in 5 s"]),
        (ModelNotFound.for_model("alpha", ["bravo"]), "Model unavailable", ["Available: bravo", "reload"]),
        (Overloaded("queue full (64 waiting)", retry_after=2), "Server busy (rate limited)", ["queue full", "in 2 s"]),
        (ServeError("worker http://w:1 failed mid-stream", status=502, code="worker_failed"), "alpha failed (HTTP 502)",
         ["mid-stream"]),
        (RuntimeError("boom"), "Internal error", ["RuntimeError: boom"]),
    ],
)
def test_generation_errors_say_what_failed(store, error, title, words):
    assert describe_error(error, "alpha")[0] == title
    app = make_app(store, ScriptedClient({"alpha": "partial answer here"}, errors={"alpha": error}, fail_after=2))
    outs = collect(app.chat_stream(session({"role": "user", "content": "hi"}), "alpha", 0.7, 1, 16, IP))
    history, status, state = outs[-1]
    assert status.startswith(f"**Error — {title}**")
    assert all(w in status for w in words), status
    assert history[-1] == {"role": "assistant", "content": "partial answer"}  # what arrived stays visible
    conv = store.conversation(state["conv_id"])
    assert conv["finish"] == "error" and title in conv["error"]


def test_failed_chat_before_any_text_keeps_prompt_for_retry(store):
    app = make_app(store, ScriptedClient({"alpha": "x"}, errors={"alpha": Unavailable("down")}))
    outs = collect(app.chat_stream(session({"role": "user", "content": "hi"}), "alpha", 0.7, 1, 16, IP))
    assert outs[-1][0] == outs[-1][2]["messages"] == [{"role": "user", "content": "hi"}]
    # Sending again replaces the unanswered prompt (roles keep alternating).
    _, shown, state = app.chat_add_user("hello", outs[-1][2], IP)
    assert shown == state["messages"] == [{"role": "user", "content": "hello"}]
    retry = app.chat_regenerate(outs[-1][2], IP)  # or Regenerate retries it
    assert retry["messages"] == [{"role": "user", "content": "hi"}]
    assert "No model selected" in collect(app.chat_stream(state, None, 0.7, 1, 16, IP))[-1][1]


def test_merge_streams_interleaves():
    async def slow(tag, n, delay):
        for i in range(n):
            await asyncio.sleep(delay)
            yield f"{tag}{i}"

    async def boom():
        yield "x"
        raise Unavailable("gone")

    items = collect(merge_streams([slow("a", 3, 0.02), slow("b", 3, 0.03)]))
    order = [p for _, p, _ in items if p]
    assert sorted(order) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert order.index("b0") < order.index("a2")  # b started before a finished
    ends = [(i, e) for i, p, e in items if p is None]
    assert sorted(i for i, _ in ends) == [0, 1] and all(e is None for _, e in ends)
    items = collect(merge_streams([boom(), slow("b", 1, 0)]))
    assert any(i == 0 and isinstance(e, Unavailable) for i, _, e in items)


def run_round(app, text, state, model_a=None, model_b=None, anonymous=True, ip=IP, sampling=(0.7, 1.0, 32)):
    _, ha, hb, state = asyncio.run(app.arena_add_user(text, state, model_a, model_b, anonymous=anonymous, ip=ip))
    return collect(app.arena_stream(state, *sampling, ip))


def test_battle_is_anonymous_until_vote(store):
    client = ScriptedClient({"alpha": "Paris is the capital", "bravo": "It is Paris", "charlie": "Lyon"},
                            delay=0.001)
    app = make_app(store, client)
    outs = run_round(app, "Capital of France?", None)
    ha, hb, status, state = outs[-1]
    a, b = state["models"]
    assert a != b and {a, b} <= {"alpha", "bravo", "charlie"}
    assert ha[-1]["content"] == client.answers[a] and hb[-1]["content"] == client.answers[b]
    assert state["answered"] and "Vote" in status
    assert a not in status and b not in status
    # Both sides streamed at once: some update shows partial text on both sides.
    assert any(x[0][-1]["content"] and x[1][-1]["content"] and
               (x[0][-1]["content"] != client.answers[a] or x[1][-1]["content"] != client.answers[b])
               for x in outs if x[0][-1]["role"] == "assistant")

    # A second turn in the same round keeps the same pair and conversations.
    outs = run_round(app, "And of Italy?", state)
    ha, hb, _, state2 = outs[-1]
    assert state2["conv_ids"] == state["conv_ids"] and len(ha) == 4

    reveal, state3 = asyncio.run(app.vote(state2, "model_b", IP))
    assert f"Model A: **{a}**" in reveal and f"Model B: **{b}**" in reveal and "B is better" in reveal
    assert "void" not in reveal
    (vote,) = list(store.iter_votes())
    assert (vote["model_a"], vote["model_b"], vote["winner"], vote["anony"], vote["void"]) == (a, b, "model_b", True,
                                                                                             False)
    assert vote["turn"] == 2 and vote["conversation_b"][-1]["content"] == client.answers[b]
    assert vote["judge"] == store.hash_ip(IP)
    with pytest.raises(WebError, match="already has a vote|send a new prompt"):
        asyncio.run(app.vote(state3, "model_a", IP))

    # After the vote a new prompt starts a fresh round with empty histories.
    outs = run_round(app, "Next", state3)
    assert len(outs[-1][0]) == 2 and outs[-1][3]["conv_ids"] != state["conv_ids"]
    assert not outs[-1][3]["voted"]


def test_identity_leak_voids_vote(store):
    client = ScriptedClient({"alpha": "As alpha, I think 4", "bravo": "4"})
    app = make_app(store, client)
    ha, hb, _, state = run_round(app, "2+2?", None)[-1]
    reveal, _ = asyncio.run(app.vote(state, "tie", IP))
    assert "void" in reveal and "mentions 'alpha'" in reveal
    (vote,) = list(store.iter_votes())
    assert vote["void"] and "alpha" in vote["void_reason"]
    assert store.battles() == []  # stored, flagged, not counted
    assert len(store.battles(include_void=True)) == 1


def test_battle_needs_two_models_and_answers(store):
    app = make_app(store, ScriptedClient({"solo": "x"}))
    with pytest.raises(WebError, match="needs two models; the server has 1 \\(solo\\)"):
        asyncio.run(app.arena_add_user("hi", None, None, None, anonymous=True, ip=IP))
    with pytest.raises(WebError, match="wait for both answers"):
        asyncio.run(make_app(store).vote(None, "tie", IP))


def test_battle_error_hides_names_and_blocks_vote(store):
    client = ScriptedClient({"alpha": "fine answer", "bravo": "x"}, errors={"bravo": Unavailable("bravo crashed")})
    app = make_app(store, client)
    ha, hb, status, state = run_round(app, "hi", None)[-1]
    side = "A" if state["models"][0] == "bravo" else "B"
    assert f"model {side} cannot answer" in status and "bravo" not in status and "alpha" not in status
    assert not state["answered"] and ha[-1]["role"] == "user" and hb[-1]["role"] == "user"
    with pytest.raises(WebError):
        asyncio.run(app.vote(state, "tie", IP))


def test_side_by_side_named(store):
    app = make_app(store)
    with pytest.raises(WebError, match="two different models"):
        asyncio.run(app.arena_add_user("hi", None, "alpha", "alpha", anonymous=False, ip=IP))
    ha, hb, _, state = run_round(app, "hi", None, "bravo", "alpha", anonymous=False)[-1]
    assert state["models"] == ["bravo", "alpha"] and state["mode"] == "side_by_side"
    asyncio.run(app.vote(state, "model_a", IP))
    (vote,) = list(store.iter_votes())
    assert vote["mode"] == "side_by_side" and vote["anony"] is False and vote["model_a"] == "bravo"
    assert store.battles() == [] and len(store.battles(include_named=True)) == 1
    # Picking other models starts a new round.
    _, _, _, state2 = asyncio.run(app.arena_add_user("x", {**state, "voted": False}, "alpha", "bravo",
                                                     anonymous=False, ip=IP))
    assert state2["models"] == ["alpha", "bravo"] and state2["conv_ids"] != state["conv_ids"]


def test_leaderboard_view(store):
    app = make_app(store)
    table, matrix, fig = app.leaderboard(50, False, False)
    assert "No votes yet" in table
    for k in range(6):
        ha, hb, _, state = run_round(app, f"q{k}", None)[-1]
        winner = "model_a" if state["models"][0] == "alpha" else "model_b"  # alpha always wins
        asyncio.run(app.vote(state, winner, IP))
    table, matrix, fig = app.leaderboard(50, False, True)
    lines = table.splitlines()
    assert lines[2].startswith("| 1 | alpha |") and "Online Elo" in lines[0]
    assert "| **alpha** | — | 100% |" in matrix
    assert fig.axes[0].get_yticklabels()[-1].get_text() == "alpha"
    with pytest.raises(WebError, match="between 1 and 100000"):
        app.leaderboard(0.4, False, False)


def test_leaderboard_per_category_and_style_controlled(store):
    """Votes are tagged from the prompt; the leaderboard view filters on a category and shows both rankings."""
    app = make_app(store)
    prompts = ["Write a Python function that sorts a list of numbers."] * 3 + ["Tell me a story about a brave dog."] * 4
    for k, text in enumerate(prompts):
        ha, hb, _, state = run_round(app, text, None)[-1]
        best = "bravo" if "Python" in text else "alpha"  # bravo wins the coding votes, alpha the others
        asyncio.run(app.vote(state, "model_a" if state["models"][0] == best else "model_b", IP))
    choices = app.category_choices(False)
    assert choices[0] == ("all votes", "(all)") and ("coding (3)", "coding") in choices
    table, _, _ = app.leaderboard(30, False, False, "coding")
    assert table.splitlines()[2].startswith("| 1 | bravo |") and "Category: **coding**" in table
    assert "| 3 |" in table.splitlines()[2]  # three votes counted
    assert "Style-controlled" in table.splitlines()[0]
    table, _, _ = app.leaderboard(30, False, False, "(all)")
    assert table.splitlines()[2].startswith("| 1 | alpha |") and "Category" not in table
    assert "No votes in category **math**" in app.leaderboard(30, False, False, "math")[0]


class ContextClient(ScriptedClient):
    """A model with a 10-token context: prompts cost 4 tokens, an explicit max_tokens beyond what is left is a 400."""

    async def stream_chat(self, model, messages, **params):
        prompt = 4 * sum(1 for m in messages if m["role"] == "user")
        left = 10 - prompt
        n = params.get("max_tokens")
        self.calls.append((model, messages, params))
        if left < 1 or (n is not None and n > left):
            raise ContextLengthExceeded(f"maximum context length is 10 tokens; you requested {prompt + (n or 1)}")
        for i in range(min(n or 512, left)):
            yield f"t{i} "


def test_max_tokens_slider_is_an_upper_bound(store):
    client = ContextClient({"alpha": ""})
    app = make_app(store, client)
    outs = collect(app.chat_stream(session({"role": "user", "content": "hi"}), "alpha", 0.7, 1, 3, IP))
    assert outs[-1][0][-1]["content"] == "t0 t1 t2 " and len(client.calls) == 1  # fits: used as given
    outs = collect(app.chat_stream(session({"role": "user", "content": "hi"}), "alpha", 0.7, 1, 512, IP))
    assert outs[-1][0][-1]["content"].split() == [f"t{i}" for i in range(6)]  # what is left of the context
    assert [c[2]["max_tokens"] for c in client.calls[1:]] == [512, None]
    long = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
    long.append({"role": "user", "content": "c"})
    history, status, _ = collect(app.chat_stream(session(*long), "alpha", 0.7, 1, 512, IP))[-1]
    assert status.startswith("**Error — Context too long**") and "10 tokens" in status


def test_browser_gone_while_waiting_closes_the_model_stream(store):
    """Gradio cancels the handler's task when the page closes; the model's stream must be closed too."""
    app = make_app(store, StallingClient({"alpha": ""}))
    before = StallingClient.closed

    async def run():
        task, outs = await chat_until_stalled(app, "s2:chat")
        await asyncio.sleep(0.05)  # now waiting inside the stalled stream
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return outs

    outs = asyncio.run(run())
    assert StallingClient.closed == before + 1
    conv = store.conversation(outs[-1][2]["conv_id"])
    assert conv["finish"] == "cancelled" and conv["messages"][-1]["content"] == "one two"
    assert not app.request_stop("s2:chat")


# ---------------------------------------------------------------------- storage failures


def test_round_that_cannot_be_stored_offers_no_vote(tmp_path):
    """A locked database: both conversations fail to store after bounded retries; the UI says so, no vote."""
    import sqlite3

    store = ArenaStore(tmp_path / "arena.db", salt="s", busy_timeout=0.05, attempts=2)
    app = make_app(store)
    holder = sqlite3.connect(tmp_path / "arena.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # e.g. an open sqlite3 shell in a write transaction
    ha, hb, status, state = run_round(app, "hi", None)[-1]
    assert status.startswith("**Not stored**") and "locked by another process" in status
    assert "No vote can be cast" in status and not state["answered"]
    with pytest.raises(WebError, match="wait for both answers"):
        asyncio.run(app.vote(state, "model_a", IP))
    outs = collect(app.chat_stream(session({"role": "user", "content": "hi"}), "alpha", 0.7, 1, 16, IP))
    assert outs[-1][0][-1]["content"] == "Hello there, first answer"  # the chat still answers...
    assert "**Not stored**" in outs[-1][1]  # ...and says it could not keep it
    holder.execute("COMMIT")
    holder.close()
    ha, hb, status, state = run_round(app, "again", state)[-1]  # the same round, now stored: votable
    assert state["answered"] and "Not stored" not in status
    asyncio.run(app.vote(state, "model_a", IP))
    (vote,) = list(store.iter_votes())
    assert len(vote["conversation_a"]) == 4  # both turns were stored
    store.close()


def test_deleted_database_is_named_in_the_ui_and_blocks_votes(tmp_path):
    store = ArenaStore(tmp_path / "arena.db", salt="s")
    app = make_app(store)
    *_, state = run_round(app, "hi", None)[-1]
    assert state["answered"]
    for p in tmp_path.glob("arena.db*"):
        p.unlink()
    with pytest.raises(WebError, match="was deleted while the server was running") as e:
        asyncio.run(app.vote(state, "model_a", IP))
    assert e.value.title == "Vote not stored"
    ha, hb, status, state = run_round(app, "next", None)[-1]
    assert "was deleted" in status and not state["answered"]
    with pytest.raises(WebError, match="Leaderboard unavailable|was deleted"):
        app.leaderboard(10, False, False)
    assert not (tmp_path / "arena.db").exists()
    store.close()
