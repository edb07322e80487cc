"""The API surface of issues 23 and 31: nothing silently dropped, prompt logprobs, /tokenize and /detokenize,
/v1/models/{id}, a model without live workers, metrics that cannot be flooded with series.

Prompt logprobs and tokenization are checked on the real model (float32, where exactness is asserted);
the protocol on the tiny random one. The hostile probes of these surfaces are in tests/test_hostile.py.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest
import torch
from conftest import api_server

from vicuna.conversation import encode, render_prompt
from vicuna.model import load_model
from vicuna.serve.controller import create_controller_app
from vicuna.serve.engine import EngineConfig, HFEngine, drain_retry_after
from vicuna.serve.model_client import ControllerClient
from vicuna.serve.openai_api import create_app
from vicuna.serve.server import ServerThread
from vicuna.serve.worker import create_worker_app

KEY = "sk-api"
HELLO = [{"role": "user", "content": "Hello! What is the capital of France?"}]


@pytest.fixture(scope="module")
def real32(real_model, real_model_dir):
    """The real model in float32 (exactness is asserted against a direct forward)."""
    if next(real_model.model.parameters()).dtype == torch.float32:
        return real_model
    return load_model(real_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def engine(real32):
    eng = HFEngine(real32, EngineConfig(max_batch_size=8, kv_cache_memory="128MiB")).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def server(engine):
    yield from api_server(engine, api_keys=[KEY])


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


# ---------------------------------------------------------------------- prompt logprobs (issue 23 #5)

def direct_logprobs(loaded, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1, from one plain forward over the whole text."""
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_echo_logprobs_equal_a_direct_forward_in_a_batch(server, client, real32):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time, in a small village by the sea, there"]
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)

    async def all_at_once():  # several lengths in one prefill group: left padding must not change a score
        return await asyncio.gather(*(aclient.completions.create(
            model="tiny", prompt=p, echo=True, logprobs=2, max_tokens=0 if i % 2 else 3, temperature=0)
            for i, p in enumerate(prompts)))

    for i, (prompt, r) in enumerate(zip(prompts, asyncio.run(all_at_once()))):
        ids = list(real32.tokenizer(prompt)["input_ids"])
        choice, lp = r.choices[0], r.choices[0].logprobs
        generated = r.usage.completion_tokens
        assert generated == (0 if i % 2 else 3) and choice.text.startswith(prompt)
        assert len(lp.tokens) == len(ids) + generated
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
        expected = direct_logprobs(real32, ids)
        got = torch.tensor(lp.token_logprobs[1:len(ids)])
        assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
        assert "".join(lp.tokens[:len(ids)]) == prompt and lp.text_offset[0] == 0
        assert all(len(t) == 2 for t in lp.top_logprobs[1:])
        assert all(max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
        if i % 2:
            assert choice.finish_reason == "length" and choice.text == prompt


def test_vllm_prompt_logprobs_and_streamed_echo(server, client, real32):
    prompt = "The capital of France is"
    ids = list(real32.tokenizer(prompt)["input_ids"])
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 1})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    expected = direct_logprobs(real32, ids)
    for j, entry in enumerate(plp[1:], start=1):
        mine = entry[str(ids[j])]
        assert abs(mine["logprob"] - float(expected[j - 1])) < 1e-4 and mine["rank"] >= 1
        assert any(e["rank"] == 1 for e in entry.values())
    assert r.choices[0].text and not r.choices[0].text.startswith(prompt)  # no echo without echo
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                                            logprobs=0, stream=True))
    first = chunks[0].choices[0]
    assert first.text == prompt and first.logprobs.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(first.logprobs.token_logprobs[1:]), expected, atol=1e-4)


def test_prompt_logprobs_refused_where_not_computed(tiny_model_dir):
    """A backend without every position's logits answers 400 naming the field, not a silent 200."""
    from vicuna.serve.core import GenerateRequest
    from vicuna.serve.engine import EngineBase
    from vicuna.errors import InvalidRequest

    class NoScores(EngineBase):
        backend = "llamacpp"

    with pytest.raises(InvalidRequest) as e:
        NoScores().prepare(GenerateRequest(prompt="hi", prompt_logprobs=1))
    assert e.value.param == "prompt_logprobs"


