"""`vicuna serve`: one process (engine + OpenAI API), or controller / worker / api / web split."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os

from ..errors import UsageError

log = logging.getLogger(__name__)

SECRET_ENV = "VICUNA_SECRET"  # shared with `vicuna serve web`
DEFAULT_CONTROLLER = "http://127.0.0.1:21001"

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
"""


def _secret(args) -> str | None:
    return getattr(args, "secret", None) or os.environ.get(SECRET_ENV) or None


def _add_model_args(p, *, multiple: bool) -> None:
    from ..model import add_model_args

    add_model_args(p, multiple=multiple)


def _add_engine_args(p) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="hf: our continuous-batching engine over transformers (CPU/CUDA); vllm: vLLM (CUDA, "
                   "pip install -e '.[gpu]')")
    g.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together; 1 = one at a time")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a batch slot; more are refused with 429 + Retry-After")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion token limit (default: the model's context length)")
    g.add_argument("--default-max-tokens", type=int, default=512, help="completion budget when a request sets none")
    from dataclasses import fields

    from .engine import EngineConfig

    for f in fields(EngineConfig):  # until the launch path generates every flag from EngineConfig
        if f.name in _PAGED_ENGINE_FIELDS:
            g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if f.default is not None else str,
                           default=f.default, help=f.metadata["help"])


_PAGED_ENGINE_FIELDS = ("kv_cache_memory", "block_size", "max_prefill_tokens", "max_embedding_inputs",
                        "max_embedding_tokens", "embedding_chunk_tokens")


def _add_http_args(p, port: int, host: str = "127.0.0.1") -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default=host, help="address to bind (0.0.0.0 to accept other machines)")
    g.add_argument("--port", type=int, default=port, help="port to listen on")


def _add_api_args(p) -> None:
    g = p.add_argument_group("api")
    g.add_argument("--api-keys", default=None,
                   help="comma-separated keys clients must send as 'Authorization: Bearer KEY' (default: none)")
    g.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest accepted request body")
    g.add_argument("--max-n", type=int, default=8, help="largest n (choices per request)")


def add_upstream_args(p) -> None:
    """--endpoints and the moderation flags (their help is on the config fields)."""
    from .endpoint import EndpointsConfig
    from .moderation import ModerationConfig

    g = p.add_argument_group("endpoints and moderation")
    for cls in (EndpointsConfig, ModerationConfig):
        for f in dataclasses.fields(cls):
            g.add_argument("--" + f.name.replace("_", "-"), default=None, metavar=f.metadata["metavar"],
                           help=f.metadata["help"])


def front_client(base, args):
    """What the API and the web UI serve: ``base`` (our engines, a controller's workers, or None) with
    the endpoints beside it and the moderation in front."""
    from .endpoint import EndpointsConfig
    from .moderation import ModerationConfig

    client = EndpointsConfig(getattr(args, "endpoints", None)).wrap(base)
    if client is None:
        raise UsageError("nothing to serve: give --controller (workers) or --endpoints FILE.yaml (or both)")
    return ModerationConfig(getattr(args, "moderation_endpoint", None),
                            getattr(args, "moderation_words", None)).wrap(client)


def controller_url(args) -> str | None:
    """--controller, by default the local one; none when only --endpoints are served."""
    if args.controller:
        return args.controller
    return None if getattr(args, "endpoints", None) else DEFAULT_CONTROLLER


def _api_keys(args) -> list[str] | None:
    keys = [k.strip() for k in (args.api_keys or "").split(",") if k.strip()]
    return keys or None


def build_engine(loaded, args):
    """An engine for ``loaded`` as the flags ask; started."""
    from .engine import EngineConfig, HFEngine

    config = EngineConfig(max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                          max_model_len=args.max_model_len, default_max_tokens=args.default_max_tokens,
                          **{name: getattr(args, name) for name in _PAGED_ENGINE_FIELDS})
    if args.backend == "vllm":
        from .engine_vllm import VLLMEngine

        return VLLMEngine.from_args(args, config).start()
    return HFEngine(loaded, config).start()


def load_engines(args) -> dict:
    from ..model import load_from_args

    paths = args.model_path or [None]
    names = args.model_name or []
    if len(names) > len(paths):
        raise UsageError(f"{len(names)} --model-name given for {len(paths)} --model-path; give one name per path")
    engines = {}
    for i, path in enumerate(paths):
        one = copy.copy(args)
        one.model_path, one.model_name = path, names[i] if i < len(names) else None
        loaded = None if args.backend == "vllm" else load_from_args(one)
        name = one.model_name or (loaded.name if loaded else os.path.basename(str(path).rstrip("/")))
        if name in engines:
            raise UsageError(f"two models would be served as {name!r}; give distinct --model-name values")
        one.model_name = name
        engines[name] = build_engine(loaded, one)
        log.info("serving %s", name)
    return engines


