"""Acceptance: `vicuna serve --web --endpoints FILE` in a real browser, and the endpoint's key nowhere.

One `vicuna serve` process serves a tiny local model and, through the endpoints file, a scripted
OpenAI-compatible upstream (in this test process, recording every call) plus one whose key the
upstream refuses. Headless Chromium plays an arena battle local vs endpoint and votes; a second
round, where the endpoint drops its connection mid-answer, fails and offers no vote. Then the
test greps the server's log, every page and error body it got, and the SQLite file for both keys.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from conftest import cli_server
from scripted_upstream import create_upstream
from test_web_browser import browser_page, db_rows

from vicuna.serve.server import ServerThread

pytestmark = pytest.mark.slow

KEY = "sk-live-SECRET-endpoint-key-0042"
WRONG_KEY = "sk-wrong-SECRET-endpoint-key-0099"
LOCAL = "tiny-qx1"  # no distinctive word a random model could utter (see identity_terms)


@pytest.fixture(scope="module")
def upstream():
    app = create_upstream()
    with ServerThread(app, log_level="critical") as url:
        yield app, url


@pytest.fixture(scope="module")
def server(tiny_model_dir, upstream, tmp_path_factory):
    """(url, arena db, log path) of `vicuna --debug serve --model-path TINY --web --endpoints FILE`."""
    _, up_url = upstream
    tmp = tmp_path_factory.mktemp("endpoints-web")
    (tmp / "endpoints.yaml").write_text(
        f"- {{name: remote-qz, api_base: '{up_url}/v1', model: echo, api_key_env: TEST_REMOTE_KEY}}\n"
        f"- {{name: locked-qz, api_base: '{up_url}/v1', model: locked, api_key_env: TEST_LOCKED_KEY}}\n")
    db, log_path = tmp / "arena.db", tmp / "server.log"
    with cli_server("--debug", "serve", "--model-path", tiny_model_dir, "--model-name", LOCAL,
                    "--default-max-tokens", "24", "--web", "--arena-db", db, "--endpoints", tmp / "endpoints.yaml",
                    "--arena-weights", "locked-qz=0", ready=("/health", "/"), timeout=180, log=log_path,
                    env={"TEST_REMOTE_KEY": KEY, "TEST_LOCKED_KEY": WRONG_KEY}) as web:
        yield web.url, db, log_path


@pytest.fixture(scope="module")
def page(server):
    with browser_page(server[0] + "/") as page:
        yield page


def send(page, text: str) -> None:
    page.locator("#arena-input textarea").fill(text)
    page.locator("#arena-send").click()
    page.wait_for_function("['Vote for', 'Error', 'Not stored'].some("
                           "w => document.querySelector('#arena-status').innerText.includes(w))")


def test_arena_battles_a_local_model_against_an_endpoint(page, server, upstream, artifacts_dir):
    url, db, _ = server
    app, _ = upstream
    page.get_by_role("tab", name="Arena (battle)").click()
    send(page, "Write one sentence about the sea.")
    assert "Vote for the better answer" in page.locator("#arena-status").inner_text()
    panel = page.locator("#arena-a").locator("xpath=ancestor::*[@role='tabpanel'][1]").inner_text()
    assert LOCAL not in panel and "remote-qz" not in panel  # anonymous until the vote
    answers = [page.locator(f"{side} [data-testid='bot']").last.inner_text().strip() for side in ("#arena-a",
                                                                                                 "#arena-b")]
    assert "you said: Write one sentence about the sea." in answers  # the endpoint's answer, streamed in
    page.locator("#arena-vote-b").click()
    page.wait_for_function("document.querySelector('#arena-reveal').innerText.includes('Model A:')")
    shown = re.search(r"Model A: (\S+) · Model B: (\S+)", page.locator("#arena-reveal").inner_text()).groups()
    assert set(shown) == {LOCAL, "remote-qz"}
    page.screenshot(path=str(artifacts_dir / "web_arena_endpoint.png"))
    (vote,) = db_rows(db, "SELECT * FROM votes")
    convs = {r["model"]: r for r in db_rows(db, "SELECT * FROM conversations WHERE mode = 'battle'")}
    assert (vote["model_a"], vote["model_b"], vote["winner"]) == (*shown, "model_b")
    assert (convs["remote-qz"]["served_by"], convs["remote-qz"]["upstream_model"]) == ("endpoint", "echo")
    assert (convs[LOCAL]["served_by"], convs[LOCAL]["upstream_model"]) == ("local", None)
    calls = [c for c in app.state.calls if c["path"] == "/v1/chat/completions"
             and "sea" in json.dumps(c["body"])]
    assert len(calls) == 1 and calls[0]["auth"] == f"Bearer {KEY}"  # the key was used upstream


def test_an_endpoint_failing_mid_answer_fails_the_round(page, server):
    _, db, _ = server
    page.locator("#arena-new").click()
    send(page, "Please DROP the line now.")
    status = page.locator("#arena-status").inner_text()
    assert "dropped the connection" in status and "remote-qz" not in status, status
    for button in ("a", "b", "tie", "bothbad"):
        assert page.locator(f"#arena-vote-{button}").is_disabled()
    deadline = time.monotonic() + 60  # the error shows as soon as that side fails; the round is stored after
    while not db_rows(db, "SELECT * FROM conversations WHERE model = 'remote-qz' AND finish = 'error'"):
        assert time.monotonic() < deadline, "the failed round was not stored"
        time.sleep(0.2)
    assert len(db_rows(db, "SELECT * FROM votes")) == 1  # no vote for that round
    for button in ("a", "b", "tie", "bothbad"):
        assert page.locator(f"#arena-vote-{button}").is_disabled()


def test_the_endpoint_keys_appear_nowhere(page, server):
    url, db, log_path = server
    bodies = [page.content()]
    c = httpx.Client(base_url=url, timeout=60)
    for model in ("locked-qz", "remote-qz", "nope"):  # the upstream echoes the wrong key in its 401
        r = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        bodies.append(r.text)
    bodies.append(c.post("/v1/chat/completions", json={"model": "remote-qz", "stream": True, "messages": [
        {"role": "user", "content": "hi"}]}).text)
    bodies += [c.get(path).text for path in ("/v1/models", "/health", "/metrics", "/config", "/openapi.json")]
    assert json.loads(bodies[1])["error"]["code"] == "upstream_auth_failed"
    time.sleep(0.5)  # let the server's log catch up
    files = [log_path.read_bytes()] + [p.read_bytes() for p in db.parent.glob("arena.db*")]
    for secret in (KEY, WRONG_KEY, "SECRET-endpoint"):
        assert not any(secret in b for b in bodies), secret
        assert not any(secret.encode() in f for f in files), secret
    assert b"locked-qz" in files[0]  # the log does talk about the failure, without the key
