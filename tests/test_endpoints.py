"""OpenAI-compatible endpoints as models: a scripted upstream and a real `vicuna serve` behind our API.

Both upstreams run on 127.0.0.1 and are registered through an endpoints file; our API serves
them beside a model of its own. The official `openai` client must get through our API what it
gets from each upstream directly, and every upstream failure must come back as an OpenAI error
with the right status (before the answer) or an error event (during it) — never a hang.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest
from conftest import cli_server
from scripted_upstream import create_upstream
from test_hostile import engine  # noqa: F401 - the module's tiny engine (a fixture)

from vicuna.errors import UsageError
from vicuna.serve.arena import ArenaStore
from vicuna.serve.model_client import LocalClient
from vicuna.serve.endpoint import EndpointClient, RoutedClient, load_endpoints
from vicuna.serve.moderation import ModeratedClient, ModerationEndpoint, WordList
from vicuna.serve.openai_api import create_app
from vicuna.serve.server import ServerThread
from vicuna.serve.web import WebApp, WebError, WebSettings

KEY = "sk-endpoint-SECRET-4242"
HELLO = [{"role": "user", "content": "Hello! What is the capital of France?"}]


@pytest.fixture(scope="module")
def upstreams(engine):
    """(scripted upstream app, its URL, the URL of a `vicuna serve` of the tiny model)."""
    scripted = create_upstream()
    with ServerThread(scripted, log_level="critical") as s_url, \
            ServerThread(create_app(LocalClient({"tiny": engine}))) as v_url:
        yield scripted, s_url, v_url


def write_endpoints(tmp_path, s_url: str, v_url: str, down_port: int) -> str:
    path = tmp_path / "endpoints.yaml"
    path.write_text(f"""\
- name: scripted-echo
  api_base: {s_url}/v1
  model: echo
  api_key_env: TEST_ENDPOINT_KEY
- name: vicuna-tiny
  api_base: {v_url}/v1
  model: tiny
