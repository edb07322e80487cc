"""The distributed set-up: the web UI's logic through a real controller and two real workers,
and `vicuna serve web --controller URL` serving the page."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import urllib.request

import pytest
from conftest import ROOT, cli_env, cli_server

from vicuna.serve.arena import ArenaStore
from vicuna.serve.model_client import ControllerClient
from vicuna.serve.web import WebApp, WebError, WebSettings

IP = "192.0.2.44"


@pytest.fixture(scope="module")
def controller(tiny_model_dir, sp_model_dir):
    """A controller with two workers (BPE and SentencePiece tiny models) registered by heartbeat."""
    from vicuna.model import load_model
    from vicuna.serve.controller import create_controller_app
    from vicuna.serve.engine import EngineConfig, HFEngine
    from vicuna.serve.server import ServerThread
    from vicuna.serve.worker import Heartbeater, create_worker_app

    ctl = ServerThread(create_controller_app(heartbeat_expiry=30))
    url = ctl.start()
    parts = []
    for name, path in (("bpe-model", tiny_model_dir), ("sp-model", sp_model_dir)):
        engine = HFEngine(load_model(path, device="cpu", model_name=name), EngineConfig(max_batch_size=4,
                                                                                        default_max_tokens=24)).start()
        worker = ServerThread(create_worker_app(engine))
        worker_url = worker.start()
        beat = Heartbeater(url, worker_url, engine, interval=0.5).start()
        parts.append((engine, worker, beat))
    for _, _, beat in parts:
        assert beat.registered.wait(20), "worker did not register"
    yield url
    for engine, worker, beat in parts:
        beat.stop()
        worker.stop()
        engine.stop()
    ctl.stop()


def test_battle_through_controller(controller, tmp_path):
    async def scenario():
        client = ControllerClient(controller)
        store = ArenaStore(tmp_path / "arena.db", salt="s")
        app = WebApp(client, store, WebSettings(), rng=random.Random(1))
        try:
            assert sorted(await app.models()) == ["bpe-model", "sp-model"]
            _, ha, hb, state = await app.arena_add_user("Hello there!", None, None, None, anonymous=True, ip=IP)
            outs = [x async for x in app.arena_stream(state, None, None, None, IP)]
            ha, hb, status, state = outs[-1]
            assert state["answered"], status
            assert ha[-1]["role"] == hb[-1]["role"] == "assistant" and ha[-1]["content"] and hb[-1]["content"]
            reveal, _ = await app.vote(state, "tie (bothbad)", IP)
            assert "Both are bad" in reveal
            (vote,) = list(store.iter_votes())
            assert {vote["model_a"], vote["model_b"]} == {"bpe-model", "sp-model"}
            assert vote["winner"] == "tie (bothbad)"
        finally:
            await client.close()
            store.close()

    asyncio.run(scenario())


def test_unreachable_controller_is_named(tmp_path, closed_port):
    async def scenario():
        client = ControllerClient(f"http://127.0.0.1:{closed_port}")
        app = WebApp(client, ArenaStore(tmp_path / "arena.db", salt="s"))
        try:
            with pytest.raises(WebError) as e:
                await app.arena_add_user("hi", None, None, None, anonymous=True, ip=IP)
            assert e.value.title == "Model unavailable" and "cannot reach the controller" in str(e.value)
            outs = [x async for x in app.chat_stream({"messages": [{"role": "user", "content": "hi"}]}, "m", 0.7, 1, 8,
                                                    IP)]
            assert outs[-1][1].startswith("**Error — Model unavailable**")
        finally:
            await client.close()

    asyncio.run(scenario())


def test_serve_web_verb_serves_the_page(controller, tmp_path):
    db = tmp_path / "web.db"
    with cli_server("serve", "web", "--controller", controller, "--arena-db", db, ready=("/",), timeout=90) as web:
        with urllib.request.urlopen(f"{web.url}/", timeout=10) as r:
            page = r.read().decode()
        assert "gradio" in page.lower()
        with urllib.request.urlopen(f"{web.url}/health", timeout=5) as r:
            assert r.status == 200
        assert db.exists()

    bad = subprocess.run([sys.executable, "-m", "vicuna", "serve", "web", "--controller", controller,
                          "--rate-limit", "-1"], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--rate-limit" in bad.stderr
