"""`vicuna serve`: one process (engine + OpenAI API), or controller / worker / api / web split.

Flags come from the configs of :mod:`vicuna.serve.launch` (and the engine's and web UI's),
and each handler turns the parsed flags into those configs, then calls launch.
"""

from __future__ import annotations

import argparse

from . import launch as L
from .endpoint import EndpointsConfig
from .engine import EngineConfig
from .moderation import ModerationConfig
from .web import WebSettings

SINGLE_DESCRIPTION = """\
Serve one or more models with an OpenAI-compatible API from this process.

With no verb, `vicuna serve` loads the model(s), starts the continuous-batching
engine and answers /v1/chat/completions, /v1/completions, /v1/embeddings,
/v1/models, /health and /metrics on --host:--port. No controller is needed:
this is the default for one machine. For several machines use the verbs
(controller, worker, api, web); see docs/serving.md.

Example:
  vicuna serve --model-path ./vicuna-7b --port 8000 --api-keys sk-local
  curl -H 'Authorization: Bearer sk-local' localhost:8000/v1/models
  vicuna serve --model-path ./a --model-path ./b --model-name A --model-name B
  vicuna serve --backend llamacpp --model-path ./smollm2.Q4_1.gguf --threads 4
"""

WORKER_DESCRIPTION = """\
Load one model, start the engine, register with the controller and send it a
heartbeat (with the queue length) every --heartbeat-interval seconds.
Serves streaming generation, token counting, the conversation template,
model details, embeddings, status, /health and /metrics.

Example (on a GPU host, controller on host ctl):
  vicuna serve worker --model-path ./vicuna-7b --controller http://ctl:21001 \\
      --host 0.0.0.0 --port 21002 --worker-address http://$(hostname):21002
"""

CONTROLLER_DESCRIPTION = """\
Keep the registry of live workers (a worker missing heartbeats for
--heartbeat-expiry seconds is dropped), list models, and hand each request to
the worker with the shortest queue.

Example:
  VICUNA_SECRET=s3cret vicuna serve controller --host 0.0.0.0 --port 21001
"""

API_DESCRIPTION = """\
The same OpenAI-compatible API as `vicuna serve`, answering from the workers
behind --controller (retrying on another worker if one fails before a
response has started).

Example:
  vicuna serve api --controller http://ctl:21001 --host 0.0.0.0 --port 8000 --api-keys sk-a,sk-b
"""

WEB_DESCRIPTION = """\
Serve the web UI: Chat (streaming, stop, regenerate, parameters, 👍/👎/flag), Arena (two anonymous
models, vote, names revealed after the vote), Side-by-side (named) and Leaderboard (Bradley-Terry
ratings with bootstrap intervals). Models come from the controller; every conversation, vote and
flag is stored in the SQLite file --arena-db.

For one machine, `vicuna serve --model-path P --web` serves the API and this UI on one port.

example:
  vicuna serve controller --port 21001 &
  vicuna serve worker --model-path lmsys/vicuna-7b-v1.5 --controller http://127.0.0.1:21001 &
  vicuna serve web --controller http://127.0.0.1:21001 --port 7860 --arena-db arena.db
  # later: vicuna arena leaderboard --db arena.db
"""

WEB_UI = "web UI (chat, arena, leaderboard)"


UPSTREAMS = "endpoints and moderation"


def run_single(args) -> int:
    web = L.from_flags(L.WebConfig, args) if args.web else None
    return L.serve_single(L.model_configs(args), L.from_flags(EngineConfig, args), L.from_flags(L.HttpConfig, args),
                          L.from_flags(L.ApiConfig, args), web, L.from_flags(WebSettings, args),
                          L.from_flags(EndpointsConfig, args), L.from_flags(ModerationConfig, args))


def run_worker(args) -> int:
    return L.serve_worker(L.from_flags(L.ModelConfig, args), L.from_flags(EngineConfig, args),
                          L.from_flags(L.HttpConfig, args), L.from_flags(L.ClusterConfig, args),
                          L.from_flags(L.WorkerConfig, args))


def run_controller(args) -> int:
    return L.serve_controller(L.from_flags(L.HttpConfig, args), L.from_flags(L.ClusterConfig, args),
                              L.from_flags(L.ControllerConfig, args), L.from_flags(EndpointsConfig, args))


def run_api(args) -> int:
    return L.serve_api(L.from_flags(L.HttpConfig, args), L.from_flags(L.ApiConfig, args),
                       L.from_flags(L.ClusterConfig, args), L.from_flags(EndpointsConfig, args),
                       L.from_flags(ModerationConfig, args))


def run_web(args) -> int:
    return L.serve_web(L.from_flags(L.HttpConfig, args), L.from_flags(L.ClusterConfig, args),
                       L.from_flags(L.WebConfig, args), L.from_flags(WebSettings, args),
                       L.from_flags(EndpointsConfig, args), L.from_flags(ModerationConfig, args),
                       "info" if args.debug else "warning")


def _upstreams(p: argparse.ArgumentParser, *, moderation: bool = True) -> None:
    L.add_flags(p, EndpointsConfig, UPSTREAMS)
    if moderation:
        L.add_flags(p, ModerationConfig, UPSTREAMS)


def _http(p: argparse.ArgumentParser, role: str) -> None:
    L.add_flags(p, L.HttpConfig, "server", defaults={"port": L.PORTS[role]})


def add_commands(sub) -> None:
    from ..commands import area_parser, command

    verbs = area_parser(sub, "serve", "serve models: OpenAI API, controller, workers", description=SINGLE_DESCRIPTION)
    top = sub.choices["serve"]
    L.add_flags(top, L.ModelConfig, "model", repeat=("model_path", "model_name"))
    L.add_flags(top, EngineConfig, "engine")
    _http(top, "api")
    L.add_flags(top, L.ApiConfig, "api")
    top.add_argument("--web", action="store_true", help="also serve the chat web UI at / on the same port")
    L.add_flags(top, L.WebConfig, WEB_UI)
    L.add_flags(top, WebSettings, WEB_UI)
    _upstreams(top)
    top.set_defaults(func=run_single)

    p = command(verbs, "worker", run_worker, "hold a model and serve it to a controller",
                description=WORKER_DESCRIPTION)
    L.add_flags(p, L.ModelConfig, "model")
    L.add_flags(p, EngineConfig, "engine")
    _http(p, "worker")
    L.add_flags(p, L.ClusterConfig, "cluster")
    L.add_flags(p, L.WorkerConfig, "cluster")

    p = command(verbs, "controller", run_controller, "track workers and route requests",
                description=CONTROLLER_DESCRIPTION)
    _http(p, "controller")
    L.add_flags(p, L.ClusterConfig, "cluster", skip=("controller",))
    L.add_flags(p, L.ControllerConfig, "cluster")
    _upstreams(p, moderation=False)  # front ends moderate; the controller only lists and routes

    p = command(verbs, "api", run_api, "OpenAI-compatible API in front of a controller", description=API_DESCRIPTION)
    L.add_flags(p, L.ClusterConfig, "cluster")
    _http(p, "api")
    L.add_flags(p, L.ApiConfig, "api")
    _upstreams(p)

    p = command(verbs, "web", run_web, "web UI (chat, arena, leaderboard) in front of a controller",
                description=WEB_DESCRIPTION)
    L.add_flags(p, L.ClusterConfig, "cluster")
    _http(p, "web")
    L.add_flags(p, L.WebConfig, WEB_UI)
    L.add_flags(p, WebSettings, WEB_UI)
    _upstreams(p)