# ---------------------------------------------------------------------- /tokenize, /detokenize (issue 23 #6)

def test_tokenize_prompt_and_messages_and_detokenize(server, real32, engine):
    auth = {"Authorization": f"Bearer {KEY}"}
    tok = real32.tokenizer
    r = httpx.post(server + "/tokenize", json={"model": "tiny", "prompt": "Hello world", "return_token_strs": True},
                   headers=auth).json()
    assert r["tokens"] == list(tok("Hello world")["input_ids"]) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == engine.max_model_len and len(r["token_strs"]) == r["count"]
    chat = httpx.post(server + "/tokenize", json={"messages": HELLO}, headers=auth).json()  # the only model
    assert chat["tokens"] == encode(tok, render_prompt(real32.template, HELLO, tok))
    bare = httpx.post(server + "/tokenize", json={"model": "tiny", "messages": HELLO, "add_generation_prompt": False},
                      headers=auth).json()
    assert bare["count"] < chat["count"] and chat["tokens"][:bare["count"]] == bare["tokens"]
    back = httpx.post(server + "/detokenize", json={"model": "tiny", "tokens": r["tokens"]}, headers=auth).json()
    assert back == {"prompt": "Hello world"}
    assert httpx.post(server + "/tokenize", json={"prompt": "x"}).status_code == 401  # keyed like /v1


def test_tokenize_and_a_dead_workers_model_through_the_cluster(engine):
    """Through `serve api`: /tokenize reaches a worker; a registered model whose worker stopped is 503."""
    with ServerThread(create_controller_app(heartbeat_expiry=3.0)) as ctrl, \
            ServerThread(create_worker_app(engine)) as worker:
        register = {"worker_address": worker, "models": [engine.name]}
        assert httpx.post(ctrl + "/register_worker", json=register).status_code == 200
        front = ControllerClient(ctrl)
        with ServerThread(create_app(front)) as api:
            r = httpx.post(api + "/tokenize", json={"model": engine.name, "prompt": "Hello world"}, timeout=30)
            assert r.status_code == 200 and r.json()["tokens"] == list(engine.tokenizer("Hello world")["input_ids"])
            d = httpx.post(api + "/detokenize", json={"model": engine.name, "tokens": r.json()["tokens"]}, timeout=30)
            assert d.json() == {"prompt": "Hello world"}
            deadline = time.monotonic() + 30  # no heartbeat: the worker passes its expiry
            while httpx.get(ctrl + "/workers").json()["workers"] and time.monotonic() < deadline:
                time.sleep(0.2)
            c = openai.OpenAI(base_url=api + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.APIStatusError) as e:
                c.chat.completions.create(model=engine.name, messages=HELLO, max_tokens=2)
            assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
            assert "no live worker" in e.value.message
            with pytest.raises(openai.NotFoundError):  # never registered: still "no such model"
                c.chat.completions.create(model="never-was", messages=HELLO, max_tokens=2)


# ---------------------------------------------------------------------- models, errors, metrics (issues 29, 31)

@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    eng = HFEngine(load_model(tiny_model_dir, device="cpu", model_name="tiny"),
                   EngineConfig(max_batch_size=4, kv_cache_memory="64MiB")).start()
    try:
        yield from api_server(eng, api_keys=[KEY])
    finally:
        eng.stop()


def test_models_retrieve_and_refused_fields_through_the_sdk(tiny_server):
    c = openai.OpenAI(base_url=tiny_server + "/v1", api_key=KEY, max_retries=0)
    m = c.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="best_of") as e:
        c.completions.create(model="tiny", prompt="a", best_of=3, max_tokens=2)
    assert e.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: guided_foo"):
        c.chat.completions.create(model="tiny", messages=HELLO, extra_body={"guided_foo": 1})
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=HELLO, seed=True)
    assert e.value.body["param"] == "seed"


