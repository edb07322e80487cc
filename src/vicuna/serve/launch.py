"""The one launch path: typed configs -> engines, clients and apps.

Every entry point that serves a model goes through here: `vicuna serve` and its verbs
(worker, controller, api, web), `eval answer`'s in-process server, the benchmarks and the
tests. The configs are plain dataclasses; their CLI flags are generated from the fields
(:func:`add_flags`, each field's ``metadata["help"]``), so a new field — in
:class:`~vicuna.serve.engine.base.EngineConfig`, say — is a flag everywhere at once, with its
default stated only on the field. Below the CLI nothing sees an ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import UsageError, VicunaError
from .arena import DEFAULT_DB_HELP
from .endpoint import EndpointsConfig
from .engine.base import BACKENDS, EngineConfig, ModelConfig, served  # noqa: F401 - the configs the commands use
from .moderation import ModerationConfig
from .openai_api import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_N
from .web import WebSettings

log = logging.getLogger(__name__)

SECRET_ENV = "VICUNA_SECRET"
PORTS = {"api": 8000, "worker": 21002, "controller": 21001, "web": 7860}
DEFAULT_CONTROLLER = f"http://127.0.0.1:{PORTS['controller']}"


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class HttpConfig:
    host: str = _f("127.0.0.1", "address to bind (0.0.0.0 to accept other machines)")
    port: int = _f(PORTS["api"], "port to listen on")
    trusted_proxies: tuple[str, ...] = _f((), "comma-separated addresses of reverse proxies whose X-Forwarded-For "
                                              "header names the client (e.g. 127.0.0.1 for an nginx on this host); "
                                              "from anyone else the header is ignored, so rate and vote limits "
                                              "cannot be dodged by forging it (default: none)", metavar="ADDRS")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class ApiConfig:
    """The OpenAI-compatible API's own limits."""

    api_keys: tuple[str, ...] = _f((), "comma-separated keys clients must send as 'Authorization: Bearer KEY' "
                                       "(default: none)", metavar="KEYS")
    max_body_bytes: int = _f(DEFAULT_MAX_BODY_BYTES, "largest accepted request body")
    max_n: int = _f(DEFAULT_MAX_N, "largest n (choices per request)")
    allow_runtime_lora: bool = _f(False, "serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's "
                                         "runtime LoRA API, behind --api-keys): a client may then make the server "
                                         "read any adapter directory it can see, so it is off by default")
    tool_parser: str | None = _f(None, "how tool calls are read from a model's text with tool_choice auto: hermes "
                                       "(<tool_call>{...}</tool_call>), mistral ([TOOL_CALLS] [...]) or llama3_json "
                                       "({\"name\", \"parameters\"}); default: whichever format the text has",
                                 metavar="NAME")

    def __post_init__(self):
        from .tools import PARSERS

        if self.tool_parser is not None and self.tool_parser not in PARSERS:
            raise UsageError(f"--tool-parser {self.tool_parser!r} is not one of {', '.join(PARSERS)}")


@dataclass
class ClusterConfig:
    """Where the controller is and the secret shared by controller, workers and front ends."""

    controller: str | None = _f(None, f"controller URL (default {DEFAULT_CONTROLLER}; front ends given only "
                                      "--endpoints use none)", metavar="URL")
    secret: str | None = _f(None, f"shared secret for controller/worker traffic (or set ${SECRET_ENV}); "
                                  "default: none")

    def __post_init__(self):
        self.secret = self.secret or os.environ.get(SECRET_ENV) or None

    def url(self, *, optional: bool = False) -> str | None:
        """The controller to use; with ``optional`` (a front end that has --endpoints) none unless given."""
        return self.controller or (None if optional else DEFAULT_CONTROLLER)


@dataclass
class WorkerConfig:
    worker_address: str | None = _f(None, "URL others reach this worker at (default: http://HOST:PORT)")
    heartbeat_interval: float = _f(5.0, "seconds between heartbeats")


@dataclass
class ControllerConfig:
    heartbeat_expiry: float = _f(15.0, "drop a worker after this many seconds without a heartbeat")