def run_single(args) -> int:
    from .client import LocalClient
    from .openai_api import create_app
    from .server import run_server, trusted_proxies

    engines = load_engines(args)
    client = front_client(LocalClient(engines), args)
    app = create_app(client, api_keys=_api_keys(args), max_body_bytes=args.max_body_bytes, max_n=args.max_n)
    if args.web:
        try:
            from .web import maybe_mount_web
        except ImportError:
            raise UsageError("--web: the web UI is not available in this installation (vicuna.serve.web)") from None
        app = maybe_mount_web(app, client, args) or app
    print(f"OpenAI-compatible API for {', '.join(engines)} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        run_server(app, args.host, args.port, trusted_proxies=trusted_proxies(args))
    finally:
        for e in engines.values():
            e.stop()
    return 0


def run_worker(args) -> int:
    from .worker import run_worker as run

    return run(args, secret=_secret(args))


def run_controller(args) -> int:
    from .controller import create_controller_app
    from .server import run_server

    from .endpoint import EndpointClient, load_endpoints

    endpoints = EndpointClient(load_endpoints(args.endpoints)) if args.endpoints else None
    app = create_controller_app(secret=_secret(args), heartbeat_expiry=args.heartbeat_expiry, endpoints=endpoints)
    print(f"controller on http://{args.host}:{args.port}", flush=True)
    run_server(app, args.host, args.port)
    return 0


def run_api(args) -> int:
    from .client import ControllerClient
    from .openai_api import create_app
    from .server import run_server

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per routed request
    controller = controller_url(args)
    client = front_client(ControllerClient(controller, secret=_secret(args)) if controller else None, args)
    app = create_app(client, api_keys=_api_keys(args), max_body_bytes=args.max_body_bytes, max_n=args.max_n)
    source = " and ".join(x for x in (controller, args.endpoints) if x)
    print(f"OpenAI-compatible API via {source} on http://{args.host}:{args.port}/v1", flush=True)
    run_server(app, args.host, args.port)
    return 0


def add_commands(sub) -> None:
    from ..cli import area_parser, command

    verbs = area_parser(sub, "serve", "serve models: OpenAI API, controller, workers", description=SINGLE_DESCRIPTION)
    top = sub.choices["serve"]
    _add_model_args(top, multiple=True)
    _add_engine_args(top)
    _add_http_args(top, 8000)
    _add_api_args(top)
    top.add_argument("--web", action="store_true", help="also serve the chat web UI on the same port")
    add_upstream_args(top)
    top.set_defaults(func=run_single)

    p = command(verbs, "worker", run_worker, "hold a model and serve it to a controller", description="""\
Load one model, start the engine, register with the controller and send it a
heartbeat (with the queue length) every --heartbeat-interval seconds.
Serves streaming generation, token counting, the conversation template,
model details, embeddings, status, /health and /metrics.

Example (on a GPU host, controller on host ctl):
  vicuna serve worker --model-path ./vicuna-7b --controller http://ctl:21001 \\
      --host 0.0.0.0 --port 21002 --worker-address http://$(hostname):21002
""")
    _add_model_args(p, multiple=False)
    _add_engine_args(p)
    _add_http_args(p, 21002)
    p.add_argument("--controller", default="http://127.0.0.1:21001", help="controller URL")
    p.add_argument("--worker-address", default=None,
                   help="URL others reach this worker at (default: http://HOST:PORT)")
    p.add_argument("--heartbeat-interval", type=float, default=5.0, help="seconds between heartbeats")
    p.add_argument("--secret", default=None,
                   help=f"shared secret for controller/worker traffic (or set ${SECRET_ENV}); default: none")

    p = command(verbs, "controller", run_controller, "track workers and route requests", description="""\
Keep the registry of live workers (a worker missing heartbeats for
--heartbeat-expiry seconds is dropped), list models, and hand each request to
the worker with the shortest queue.

Example:
  VICUNA_SECRET=s3cret vicuna serve controller --host 0.0.0.0 --port 21001
""")
    _add_http_args(p, 21001)
    p.add_argument("--heartbeat-expiry", type=float, default=15.0,
                   help="drop a worker after this many seconds without a heartbeat")
    p.add_argument("--secret", default=None, help=f"require this shared secret (or set ${SECRET_ENV})")
    p.add_argument("--endpoints", default=None, metavar="FILE.yaml",
                   help="OpenAI-compatible upstreams to list and serve beside the workers' models: front ends "
                        "reach them through this controller (the keys come from this process's environment)")

    p = command(verbs, "api", run_api, "OpenAI-compatible API in front of a controller", description="""\
The same OpenAI-compatible API as `vicuna serve`, answering from the workers
behind --controller (retrying on another worker if one fails before a
response has started).

Example:
  vicuna serve api --controller http://ctl:21001 --host 0.0.0.0 --port 8000 --api-keys sk-a,sk-b
""")
    p.add_argument("--controller", default=None,
                   help=f"controller URL (default {DEFAULT_CONTROLLER}; none with --endpoints alone)")
    p.add_argument("--secret", default=None, help=f"shared secret of the controller (or set ${SECRET_ENV})")
    _add_http_args(p, 8000)
    _add_api_args(p)
    add_upstream_args(p)

    try:  # the web UI registers its own verb (`vicuna serve web`) when it is installed
        from . import web
    except ImportError:
        web = None
    if web is not None and hasattr(web, "add_web_command"):
        web.add_web_command(verbs)
    if web is not None and hasattr(web, "add_web_arguments"):
        web.add_web_arguments(top, web_flag=False)  # --arena-db and the UI's limits, next to --web
