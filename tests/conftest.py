"""Shared fixtures: tiny tokenizers and models built offline in seconds, the real model once per session,
servers started without port races, and the test data more than one module draws."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, TypeVar

import httpx
import numpy as np
import pytest
from hypothesis import settings

# CI explores the same examples every run (a red CI is then reproducible); locally they vary.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; a worktree under /work/wt/NAME finds it one level higher.
SHARED_DATA = next((p for p in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data") if p.is_dir()),
                   ROOT.parent / "shared" / "data")
ARTIFACTS = ROOT / "tests" / "artifacts"

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--arena-db` defaults to the user's data folder: a test that names no file writes into a temporary one
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="vicuna-test-data-")

CORPUS = [
    "Hello! How can I help you today? I am a helpful assistant.",
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris.",
    "Write a Python function that adds two numbers: def add(a, b): return a + b",
    "USER: ASSISTANT: ### Human: ### Assistant: ### Instruction: ### Response: [INST] [/INST]",
    "A chat between a curious user and an artificial intelligence assistant.",
    "你好，世界！我是一个聊天助手。 こんにちは 😀 🎉 café naïve",
    "1 2 3 4 5 6 7 8 9 10 numbers, punctuation; quotes \"like\" 'this' (and) [that] {too}",
] * 20


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args: str, input: str | None = None, timeout: float = 300, check: bool = False, **kw):
    """Run `python -m vicuna ARGS` as a user would; returns CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, "-m", "vicuna", *map(str, args)], input=input, capture_output=True, text=True,
        timeout=timeout, env=cli_env(), **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vicuna {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


T = TypeVar("T")
LISTENING = re.compile(r"^listening on (http://\S+)$", re.M)  # printed by serve/server.py run_server


class ServerProcess(NamedTuple):
    proc: subprocess.Popen
    url: str
    log: Path  # its stdout and stderr


@contextlib.contextmanager
def cli_server(*args, ready: tuple[str, ...] = ("/health",), timeout: float = 120, env: dict | None = None,
               log: Path | None = None, own_port: bool = False) -> Iterator[ServerProcess]:
    """`python -m vicuna ARGS` serving on 127.0.0.1 in a subprocess, as a user starts it: yields a
    ServerProcess (process, URL, log) once it listens and every path in ``ready`` answers 200; stops it
    after (SIGTERM, then SIGKILL).

    Every test that starts a server process goes through here (in-process servers use ServerThread, which
    binds port 0 itself). The server binds port 0 and prints where it listens:
    picking a free port first and passing it on raced with every other process on the machine (EADDRINUSE
    under load). A worker must be told its port before it binds (it registers its address with the
    controller first): ``own_port`` passes one and starts again on another if it was taken meanwhile.
    The output goes to ``log`` (a temporary file otherwise); its tail is in the failure when the server
    exits early or never comes up.
    """
    with contextlib.ExitStack() as stack:
        if log is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "server.log"

        def start(port: int) -> ServerProcess:
            return _start_server([*map(str, args), "--host", "127.0.0.1", "--port", str(port)], env, log,
                                 ready, timeout)

        server = retry_on_port_clash(start) if own_port else start(0)
        try:
            yield server
        finally:
            stop_process(server.proc)


def _start_server(args: list[str], env: dict | None, log: Path, ready: tuple[str, ...],
                  timeout: float) -> ServerProcess:
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vicuna", *args], cwd=ROOT, env={**cli_env(), **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = log.read_text(errors="replace")
            if proc.poll() is not None:
                if "address already in use" in text.lower():
                    raise OSError(errno.EADDRINUSE, f"vicuna {' '.join(args)}: the port was taken:\n{text[-3000:]}")
                pytest.fail(f"vicuna {' '.join(args)} exited with {proc.returncode}:\n{text[-3000:]}")
            listening = LISTENING.search(text)
            if listening and all(answers_200(listening[1] + path) for path in ready):
                return ServerProcess(proc, listening[1], log)
            if time.monotonic() > deadline:
                pytest.fail(f"vicuna {' '.join(args)} did not come up in {timeout:.0f} s:\n{text[-3000:]}")
            time.sleep(0.3)
    except BaseException:
        stop_process(proc)
        raise


def answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def retry_on_port_clash(start: Callable[[int], T], attempts: int = 5) -> T:
    """``start(port)`` on a port free a moment ago, again on another when it raises EADDRINUSE (another
    process took the port meanwhile). Only for servers that must know their port before they bind;
    everything else binds port 0 (see `cli_server`, ServerThread)."""
    from vicuna.serve.server import free_port

    for _ in range(attempts - 1):
        try:
            return start(free_port())
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    return start(free_port())


@pytest.fixture(scope="session")
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (a server that is down): bound, so no other process can
    take it, but not listening. A port that was merely free a moment ago may be someone's by now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def api_server(engine, **options) -> Iterator[str]:
    """A module's server fixture (``yield from api_server(engine, ...)``): the OpenAI API (create_app
    ``options``: api_keys, max_body_bytes...) over ``engine`` as model "tiny", in a thread on a port of
    its own; yields the base URL."""
    from vicuna.serve.model_client import LocalClient
    from vicuna.serve.openai_api import create_app
    from vicuna.serve.server import ServerThread

    with ServerThread(create_app(LocalClient({"tiny": engine}), **options)) as url:
        yield url


def wait_idle(engine, timeout: float = 30.0):
    """Wait until ``engine`` runs and queues nothing (a finished or aborted request frees its slot after
    the reply ends); returns its stats."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.running == 0 and s.waiting == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {engine.stats()}")


def bradley_terry_battles(truth: dict[str, float], n: int, seed: int, tie_rate: float = 0.0
                          ) -> list[tuple[str, str, str]]:
    """``n`` (model_a, model_b, winner) battles whose expected score follows the Bradley-Terry model with
    ``truth`` ratings: what the rating maths must recover, and the votes the arena's leaderboard is fed.

    Ties are drawn with probability ``tie_rate * 2 * min(p, 1 - p)`` and taken half out of wins, half out of
    losses, so a's expected score (win 1, tie 0.5) stays exactly p.
    """
    rng = np.random.default_rng(seed)
    names = list(truth)
    battles = []
    for _ in range(n):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = names[i], names[j]
        p = 1.0 / (1.0 + 10 ** ((truth[b] - truth[a]) / 400))
        p_tie = tie_rate * 2 * min(p, 1 - p)
        u = rng.random()
        if u < p - p_tie / 2:
            winner = "model_a"
        elif u < p + p_tie / 2:
            winner = "tie" if rng.random() < 0.5 else "tie (bothbad)"
        else:
            winner = "model_b"
        battles.append((a, b, winner))
    return battles


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from vicuna.tiny import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS, vocab_size=512)


@pytest.fixture(scope="session")
def sp_tokenizer():
    from vicuna.tiny import train_sentencepiece_tokenizer

    return train_sentencepiece_tokenizer(CORPUS, vocab_size=512)


@pytest.fixture(params=["bpe", "sentencepiece"])
def any_tokenizer(request, bpe_tokenizer, sp_tokenizer):
    return bpe_tokenizer if request.param == "bpe" else sp_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bpe_tokenizer):
    """A saved random tiny LLaMA (byte-level BPE, vicuna_v1.1 chat template)."""
    from vicuna.tiny import make_tiny_llama, save_model

    path = tmp_path_factory.mktemp("tiny-llama")
    return save_model(make_tiny_llama(bpe_tokenizer), bpe_tokenizer, path)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """The tiny model loaded in float32 -- the precision in which the engine promises batch-invariant greedy
    output (docs/serving.md; bfloat16 kernels round differently for different batch shapes). One per module:
    an engine with adapters changes the model it is given."""
    from vicuna.model import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="float32", model_name="tiny")


def chat_ids(loaded, text: str) -> list[int]:
    """The token ids of one user turn in ``loaded``'s chat template, as the engine receives a prompt."""
    from vicuna.conversation import encode, render_prompt

    return encode(loaded.tokenizer, render_prompt(loaded.template, [{"role": "user", "content": text}],
                                                  loaded.tokenizer))


@pytest.fixture(scope="session")
def sp_model_dir(tmp_path_factory, sp_tokenizer):
    """A saved random tiny LLaMA with a SentencePiece tokenizer (like real Vicuna)."""
    from vicuna.tiny import make_tiny_llama, save_model

    path = tmp_path_factory.mktemp("tiny-llama-sp")
    return save_model(make_tiny_llama(sp_tokenizer, seed=1), sp_tokenizer, path)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The default real model (SmolLM2-135M-Instruct, float32 HF folder), imported once per machine.

    `make install` imports it; when run outside make the first use imports it (about a minute).
    """
    from vicuna.weights.gguf import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    """The real model loaded once per test session (tests must not change its weights)."""
    from vicuna.model import load_model

    return load_model(real_model_dir, device="cpu")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