@dataclass
class WebConfig:
    arena_db: str | None = _f(None, "SQLite file storing conversations, votes and feedback (created if missing; "
                                    "the IP-hash salt goes to FILE.salt beside it; default: " + DEFAULT_DB_HELP + ")",
                              metavar="FILE")


# -- flags from fields ------------------------------------------------------------------------


def _kind(hint) -> type:
    """The scalar type a field's annotation stands for (``int | None`` -> int)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def add_flags(parser, cls, title: str, *, defaults: dict[str, Any] | None = None, repeat: tuple[str, ...] = (),
              skip: tuple[str, ...] = ()) -> None:
    """One ``--kebab-case`` flag per field of the dataclass ``cls``, in a group ``title``.

    ``defaults`` overrides field defaults for this command (a worker's port), ``repeat`` makes
    flags repeatable (several models in one process), ``skip`` leaves fields out.
    """
    group = next((g for g in parser._action_groups if g.title == title), None) or parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("cli", True):
            continue
        meta, kind = f.metadata, _kind(hints[f.name])
        default = (defaults or {}).get(f.name, f.default)
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help", "")}
        if meta.get("append"):  # a repeatable flag whose values all go to this one config (--lora a=.. --lora b=..)
            kw.update(action="append", default=None, type=str, metavar=meta.get("metavar"))
        elif kind is bool:
            kw.update(action=argparse.BooleanOptionalAction if default else "store_true", default=default)
        else:
            kw.update(type=str if kind in (tuple, list) else kind, choices=meta.get("choices"),
                      metavar=meta.get("metavar"), default=",".join(default) if kind is tuple else default)
        if f.name in repeat:
            kw.update(action="append", default=None)
            kw["help"] += "; repeat for several, in the same order"
        group.add_argument("--" + meta.get("flag", f.name.replace("_", "-")), **kw)


def from_flags(cls, args: argparse.Namespace, **values):
    """The ``cls`` the parsed flags describe (fields without a flag keep their defaults)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if _kind(hints[f.name]) is tuple and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        values[f.name] = value
    try:
        return cls(**values)
    except (VicunaError, ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def model_configs(args: argparse.Namespace) -> list[ModelConfig]:
    """One ModelConfig per repeated --model-path (with its --model-name); the other flags are shared."""
    paths = args.model_path or [None]
    names = args.model_name or []
    if len(names) > len(paths):
        raise UsageError(f"{len(names)} --model-name given for {len(paths)} --model-path; give one name per path")
    return [from_flags(ModelConfig, args, model_path=p, model_name=names[i] if i < len(names) else None)
            for i, p in enumerate(paths)]


# -- engines, clients, apps -------------------------------------------------------------------


def load_engine(model: ModelConfig, engine: EngineConfig | None = None):
    """A started engine serving ``model`` as ``model.served_name`` with the chosen backend (its ``--lora
    NAME=PATH`` adapters are in ``served(engine)``)."""
    engine = engine or EngineConfig()
    if engine.speculative and model.backend != "hf":
        raise UsageError(f"--speculative is for the hf backend; --backend {model.backend} has its own (vLLM: "
                         "--speculative-config; llama.cpp: --draft options of its server)")
    if model.backend == "vllm":
        from .engine.vllm import VLLMEngine

        return VLLMEngine.load(model, engine).start()
    if model.backend == "llamacpp":
        from .engine.llamacpp import LlamaCppEngine

        return LlamaCppEngine.load(model, engine).start()
    from .engine.hf import HFEngine

    return HFEngine(load_hf_model(model), engine, adapters=model.lora_adapters).start()


def load_hf_model(model: ModelConfig):
    """``model`` loaded through transformers (:func:`vicuna.model.load_model`): the hf backend, and `vicuna chat`."""
    from ..model import load_model, resolve_model_path

    return load_model(
        resolve_model_path(model.model_path), device=model.device, dtype=model.dtype, num_gpus=model.num_gpus,
        max_gpu_memory=model.max_gpu_memory, load_8bit=model.load_8bit, lora=model.applied_lora,
        conv_template=model.conv_template, model_name=model.model_name, trust_remote_code=model.trust_remote_code,
        quantization=model.quantization)


def load_engines(models: list[ModelConfig], engine: EngineConfig | None = None) -> dict[str, Any]:
    """Started engines by served name; names must be distinct. On failure, the ones started are stopped."""
    engines: dict[str, Any] = {}
    try:
        for m in models:
            e = load_engine(m, engine)
            names = served(e)
            clash = sorted(set(names) & set(engines))
            if clash:
                e.stop()
                raise UsageError(f"two models would be served as {clash[0]!r}; give distinct --model-name values "
                                 "and --lora names")
            engines.update(names)
            log.info("serving %s (%s backend)", ", ".join(names), m.backend)
    except BaseException:
        stop_engines(engines)
        raise
    return engines


def stop_engines(engines: dict[str, Any]) -> None:
    for e in engines.values():
        e.stop()


def api_app(client, api: ApiConfig | None = None, engines: dict[str, Any] | None = None):
    """The OpenAI-compatible API over any ModelClient (engines in this process or a controller); ``engines``
    (a LocalClient's table) feed /metrics and, with --allow-runtime-lora, take adapters at runtime."""
    from .openai_api import create_app

    api = api or ApiConfig()
    return create_app(client, api_keys=list(api.api_keys) or None, max_body_bytes=api.max_body_bytes,
                      max_n=api.max_n, engines=engines.engines if engines is not None else None,
                      lora_manager=engines if engines is not None and api.allow_runtime_lora else None,
                      tool_parser=api.tool_parser)


def web_store(web: WebConfig):
    from .arena import ArenaStore, default_db

    return ArenaStore(web.arena_db or default_db())


def front_client(base, endpoints: EndpointsConfig | None = None, moderation: ModerationConfig | None = None):
    """What an API or web UI serves: ``base`` (engines here, a controller's workers, or None) with the
    endpoints beside it and the moderation in front."""
    client = (endpoints or EndpointsConfig()).wrap(base)
    if client is None:
        raise UsageError("nothing to serve: give --controller (workers) or --endpoints FILE.yaml (or both)")
    return (moderation or ModerationConfig()).wrap(client)


def with_web(app, client, web: WebConfig, settings: WebSettings | None = None):
    """``app`` (the API) with the web UI mounted at /; under --arena-only its /v1 answers 404."""
    from .web import ArenaOnlyMiddleware, mount_web

    store = web_store(web)
    log.info("web UI at / (arena database %s)", store.path)
    if settings is not None and settings.arena_only:
        app.add_middleware(ArenaOnlyMiddleware)
    return mount_web(app, client, store, settings)


def local_app(engines: dict[str, Any], api: ApiConfig | None = None, web: WebConfig | None = None,
              settings: WebSettings | None = None, endpoints: EndpointsConfig | None = None,
              moderation: ModerationConfig | None = None):
    """The API over ``engines`` in this process (plus endpoints, behind moderation); with ``web``, the
    web UI mounted at / of the same app."""
    from .model_client import LocalClient

    local = LocalClient(engines)
    client = front_client(local, endpoints, moderation)
    app = api_app(client, api, engines=local)
    return app if web is None else with_web(app, client, web, settings)


@contextlib.contextmanager
def local_api(models: ModelConfig | list[ModelConfig], engine: EngineConfig | None = None,
              api: ApiConfig | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Serve models on a free loopback port for the duration: yields (``http://127.0.0.1:PORT/v1``, engines).

    What `eval answer --model-path`, the benchmarks and the tests use, so they exercise exactly the
    path `vicuna serve` does.
    """
    from .server import ServerThread

    engines = load_engines(models if isinstance(models, list) else [models], engine)
    try:
        with ServerThread(local_app(engines, api)) as url:
            yield f"{url}/v1", engines
    finally:
        stop_engines(engines)


# -- the commands (foreground servers) --------------------------------------------------------


def serve_single(models: list[ModelConfig], engine: EngineConfig, http: HttpConfig, api: ApiConfig,
                 web: WebConfig | None = None, settings: WebSettings | None = None,
                 endpoints: EndpointsConfig | None = None, moderation: ModerationConfig | None = None) -> int:
    """`vicuna serve`: engines and the OpenAI API (and the web UI) in this process."""
    from .server import run_server

    engines = load_engines(models, engine)
    try:
        app = local_app(engines, api, web, settings, endpoints, moderation)
        print(f"OpenAI-compatible API for {', '.join(engines)} on {http.url}/v1", flush=True)
        run_server(app, http.host, http.port, trusted_proxies=list(http.trusted_proxies))
    finally:
        stop_engines(engines)
    return 0


def worker_address(http: HttpConfig, worker: WorkerConfig) -> str:
    host = "127.0.0.1" if http.host == "0.0.0.0" else http.host
    return (worker.worker_address or f"http://{host}:{http.port}").rstrip("/")


def serve_worker(model: ModelConfig, engine: EngineConfig, http: HttpConfig, cluster: ClusterConfig,
                 worker: WorkerConfig) -> int:
    """`vicuna serve worker`: one engine behind HTTP, registered with the controller."""
    from .server import run_server
    from .worker import Heartbeater, create_worker_app

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per heartbeat
    eng = load_engine(model, engine)
    address = worker_address(http, worker)
    beat = Heartbeater(cluster.url(), address, eng, secret=cluster.secret, interval=worker.heartbeat_interval).start()
    print(f"worker for {eng.name} on {address}, controller {cluster.url()}", flush=True)
    try:
        run_server(create_worker_app(eng, secret=cluster.secret), http.host, http.port)
    finally:
        beat.stop()
        eng.stop()
    return 0


def serve_controller(http: HttpConfig, cluster: ClusterConfig, controller: ControllerConfig,
                     endpoints: EndpointsConfig | None = None) -> int:
    """`vicuna serve controller`; with --endpoints it serves those upstreams to its front ends like
    workers of its own (the file and the keys stay on the controller's host)."""
    from .controller import create_controller_app
    from .endpoint import EndpointClient, load_endpoints
    from .server import run_server

    upstreams = EndpointClient(load_endpoints(endpoints.endpoints)) if endpoints and endpoints.endpoints else None
    app = create_controller_app(secret=cluster.secret, heartbeat_expiry=controller.heartbeat_expiry,
                                endpoints=upstreams)
    print(f"controller on {http.url}", flush=True)
    run_server(app, http.host, http.port)
    return 0


def _front(cluster: ClusterConfig, endpoints: EndpointsConfig, moderation: ModerationConfig):
    """A front end's client (a controller's workers and/or the endpoints) and a description of its source."""
    from .model_client import ControllerClient

    controller = cluster.url(optional=bool(endpoints.endpoints))
    base = ControllerClient(controller, secret=cluster.secret) if controller else None
    return front_client(base, endpoints, moderation), " and ".join(x for x in (controller, endpoints.endpoints) if x)


def serve_api(http: HttpConfig, api: ApiConfig, cluster: ClusterConfig, endpoints: EndpointsConfig | None = None,
              moderation: ModerationConfig | None = None) -> int:
    """`vicuna serve api`: the OpenAI API in front of a controller's workers and/or endpoints."""
    from .server import run_server

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per routed request
    client, source = _front(cluster, endpoints or EndpointsConfig(), moderation or ModerationConfig())
    print(f"OpenAI-compatible API via {source} on {http.url}/v1", flush=True)
    run_server(api_app(client, api), http.host, http.port, trusted_proxies=list(http.trusted_proxies))
    return 0


def serve_web(http: HttpConfig, cluster: ClusterConfig, web: WebConfig, settings: WebSettings,
              endpoints: EndpointsConfig | None = None, moderation: ModerationConfig | None = None,
              log_level: str = "warning") -> int:
    """`vicuna serve web`: the web UI in front of a controller's workers and/or endpoints."""
    from .server import run_server
    from .web import create_web_app

    client, source = _front(cluster, endpoints or EndpointsConfig(), moderation or ModerationConfig())
    store = web_store(web)
    app = create_web_app(client, store, settings)
    print(f"web UI on {http.url} (models from {source}; arena database {store.path})", flush=True)
    # One worker process: Gradio's queue and the rate limiter live in it; run_server keeps lifespan on,
    # which starts Gradio's queue.
    run_server(app, http.host, http.port, log_level, trusted_proxies=list(http.trusted_proxies))
    return 0