- {{name: slow, api_base: "{s_url}/v1", model: slow, max_concurrency: 1, queue_timeout: 0.2}}
- {{name: slow-queued, api_base: "{s_url}/v1", model: slow, max_concurrency: 1, queue_timeout: 60}}
- {{name: broken, api_base: "{s_url}/v1", model: fail500}}
- {{name: limited, api_base: "{s_url}/v1", model: ratelimited}}
- {{name: warming, api_base: "{s_url}/v1", model: unavailable}}
- {{name: dropper, api_base: "{s_url}/v1", model: dropper}}
- {{name: hang, api_base: "{s_url}/v1", model: hang, timeout: 1}}
- {{name: tooler, api_base: "{s_url}/v1", model: tooler}}
- {{name: locked, api_base: "{s_url}/v1", model: locked, api_key_env: TEST_WRONG_KEY}}
- {{name: down, api_base: "http://127.0.0.1:{down_port}/v1", model: echo}}
""")
    return str(path)


@pytest.fixture(scope="module")
def proxy(upstreams, engine, tmp_path_factory, closed_port):
    """Our API: the endpoints of the file beside our own engine ("own")."""
    scripted, s_url, v_url = upstreams
    path = write_endpoints(tmp_path_factory.mktemp("endpoints"), s_url, v_url, closed_port)
    client = RoutedClient(EndpointClient(load_endpoints(path), environ={
        "TEST_ENDPOINT_KEY": KEY, "TEST_WRONG_KEY": "sk-wrong-SECRET-777"}), LocalClient({"own": engine}))
    with ServerThread(create_app(client)) as url:
        yield url


def oai(url: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=timeout)


def test_endpoints_are_models_beside_ours(proxy):
    names = [m.id for m in oai(proxy).models.list().data]
    assert names[0] == "own" and {"scripted-echo", "vicuna-tiny", "slow", "broken"} <= set(names)


@pytest.mark.parametrize("name,upstream_model", [("scripted-echo", "echo"), ("vicuna-tiny", "tiny")])
def test_answers_through_us_equal_the_upstreams(proxy, upstreams, name, upstream_model):
    scripted, s_url, v_url = upstreams
    ours, theirs = oai(proxy), oai(s_url if name == "scripted-echo" else v_url)

    def both(**kw):
        return (ours.chat.completions.create(model=name, **kw), theirs.chat.completions.create(
            model=upstream_model, **kw))

    asks = [dict(messages=HELLO, max_tokens=12, temperature=0),
            dict(messages=HELLO, max_tokens=12, temperature=1.0, seed=7, n=2),
            dict(messages=HELLO, max_tokens=12, temperature=0, stop=["capital", " of"]),
            dict(messages=HELLO, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)]
    for ask in asks:
        a, b = both(**ask)
        assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices], ask
        assert [c.finish_reason for c in a.choices] == [c.finish_reason for c in b.choices]
        assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (b.usage.prompt_tokens, b.usage.completion_tokens)
        if ask.get("logprobs"):
            assert [(t.token, round(t.logprob, 4), [x.token for x in t.top_logprobs])
                    for t in a.choices[0].logprobs.content] == \
                   [(t.token, round(t.logprob, 4), [x.token for x in t.top_logprobs])
                    for t in b.choices[0].logprobs.content]

    def streamed(client, model):
        texts, usage = {}, None
        for chunk in client.chat.completions.create(model=model, messages=HELLO, max_tokens=12, temperature=1.0,
                                                    seed=3, n=2, stream=True, stream_options={"include_usage": True}):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            usage = chunk.usage or usage
        return texts, (usage.prompt_tokens, usage.completion_tokens)

    assert streamed(ours, name) == streamed(theirs, upstream_model)
    a = ours.completions.create(model=name, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=1)
    b = theirs.completions.create(model=upstream_model, prompt="Once upon a time", max_tokens=8, temperature=0,
                                  logprobs=1)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens == b.usage.completion_tokens
    assert a.choices[0].logprobs.tokens == b.choices[0].logprobs.tokens


TOOLS = [{"type": "function", "function": {"name": n, "description": f"the {n} of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}} for n in ("weather", "time")]
ASK_TOOLS = [{"role": "user", "content": "What is the weather in Paris"}]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_auto_is_relayed_and_the_upstreams_calls_come_back(proxy, upstreams, stream):
    scripted, _, _ = upstreams
    c = oai(proxy)
    if stream:
        calls, reason = {}, None
        for chunk in c.chat.completions.create(model="tooler", messages=ASK_TOOLS, tools=TOOLS, stream=True):
            for ch in chunk.choices:
                for t in ch.delta.tool_calls or []:
                    got = calls.setdefault(t.index, {"id": t.id, "name": "", "arguments": ""})
                    got["name"] += t.function.name or ""
                    got["arguments"] += t.function.arguments or ""
                reason = ch.finish_reason or reason
        calls = [calls[k] for k in sorted(calls)]
    else:
        r = c.chat.completions.create(model="tooler", messages=ASK_TOOLS, tools=TOOLS, tool_choice="auto")
        reason, m = r.choices[0].finish_reason, r.choices[0].message
        assert m.content is None
        calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments} for t in m.tool_calls]
    assert reason == "tool_calls"
    assert calls == [{"id": f"call_up_{k}", "name": n, "arguments": json.dumps({"city": "Paris", "call": k})}
                     for k, n in enumerate(("weather", "time"))]  # the upstream's ids, so its answers match
    sent = scripted.state.calls[-1]["body"]
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto" and "response_format" not in sent

    # one call only when the client says so; the call's result goes back upstream as a tool message
    r = c.chat.completions.create(model="tooler", messages=ASK_TOOLS, tools=TOOLS, parallel_tool_calls=False)
    assert [t.function.name for t in r.choices[0].message.tool_calls] == ["weather"]
    assert scripted.state.calls[-1]["body"]["parallel_tool_calls"] is False
    call = r.choices[0].message.tool_calls[0]
    history = ASK_TOOLS + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                           {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    r = c.chat.completions.create(model="tooler", messages=history, tools=TOOLS, tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    sent = scripted.state.calls[-1]["body"]
    assert sent["tool_choice"] == "none" and sent["messages"][-1] == history[-1]
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.id


def test_the_key_is_sent_upstream_from_the_environment(proxy, upstreams):
    scripted, _, _ = upstreams
    oai(proxy).chat.completions.create(model="scripted-echo", messages=[{"role": "user", "content": "key check"}])
    (call,) = [c for c in scripted.state.calls if c["body"].get("messages", [{}])[-1].get("content") == "key check"]
    assert call["auth"] == f"Bearer {KEY}" and call["body"]["model"] == "echo"


def test_upstream_errors_keep_their_status(proxy):
    c = oai(proxy)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="limited", messages=HELLO)
    assert e.value.response.headers["retry-after"] == "7" and "slow down" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="warming", messages=HELLO)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="broken", messages=HELLO)
    assert e.value.status_code == 502 and "the upstream broke" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="scripted-echo", messages=HELLO, max_tokens=999_999)
    assert e.value.code == "context_length_exceeded" and "4096" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="locked", messages=HELLO)
    assert e.value.status_code == 502 and "refused our credentials" in e.value.message
    assert "SECRET" not in e.value.response.text  # the upstream echoed the key; we do not


@pytest.mark.parametrize("name,says", [("dropper", "dropped the connection mid-answer"), ("hang", "sent nothing")])
def test_a_failure_mid_answer_ends_the_stream_with_an_error_event(proxy, name, says):
    stream = oai(proxy, timeout=30).chat.completions.create(
        model=name, messages=[{"role": "user", "content": "tell me a long story please"}], stream=True)
    text = ""
    with pytest.raises(openai.APIError, match=says):
        for chunk in stream:
            text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text.startswith("you")  # the part that came before the failure arrived


def test_max_concurrency_waits_then_refuses(proxy, upstreams):
    scripted, _, _ = upstreams

    async def three(model):
        ac = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="x", max_retries=0, timeout=60)
        return await asyncio.gather(*(ac.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "one two three"}]) for _ in range(3)),
            return_exceptions=True)

    # queue_timeout 60: the excess waits for the slot; the upstream never sees two at once
    results = asyncio.run(three("slow-queued"))
    assert all(not isinstance(r, Exception) for r in results), results
    assert scripted.state.max_in_flight["slow"] == 1
    # queue_timeout 0.2 s, an answer takes >= 1.5 s: one is served, two are refused with 429
    results = asyncio.run(three("slow"))
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 2 and "max_concurrency" in refused[0].message, results
    assert refused[0].response.headers["retry-after"]
    assert scripted.state.max_in_flight["slow"] == 1


def test_a_down_endpoint_answers_503_while_the_others_serve(proxy):
    c = oai(proxy)
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model="down", messages=HELLO)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
    assert c.chat.completions.create(model="scripted-echo", messages=HELLO).choices[0].message.content
    assert c.chat.completions.create(model="own", messages=HELLO, max_tokens=2).choices
    assert "down" not in [m.id for m in c.models.list().data]  # and battles leave it out
    assert httpx.get(proxy + "/health").json()["status"] == "ok"


def test_endpoints_file_mistakes_are_named(tmp_path):
    def bad(text, env=None):
        path = tmp_path / "e.yaml"
        path.write_text(text)
        with pytest.raises(UsageError) as e:
            EndpointClient(load_endpoints(path), environ=env or {})
        return str(e.value)

    assert "api_key_env" in bad("- {name: a, api_base: 'http://h/v1', api_key: sk-oops}")
    assert "TEST_MISSING" in bad("- {name: a, api_base: 'http://h/v1', api_key_env: TEST_MISSING}")
    assert "endpoint 1: api_base" in bad("- {name: a, api_base: 'ftp://h'}")
    assert "endpoint 2: max_concurrency" in bad("- {name: a, api_base: 'http://h/v1'}\n"
                                                "- {name: b, api_base: 'http://h/v1', max_concurrency: 0}")
    assert "named 'a'" in bad("- {name: a, api_base: 'http://h/v1'}\n- {name: a, api_base: 'http://g/v1'}")
    assert "endpoint 1: mdoel" in bad("- {name: a, api_base: 'http://h/v1', mdoel: x}")  # typos are not ignored
    assert "non-empty list" in bad("endpoints: []")
    assert "not valid YAML" in bad("- {name: a")


# ---------------------------------------------------------------------- moderation


@pytest.mark.parametrize("kind", ["endpoint", "words"])
def test_flagged_input_reaches_no_model(upstreams, engine, tmp_path, kind):
    scripted, s_url, _ = upstreams
    (tmp_path / "e.yaml").write_text(f"- {{name: scripted-echo, api_base: '{s_url}/v1', model: echo}}\n")
    (tmp_path / "words.txt").write_text("# one term per line\nforbidden\n")
    moderator = (ModerationEndpoint(s_url + "/v1/moderations", api_key_env=None) if kind == "endpoint"
                 else WordList.from_file(tmp_path / "words.txt"))
    client = ModeratedClient(RoutedClient(EndpointClient(load_endpoints(tmp_path / "e.yaml")),
                                          LocalClient({"own": engine})), moderator)
    before = engine.stats().requests_finished
    with ServerThread(create_app(client)) as url:
        c = oai(url)
        for model in ("scripted-echo", "own"):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model=model, messages=[{"role": "user", "content": "a FORBIDDEN word"}])
            assert e.value.code == "content_flagged" and "not sent to the model" in e.value.message
            assert c.chat.completions.create(model=model, messages=HELLO, max_tokens=2).choices  # the others pass
    generated = [call for call in scripted.state.calls if call["path"] != "/v1/moderations"]
    assert not any("FORBIDDEN" in str(call["body"]) for call in generated)
    assert engine.stats().requests_finished == before + 1  # only the clean request reached our engine
    if kind == "endpoint":
        assert any("FORBIDDEN" in str(call["body"]) for call in scripted.state.calls
                   if call["path"] == "/v1/moderations")


# ---------------------------------------------------------------------- the arena with endpoints


@pytest.fixture
def arena(upstreams, engine, tmp_path):
    """(client, store, run): ``run(coroutine)`` runs it on the one event loop of the test (the server's
    situation: the endpoint client's connections and health checks live on one loop)."""
    _, s_url, _ = upstreams
    (tmp_path / "e.yaml").write_text(f"- {{name: scripted-echo, api_base: '{s_url}/v1', model: echo}}\n"
                                     f"- {{name: dropper, api_base: '{s_url}/v1', model: dropper}}\n")
    client = RoutedClient(EndpointClient(load_endpoints(tmp_path / "e.yaml")), LocalClient({"own": engine}))
    store = ArenaStore(tmp_path / "arena.db", salt="s")
    with asyncio.Runner() as runner:
        yield client, store, runner.run
        runner.run(client.endpoints.close())  # not client.close(): it would stop the module's engine
    store.close()


def play(app: WebApp, run, text: str) -> tuple[str, dict]:
    async def one_round():
        _, _, _, state = await app.arena_add_user(text, None, None, None, anonymous=True, ip="198.51.100.4")
        status = ""
        async for _, _, status, state in app.arena_stream(state, None, None, None, "198.51.100.4"):
            pass
        return status, state

    return run(one_round())


def test_battle_between_our_model_and_an_endpoint_records_which_is_which(arena):
    client, store, run = arena
    app = WebApp(client, store, WebSettings(arena_weights=("dropper=0",), max_tokens=16), rng=random.Random(3))
    status, state = play(app, run, "Say something nice")
    assert sorted(state["models"]) == ["own", "scripted-echo"] and state["answered"], status
    run(app.vote(state, "model_a", "198.51.100.4"))
    (vote,) = list(store.iter_votes())
    side = "a" if vote["model_a"] == "scripted-echo" else "b"
    other = "b" if side == "a" else "a"
    assert (vote[f"served_by_{side}"], vote[f"upstream_model_{side}"]) == ("endpoint", "echo")
    assert (vote[f"served_by_{other}"], vote[f"upstream_model_{other}"]) == ("local", None)
    # The identity-leak check knows the upstream's model name too: an answer naming it voids the vote.
    status, state = play(app, run, "are you Echo?")
    reveal, _ = run(app.vote(state, "tie", "198.51.100.4"))
    assert "void" in reveal and "echo" in reveal.lower()


def test_an_endpoint_failing_mid_answer_fails_the_round(arena):
    client, store, run = arena
    app = WebApp(client, store, WebSettings(arena_weights=("scripted-echo=0",), max_tokens=16), rng=random.Random(0))
    status, state = play(app, run, "tell me a long story please")
    assert sorted(state["models"]) == ["dropper", "own"]
    assert not state["answered"] and "dropped the connection" in status and "dropper" not in status
    with pytest.raises(WebError, match="wait for both answers"):
        run(app.vote(state, "model_a", "198.51.100.4"))
    assert [c["finish"] for c in store.iter_conversations() if c["model"] == "dropper"] == ["error"]


def test_arena_weights_steer_the_draw(arena):
    client, store, _ = arena
    app = WebApp(client, store, WebSettings(arena_weights=("own=0",)), rng=random.Random(0))
    assert all(sorted(app._draw(["own", "scripted-echo", "dropper"])) == ["dropper", "scripted-echo"]
               for _ in range(20))
    app = WebApp(client, store, WebSettings(arena_weights=("dropper=8",)), rng=random.Random(0))
    counts = {m: 0 for m in ("own", "scripted-echo", "dropper")}
    for _ in range(300):
        for m in app._draw(list(counts)):
            counts[m] += 1
    assert counts["dropper"] > counts["own"] and counts["dropper"] > counts["scripted-echo"]
    with pytest.raises(UsageError, match="NAME=WEIGHT"):
        WebSettings(arena_weights=("nonsense",)).weights()


# ---------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_serve_api_and_web_with_endpoints_alone_need_no_controller(upstreams, tmp_path):
    _, s_url, _ = upstreams
    (tmp_path / "e.yaml").write_text(f"- {{name: scripted-echo, api_base: '{s_url}/v1', model: echo, "
                                     "api_key_env: TEST_ENDPOINT_KEY}\n")
    env = {"TEST_ENDPOINT_KEY": KEY}
    with cli_server("serve", "api", "--endpoints", tmp_path / "e.yaml", env=env) as api:
        assert [m.id for m in oai(api.url).models.list().data] == ["scripted-echo"]
        reply = oai(api.url).chat.completions.create(model="scripted-echo", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "you said: hi"
        with cli_server("serve", "web", "--endpoints", tmp_path / "e.yaml", "--arena-db", tmp_path / "arena.db",
                        env=env) as web:
            assert httpx.get(web.url + "/", timeout=30).status_code == 200


def test_cli_refuses_a_missing_key_and_explains_the_flags(tmp_path):
    from conftest import run_cli

    (tmp_path / "e.yaml").write_text("- {name: a, api_base: 'http://127.0.0.1:9/v1', api_key_env: TEST_UNSET_KEY}\n")
    out = run_cli("serve", "api", "--endpoints", str(tmp_path / "e.yaml"), "--port", "0")
    assert out.returncode == 2 and "TEST_UNSET_KEY" in out.stderr and "Traceback" not in out.stderr
    for verb in (("api",), ("web",), ()):
        h = run_cli("serve", *verb, "--help")
        assert "--endpoints" in h.stdout and "--moderation-endpoint" in h.stdout


def test_a_controller_serves_endpoints_to_its_front_ends(upstreams, tmp_path, closed_port):
    """`serve controller --endpoints FILE`: front ends get the upstreams through the controller, with
    neither the file nor the keys."""
    from vicuna.serve.model_client import ControllerClient
    from vicuna.serve.controller import create_controller_app

    scripted, s_url, _ = upstreams
    (tmp_path / "e.yaml").write_text(
        f"- {{name: scripted-echo, api_base: '{s_url}/v1', model: echo, api_key_env: TEST_ENDPOINT_KEY}}\n"
        f"- {{name: limited, api_base: '{s_url}/v1', model: ratelimited}}\n"
        f"- {{name: down, api_base: 'http://127.0.0.1:{closed_port}/v1', model: echo}}\n")
    endpoints = EndpointClient(load_endpoints(tmp_path / "e.yaml"), environ={"TEST_ENDPOINT_KEY": KEY})
    limited_before = sum(call["body"].get("model") == "ratelimited" for call in scripted.state.calls)
    with ServerThread(create_controller_app(secret="s", endpoints=endpoints)) as ctl, \
            ServerThread(create_app(ControllerClient(ctl, secret="s"))) as api:
        c = oai(api)
        reply = c.chat.completions.create(model="scripted-echo", messages=[{"role": "user", "content": "via ctl"}])
        assert reply.choices[0].message.content == "you said: via ctl"
        chunks = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="scripted-echo", messages=[{"role": "user", "content": "streamed"}], stream=True) if ch.choices]
        assert "".join(chunks) == "you said: streamed"
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="limited", messages=HELLO)
        assert e.value.response.headers["retry-after"] == "7"
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="down", messages=HELLO)
        assert e.value.status_code == 503
        assert {"scripted-echo", "limited"} <= {m.id for m in c.models.list().data}
        assert httpx.post(ctl + "/get_worker_address", json={"model": "scripted-echo"}).status_code == 401
    via = [call for call in scripted.state.calls if "via ctl" in str(call["body"])]
    assert len(via) == 1 and via[0]["auth"] == f"Bearer {KEY}"  # one call: the 429 was not retried either
    assert sum(call["body"].get("model") == "ratelimited" for call in scripted.state.calls) == limited_before + 1
