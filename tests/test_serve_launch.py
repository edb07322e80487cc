"""The one launch path: every serving entry point builds its engines and apps through
vicuna.serve.launch, with flags generated from the typed configs.

The CLI handlers run for real (`vicuna.cli.main`), only the final blocking ``run_server`` is
swapped for one that serves the built app on a loopback thread while the test talks to it.
"""

from __future__ import annotations

import dataclasses
import errno
import time

import httpx
import openai
import pytest
from conftest import retry_on_port_clash

from vicuna.serve import launch
from vicuna.serve import server as server_mod
from vicuna.serve.model_client import ControllerClient
from vicuna.serve.engine import EngineConfig
from vicuna.serve.web import WebSettings

HELLO = [{"role": "user", "content": "Hello!"}]


def flags_of(argv: list[str]) -> str:
    from vicuna.cli import build_parser

    parser = build_parser(argv)
    sub = parser._subparsers._group_actions[0].choices["serve"]
    if len(argv) > 1:
        sub = sub._subparsers._group_actions[0].choices[argv[1]]
    return " ".join(o for a in sub._actions for o in a.option_strings)


@pytest.mark.parametrize("cls,argv", [(EngineConfig, ["serve"]), (EngineConfig, ["serve", "worker"]),
                                      (launch.ModelConfig, ["serve"]), (launch.ApiConfig, ["serve", "api"]),
                                      (WebSettings, ["serve"]), (WebSettings, ["serve", "web"])])
def test_every_config_field_is_a_flag(cls, argv):
    flags = flags_of(argv).split()
    for f in dataclasses.fields(cls):
        assert "--" + f.metadata.get("flag", f.name.replace("_", "-")) in flags, f.name


def test_a_new_engine_field_becomes_a_flag_with_its_default():
    """What the engine engineer adds to EngineConfig appears without touching the CLI."""
    import argparse

    @dataclasses.dataclass
    class Grown(EngineConfig):
        kv_cache_memory: str | None = dataclasses.field(default=None, metadata={"help": "KV budget, e.g. 2GiB"})
        block_size: int = dataclasses.field(default=16, metadata={"help": "tokens per KV block"})

    p = argparse.ArgumentParser()
    launch.add_flags(p, Grown, "engine")
    cfg = launch.from_flags(Grown, p.parse_args(["--kv-cache-memory", "2GiB", "--max-batch-size", "3"]))
    assert (cfg.kv_cache_memory, cfg.block_size, cfg.max_batch_size, cfg.max_queue) == ("2GiB", 16, 3, 256)
    with pytest.raises(SystemExit):
        p.parse_args(["--block-size", "many"])


def test_bad_config_values_are_usage_errors():
    from vicuna.errors import UsageError

    with pytest.raises(UsageError, match="needs --model-path"):
        launch.ModelConfig(backend="vllm")
    import argparse

    p = argparse.ArgumentParser()
    launch.add_flags(p, EngineConfig, "engine")
    with pytest.raises(UsageError, match="max_batch_size"):
        launch.from_flags(EngineConfig, p.parse_args(["--max-batch-size", "0"]))


class Served:
    """Stands in for the blocking run_server: serves the app in a thread and runs ``check(url)``."""

    def __init__(self, check):
        self.check, self.apps = check, []

    def __call__(self, app, host, port, log_level="info", *, trusted_proxies=None):
        self.apps.append(app)
        with server_mod.ServerThread(app, host, port, trusted_proxies=trusted_proxies) as url:
            self.check(url)


