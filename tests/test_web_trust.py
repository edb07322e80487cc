"""What a hostile client of the web UI can and cannot do, tried over real HTTP on 127.0.0.1.

The UI runs in a real server (uvicorn, Gradio's queue); the attacker is Gradio's own Python
client (``gradio_client``), which can call every event with any values and any headers —
more than a browser lets a user do. A scripted model client answers (the models are not the
subject here), so everything it was asked is on record.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from gradio_client import Client
from test_web import ScriptedClient

from vicuna.serve.arena import ArenaStore
from vicuna.serve.openai_api import create_app
from vicuna.serve.server import ServerThread
from vicuna.serve import launch
from vicuna.serve.web import WebApp, WebError, WebSettings, create_web_app

ANSWERS = {"alpha": "Paris is the capital of France", "bravo": "It is Paris"}


@pytest.fixture
def store(tmp_path):
    s = ArenaStore(tmp_path / "arena.db", salt="test-salt")
    yield s
    s.close()


def serve_web(store, client=None, trusted_proxies=None, **settings) -> ServerThread:
    client = client or ScriptedClient(dict(ANSWERS))
    return ServerThread(create_web_app(client, store, WebSettings(**settings)), trusted_proxies=trusted_proxies)


def attacker(url: str, **headers) -> Client:
    return Client(url + "/", headers=headers or None, verbose=False)


@pytest.mark.parametrize("trusted", [None, ["127.0.0.1"]])
def test_forged_forwarded_for_counts_only_from_a_trusted_proxy(store, trusted):
    """From 127.0.0.1 with a new X-Forwarded-For each time, a client must not pose as many clients."""
    with serve_web(store, trusted_proxies=trusted, rate_limit=2) as url:
        statuses = []
        for i in range(3):
            c = attacker(url, **{"X-Forwarded-For": f"203.0.113.{i}"})
            statuses.append(c.predict("Capital of France?", api_name="/send_fn")[-1])
    if trusted:  # a real proxy on this host: three clients, none over the limit
        assert not any("Rate limited" in s for s in statuses), statuses
    else:  # the header is ignored: one client, over the limit at its third message
        assert "Rate limited" not in statuses[1] and "Rate limited" in statuses[2], statuses
    hashes = {c["ip_hash"] for c in store.iter_conversations()}
    assert len(hashes) == (3 if trusted else 1)


def test_no_event_takes_a_conversation_or_state_from_the_client(store):
    """The conversation is held by the server: no endpoint accepts a chat history (or any state) as input."""
    with serve_web(store) as url:
        api = attacker(url).view_api(return_format="dict", print_info=False)
    inputs = {(name, p["component"]) for name, ep in api["named_endpoints"].items() for p in ep["parameters"]}
    assert inputs and not {(n, c) for n, c in inputs if c in ("Chatbot", "State")}, inputs


def test_battle_stores_only_what_models_said_and_samples_with_the_servers_settings(store):
    client = ScriptedClient(dict(ANSWERS))
    with serve_web(store, client, battle_temperature=0.9) as url:
        c = attacker(url)
        api = c.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert [p["parameter_name"] for p in api["/send_fn"]["parameters"]] == ["text"]  # no temperature, no seed
        status = c.predict("Capital of France?", api_name="/send_fn")[-1]
        assert "Vote for the better answer" in status, status
        assert {"/vote_a", "/vote_b", "/vote_tie", "/vote_bothbad"} <= set(api)
        reveal = c.predict(api_name="/vote_a")[0]
    assert "A is better" in reveal
    assert {params["temperature"] for _, _, params in client.calls} == {0.9}
    (vote,) = list(store.iter_votes())
    for side in ("a", "b"):
        messages = vote[f"conversation_{side}"]
        assert messages == [{"role": "user", "content": "Capital of France?"},
                            {"role": "assistant", "content": ANSWERS[vote[f"model_{side}"]]}]
        assert vote[f"params_{side}"]["temperature"] == 0.9


def test_arena_only_serves_no_model_by_name(store, tmp_path):
    client = ScriptedClient(dict(ANSWERS))

    def app(arena_only: bool):
        web = launch.WebConfig(arena_db=str(tmp_path / f"{arena_only}.db"))
        return launch.with_web(create_app(client), client, web, WebSettings(arena_only=arena_only))

    with ServerThread(app(True)) as url:
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 404 and "blind arena" in r.json()["error"]["message"]
        endpoints = attacker(url).view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert "/send_fn" in endpoints and not any("chat" in e for e in endpoints)
        assert all(p["component"] == "Textbox" for p in endpoints["/send_fn"]["parameters"])
        assert len([e for e in endpoints if e.startswith("/send_fn")]) == 2  # the battle's Enter and Send only
    with ServerThread(app(False)) as url:
        assert httpx.get(url + "/v1/models").status_code == 200  # the default serves both


def test_votes_are_limited_per_client(store):
    app = WebApp(ScriptedClient(dict(ANSWERS)), store, WebSettings(vote_limit=2, rate_limit=0), rng=random.Random(0))

    async def round_and_vote(ip):
        _, _, _, state = await app.arena_add_user("Capital?", None, None, None, anonymous=True, ip=ip)
        async for *_, state in app.arena_stream(state, None, None, None, ip):
            pass
        return await app.vote(state, "model_a", ip)

    asyncio.run(round_and_vote("198.51.100.1"))
    asyncio.run(round_and_vote("198.51.100.1"))
    with pytest.raises(WebError, match="cast 2 votes in the last 60 minutes") as e:
        asyncio.run(round_and_vote("198.51.100.1"))
    assert e.value.title == "Vote limit reached"
    asyncio.run(round_and_vote("198.51.100.2"))  # another client may vote
    assert len(list(store.iter_votes())) == 3


def test_chat_uses_the_models_sampling_defaults_unless_the_user_sets_them(store):
    client = ScriptedClient(dict(ANSWERS))
    with serve_web(store, client) as url:
        c = attacker(url)
        c.predict(api_name="/refresh_models")
        c.predict("hi", "alpha", True, 0.3, 0.9, 16, api_name="/chat_send")  # "Model defaults" ticked
        c.predict(api_name="/chat_clear_fn")
        c.predict("hi", "alpha", False, 0.3, 0.9, 16, api_name="/chat_send")
    assert [params for _, _, params in client.calls] == [
        {"temperature": None, "top_p": None, "max_tokens": 16}, {"temperature": 0.3, "top_p": 0.9, "max_tokens": 16}]
