"""Controller + two real worker processes + the OpenAI API in front (`vicuna serve api` path).

The controller and API run in-process (threads), the workers are
`python -m vicuna serve worker` subprocesses so one can be SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import httpx
import openai
import pytest

from conftest import cli_server
from vicuna.model import cpu_has_native_bf16
from vicuna.serve.model_client import ControllerClient
from vicuna.serve.controller import create_controller_app
from vicuna.serve.openai_api import create_app
from vicuna.serve.server import ServerThread

pytestmark = pytest.mark.slow

SECRET = "cluster-secret"
EXPIRY = 3.0
HELLO = [{"role": "user", "content": "Hello! What is the capital of France?"}]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    controller = ServerThread(create_controller_app(secret=SECRET, heartbeat_expiry=EXPIRY))
    controller.start()
    auth = {"Authorization": f"Bearer {SECRET}"}

    def live():
        return httpx.get(controller.url + "/workers", headers=auth).json()["workers"]

    try:
        with contextlib.ExitStack() as stack:
            # own_port: a worker registers its address with the controller before it binds
            workers = [stack.enter_context(cli_server(
                "serve", "worker", "--model-path", tiny_model_dir, "--model-name", "tiny", "--controller",
                controller.url, "--device", "cpu", "--heartbeat-interval", "0.5", env={"VICUNA_SECRET": SECRET},
                own_port=True)) for _ in range(2)]
            wait_for(lambda: len(live()) == 2 or any(w.proc.poll() is not None for w in workers), 120,
                     "two workers")
            assert len(live()) == 2, [w.log.read_text()[-3000:] for w in workers if w.proc.poll() is not None]
            api = ServerThread(create_app(ControllerClient(controller.url, secret=SECRET)))
            api.start()
            yield {"controller": controller.url, "api": api.url, "workers": [(w.proc, w.url) for w in workers],
                   "auth": auth, "live": live}
            api.stop()
    finally:
        controller.stop()


def test_secret_is_required(cluster):
    r = httpx.post(cluster["controller"] + "/get_worker_address", json={"model": "tiny"})
    assert r.status_code == 401
    proc, address = cluster["workers"][0]
    r = httpx.post(address + "/worker_generate_stream", json={"request": {"prompt": "hi"}},
                   headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_worker_endpoints(cluster):
    _, address = cluster["workers"][0]
    h = cluster["auth"]
    assert httpx.post(address + "/count_token", json={"prompt": "Hello"}, headers=h).json()["count"] >= 1
    assert httpx.post(address + "/worker_get_conv_template", headers=h).json()["conv"]["name"] == "vicuna_v1.1"
    details = httpx.post(address + "/model_details", headers=h).json()
    assert details["context_length"] == 512 and details["model"] == "tiny"
    assert details["dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32")  # --dtype auto, a float32 model
    emb = httpx.post(address + "/worker_get_embeddings", json={"input": ["a", "b"]}, headers=h).json()
    assert len(emb["embeddings"]) == 2 and emb["token_num"] >= 2
    assert httpx.post(address + "/worker_get_status", headers=h).json()["model_names"] == ["tiny"]


def test_two_workers_share_load_through_the_api(cluster):
    import concurrent.futures

    client = openai.OpenAI(base_url=cluster["api"] + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    def ask(i):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Hi {i}"}],
                                              max_tokens=16, temperature=0).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(16)))
    assert all(isinstance(a, str) for a in answers)
    served = [httpx.get(a + "/worker_get_status", headers=cluster["auth"]).json()["requests_finished"]
              for _, a in cluster["workers"]]
    assert sum(served) >= 16 and min(served) >= 3, served  # both took a share
    emb = client.embeddings.create(model="tiny", input="hello")
    assert len(emb.data[0].embedding) == 64
    # a worker's 4xx comes back through the controller path with its status and code
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=HELLO)


def test_sigstopped_worker_does_not_hang_clients(cluster):
    """A hung worker (SIGSTOP: its port still accepts connections, nothing answers) must not hang anyone:
    its started stream ends with an error event, requests routed to it are retried on the other worker,
    and it is avoided from then on."""
    import asyncio

    auth = cluster["auth"]

    def front_end():  # short silences, to keep the test quick; the defaults are 10 s (and 5 s for /health)
        client = ControllerClient(cluster["controller"], secret=SECRET, first_byte_timeout=1, chunk_timeout=1,
                                  probe_timeout=1)
        return client, ServerThread(create_app(client))

    def running(address):
        return httpx.post(address + "/worker_get_status", headers=auth, timeout=5).json()["running"]

    client, api = front_end()
    other, other_api = front_end()
    with api, other_api:
        oc = openai.OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = iter(oc.chat.completions.create(model="tiny", messages=HELLO, max_tokens=400, stream=True,
                                                 extra_body={"ignore_eos": True}))
        next(stream), next(stream)
        ((proc, address),) = [(p, a) for p, a in cluster["workers"] if running(a)]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            # Until its heartbeats expire the controller still hands out the stopped worker (its queue is
            # the shorter one as soon as the other has two requests): those requests have not started,
            # so they are retried on the other worker; nothing fails, nothing hangs.
            async def batch():
                ac = openai.AsyncOpenAI(base_url=other_api.url + "/v1", api_key="x", max_retries=0, timeout=60)
                return await asyncio.gather(*(ac.chat.completions.create(
                    model="tiny", messages=HELLO, max_tokens=4) for _ in range(6)))

            assert all(r.choices for r in asyncio.run(batch()))
            # some were routed there, and it is avoided now -- unless (a loaded machine) its heartbeats had
            # already expired and the controller no longer handed it out: avoided all the same
            assert other.hung_workers() == [address] or address not in [w["address"] for w in cluster["live"]()]
            # The stream that had started on it ends with an error event.
            with pytest.raises(openai.APIError, match="stopped responding"):
                for _ in stream:
                    pass
            assert client.hung_workers() == [address]
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    wait_for(lambda: len(cluster["live"]()) == 2, EXPIRY + 10, "the resumed worker to register again")


def test_sigkill_worker_is_dropped_and_requests_go_to_the_other(cluster):
    client = openai.OpenAI(base_url=cluster["api"] + "/v1", api_key="x", max_retries=0)
    proc, dead = cluster["workers"][0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    # before expiry the controller may still hand out the dead worker: the client retries on the other
    for i in range(4):
        assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4).choices
    killed_at = time.monotonic()
    wait_for(lambda: [w["address"] for w in cluster["live"]()] == [cluster["workers"][1][1]], EXPIRY + 5,
             "the dead worker to be dropped")
    assert time.monotonic() - killed_at <= EXPIRY + 5
    for i in range(3):
        assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4).choices


def test_worker_dying_mid_stream_gives_an_error_event_not_a_hang(cluster):
    client = openai.OpenAI(base_url=cluster["api"] + "/v1", api_key="x", max_retries=0, timeout=30)
    proc, _ = cluster["workers"][1]
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    got = 0
    started = time.monotonic()
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            got += 1
            if got == 3:
                os.kill(proc.pid, signal.SIGKILL)
    assert "worker" in str(e.value) and time.monotonic() - started < 30
    proc.wait(timeout=10)
    # no worker left: a clear 503 with Retry-After, not a hang
    wait_for(lambda: cluster["live"]() == [], EXPIRY + 5, "no live workers")
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    assert e.value.status_code in (404, 503)