def test_metrics_label_routes_not_raw_paths(tiny_server):
    """1,000 distinct unknown paths, with and without a key, make a bounded number of series."""
    with httpx.Client(base_url=tiny_server, timeout=30) as http:
        for i in range(500):
            http.get(f"/v1/probe-{i}", headers={"Authorization": f"Bearer {KEY}"})
            http.post(f"/v1/x/{i}", json={})  # no key: 401
        for name in ("a", "b", "c"):
            http.get(f"/v1/models/{name}", headers={"Authorization": f"Bearer {KEY}"})
        text = http.get("/metrics").text
    series = re.findall(r'^vicuna_requests_total\{endpoint="([^"]*)",status="(\d+)"\}', text, re.M)
    assert 0 < len(series) <= 10, series
    endpoints = {e for e, _ in series}
    assert "unauthenticated" in endpoints and "/v1/models/{model:path}" in endpoints
    assert not any("probe" in e or re.search(r"/\d", e) for e in endpoints)


def test_retry_after_follows_the_measured_drain_rate():
    now = 100.0
    burst = [now - 2 + i * 0.1 for i in range(20)]  # 20 requests finished in the last 2 s: ~10/s
    assert drain_retry_after(5, burst, now) == 1.0  # 5 waiting drain in 0.5 s: the floor, not 30
    assert drain_retry_after(50, burst, now) == pytest.approx(50 / (19 / 1.9), abs=0.1)
    slow = [now - 20, now - 10]  # one every 10 s
    assert drain_retry_after(3, slow, now) == 30.0
    assert drain_retry_after(3, [], now) == 2.0  # nothing measured yet: a short guess
    assert drain_retry_after(10_000, slow, now) == 60.0


def test_errors_keep_openai_shape_with_the_web_ui_mounted(tmp_path):
    """Issue 31 #4: with the UI mounted at /, its mount used to answer unknown /v1 paths and wrong methods
    with {"detail": "Not Found"}."""
    pytest.importorskip("gradio")
    from vicuna.serve.arena import ArenaStore
    from vicuna.serve.model_client import LocalClient
    from vicuna.serve.web import mount_web

    client = LocalClient({})
    app = mount_web(create_app(client), client, ArenaStore(tmp_path / "arena.db", salt="s"))
    with ServerThread(app) as url:
        for method, path, status in (("GET", "/v1/chat/completions", 405), ("PUT", "/v1/completions", 405),
                                     ("GET", "/v1/x", 404), ("POST", "/v1/engines/a/completions", 404)):
            r = httpx.request(method, url + path, timeout=30)
            assert r.status_code == status, (path, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(url + "/v1/chat/completions").headers["allow"] == "POST"


def test_prompt_logprobs_in_one_prefill_group_equal_direct_forwards(engine, real32):
    """Batched and exact: three prompts of different lengths (left-padded) in ONE prefill forward, a row
    that generates beside rows that only score (max_tokens=0), each equal to its own direct forward."""
    from vicuna.serve.core import GenerateRequest

    prompts = ["Paris is", "The quick brown fox jumps over the lazy dog.", "1 2 3"]

    async def one_group():
        engine._cv.acquire()  # the engine thread waits for this lock: all three are queued before it looks
        try:
            streams = [engine.generate(GenerateRequest(prompt=p, prompt_logprobs=3, temperature=0,
                                                       max_tokens=2 if i == 1 else 0)) for i, p in enumerate(prompts)]
            tasks = [asyncio.ensure_future(s.__anext__()) for s in streams]
            await asyncio.sleep(0.2)
            before = engine.stats().prefill_forwards
        finally:
            engine._cv.release()
        firsts = await asyncio.gather(*tasks)
        for s in streams:
            async for _ in s:
                pass
        return firsts, engine.stats().prefill_forwards - before

    firsts, forwards = asyncio.run(one_group())
    assert forwards == 1
    for prompt, first in zip(prompts, firsts):
        ids = list(real32.tokenizer(prompt)["input_ids"])
        entries = first.prompt_logprobs
        assert [e["token_id"] for e in entries] == ids and entries[0]["logprob"] is None
        got = torch.tensor([e["logprob"] for e in entries[1:]])
        assert torch.allclose(got, direct_logprobs(real32, ids), atol=1e-4)
        assert all(len(e["top"]) == 3 and e["rank"] >= 1 for e in entries[1:])