def test_vicuna_serve_flags_reach_the_engine_and_serve(tiny_model_dir, monkeypatch):
    from vicuna.cli import main

    seen = {}
    real_load = launch.load_engine

    def spy(model, engine=None):
        e = real_load(model, engine)
        seen[e.name] = (model, e)
        return e

    def check(url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="sk-a", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/").status_code == 200  # --web mounted the UI at /

    monkeypatch.setattr(launch, "load_engine", spy)
    served = Served(check)
    monkeypatch.setattr(server_mod, "run_server", served)
    assert main(["serve", "--model-path", str(tiny_model_dir), "--model-name", "tiny", "--device", "cpu",
                 "--max-batch-size", "3", "--max-queue", "5", "--max-model-len", "200", "--api-keys", "sk-a,sk-b",
                 "--web", "--arena-db", str(tiny_model_dir.parent / "arena.db"), "--web-concurrency", "2",
                 "--port", "0"]) == 0
    model, engine = seen["tiny"]
    assert (engine.config.max_batch_size, engine.config.max_queue, engine.max_model_len) == (3, 5, 200)
    assert model.device == "cpu" and engine._thread is None  # stopped on the way out


def test_worker_controller_api_and_web_verbs_go_through_launch(tiny_model_dir, monkeypatch, tmp_path):
    from vicuna.cli import main
    from vicuna.serve.controller import create_controller_app

    monkeypatch.setenv("VICUNA_SECRET", "s3")
    controller = server_mod.ServerThread(create_controller_app(secret="s3", heartbeat_expiry=30))
    ctl = controller.start()
    try:
        def worker_check(url):
            r = httpx.get(url + "/model_details", headers={"Authorization": "Bearer s3"})
            assert r.json()["max_batch_size"] == 2 and r.json()["model"] == "w"
            assert httpx.get(url + "/model_details").status_code == 401  # the secret came from $VICUNA_SECRET
            with server_mod.ServerThread(launch.api_app(ControllerClient(ctl, secret="s3"))) as api_url:
                deadline = time.monotonic() + 30
                c = openai.OpenAI(base_url=api_url + "/v1", api_key="x", max_retries=0)
                while [m.id for m in c.models.list().data] != ["w"]:
                    assert time.monotonic() < deadline, "worker never registered"
                    time.sleep(0.1)
                r = c.chat.completions.create(model="w", messages=HELLO, max_tokens=2)
                assert r.choices[0].finish_reason in ("stop", "length")

        monkeypatch.setattr(server_mod, "run_server", Served(worker_check))
        # A worker registers its address before it binds, so it is told a port rather than given port 0.
        assert retry_on_port_clash(lambda port: main([
            "serve", "worker", "--model-path", str(tiny_model_dir), "--model-name", "w", "--device", "cpu",
            "--max-batch-size", "2", "--controller", ctl, "--heartbeat-interval", "0.2", "--port", str(port)])) == 0

        def api_check(url):
            assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()["data"] == []
            assert httpx.get(url + "/v1/models").status_code == 401

        monkeypatch.setattr(server_mod, "run_server", Served(api_check))
        assert main(["serve", "api", "--controller", ctl, "--api-keys", "k", "--port", "0"]) == 0

        def web_check(url):
            assert httpx.get(url + "/health").json() == {"status": "ok"}
            assert httpx.get(url + "/").status_code == 200

        monkeypatch.setattr(server_mod, "run_server", Served(web_check))
        assert main(["serve", "web", "--controller", ctl, "--arena-db", str(tmp_path / "a.db"),
                     "--rate-limit", "3", "--port", "0"]) == 0
        assert (tmp_path / "a.db").exists()

        def controller_check(url):
            assert httpx.get(url + "/health").status_code == 200
            assert httpx.post(url + "/list_models").status_code == 401

        monkeypatch.setattr(server_mod, "run_server", Served(controller_check))
        assert main(["serve", "controller", "--heartbeat-expiry", "3", "--port", "0"]) == 0
    finally:
        controller.stop()


def test_a_taken_port_is_eaddrinuse_to_the_caller_and_the_retry_moves_on():
    """ServerThread binds port 0 unless told a port; a port in use raises OSError(EADDRINUSE) where it was asked
    for, which is what lets a server that must be told its port (a worker) start again on another."""
    from fastapi import FastAPI

    app = FastAPI()
    with server_mod.ServerThread(app) as url:
        taken = int(url.rsplit(":", 1)[1])
        assert taken != 0
        with pytest.raises(OSError) as e:
            server_mod.ServerThread(app, port=taken).start()
        assert e.value.errno == errno.EADDRINUSE

        tried = []

        def start(port):  # the first port offered has been taken meanwhile
            tried.append(port)
            thread = server_mod.ServerThread(app, port=taken if len(tried) == 1 else port)
            thread.start()
            thread.stop()
            return thread.port

        assert retry_on_port_clash(start) not in (0, taken) and len(tried) == 2


def test_eval_answer_local_server_goes_through_launch(tiny_model_dir, monkeypatch, tmp_path):
    from vicuna.cli import main

    calls = []
    real = launch.load_engine
    monkeypatch.setattr(launch, "load_engine", lambda m, e=None: calls.append(m) or real(m, e))
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "category": "math", "turns": ["1+1?"]}\n')
    out = tmp_path / "a.jsonl"
    assert main(["eval", "answer", "--model-path", str(tiny_model_dir), "--questions", str(questions), "-o", str(out),
                 "--max-tokens", "4"]) == 0
    assert [m.model_path for m in calls] == [str(tiny_model_dir)] and out.read_text().count("question_id") == 1


def test_local_api_serves_and_stops_its_engines(tiny_model_dir):
    with launch.local_api(launch.ModelConfig(model_path=str(tiny_model_dir), model_name="t", device="cpu")) as (
            base, engines):
        r = openai.OpenAI(base_url=base, api_key="x", max_retries=0).completions.create(
            model="t", prompt="Hello", max_tokens=2)
        assert r.usage.completion_tokens >= 1
    assert engines["t"]._thread is None


def test_two_models_under_one_name_are_refused_and_the_first_stopped(tiny_model_dir, monkeypatch):
    from vicuna.errors import UsageError

    started = []
    real = launch.load_engine
    monkeypatch.setattr(launch, "load_engine", lambda m, e=None: started.append(real(m, e)) or started[-1])
    m = launch.ModelConfig(model_path=str(tiny_model_dir), model_name="same", device="cpu")
    with pytest.raises(UsageError, match="distinct --model-name"):
        launch.load_engines([m, m])
    assert all(e._thread is None for e in started)


def test_no_serving_module_imports_the_cli():
    """Dependencies point one way (cli -> launch -> engines/apps); the worker once imported the CLI back."""
    import ast
    from pathlib import Path

    import vicuna.serve

    for path in Path(vicuna.serve.__file__).parent.glob("*.py"):
        if path.name in ("cli.py", "arena_cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                assert target not in (".cli", "vicuna.serve.cli"), f"{path.name} imports {target}"


@pytest.mark.parametrize("header,ok", [("Bearer k1", True), ("bearer  k2 ", True), ("Bearer k3", False),
                                       ("k1", False), ("", False), (None, False), ("Basic k1", False)])
def test_bearer_check(header, ok):
    from vicuna.serve.core import bearer_ok

    assert bearer_ok(header, ["k1", "k2"]) is ok
    assert bearer_ok(header, []) is False
