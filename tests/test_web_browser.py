"""Acceptance: a real browser against `vicuna serve --web` serving two tiny models.

Headless Debian Chromium driven by Playwright (``executable_path``, no browser download)
opens the page on 127.0.0.1, chats and sees the answer stream in, plays one arena battle,
votes, sees the names revealed, and the test finds that vote in the SQLite file.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from pathlib import Path

import pytest
from conftest import cli_server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
NAMES = ("tiny-qx1", "tiny-qx2")  # no distinctive word a random model could utter (see identity_terms)


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory, bpe_tokenizer):
    from vicuna.tiny import make_tiny_llama, save_model

    path = tmp_path_factory.mktemp("tiny-llama-2")
    return save_model(make_tiny_llama(bpe_tokenizer, seed=7), bpe_tokenizer, path)


@pytest.fixture(scope="module")
def web_server(tiny_model_dir, second_model_dir, tmp_path_factory):
    """`vicuna serve --model-path A --model-path B --web` in a subprocess; yields (url, arena db path)."""
    tmp = tmp_path_factory.mktemp("web")
    db = tmp / "arena.db"
    with cli_server("serve", "--model-path", tiny_model_dir, "--model-path", second_model_dir, "--model-name",
                    NAMES[0], "--model-name", NAMES[1], "--default-max-tokens", "48", "--web", "--arena-db", db,
                    "--max-input-chars", "200", ready=("/health", "/"), timeout=180,
                    log=tmp / "server.log") as server:
        yield server.url, db


@contextlib.contextmanager
def browser_page(url: str):
    """A headless Chromium page opened at ``url``."""
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is needed for the browser test: `make browser` "
                    "(or apt-get install -y chromium); never `playwright install`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(url)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def page(web_server):
    with browser_page(web_server[0] + "/") as page:
        yield page


def db_rows(db: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


RECORD_STREAM = """root => {
    window.__snapshots = [];
    new MutationObserver(() => {
        const bots = root.querySelectorAll('[data-testid="bot"]');
        if (bots.length) window.__snapshots.push(bots[bots.length - 1].innerText.trim());
    }).observe(root, {subtree: true, childList: true, characterData: true});
}"""


def test_chat_streams_an_answer(page, web_server, artifacts_dir):
    _, db = web_server
    page.wait_for_function("document.querySelector('#chat-model input')?.value?.startsWith('tiny-qx')")
    page.locator("#chat-bot").evaluate(RECORD_STREAM)
    page.locator("#chat-input textarea").fill("Hello! What is the capital of France?")
    page.locator("#chat-send").click()
    page.wait_for_function(
        "window.__snapshots.some(s => s.length)"
        " && !document.querySelector('#chat-status').innerText.includes('answering')"
    )
    snapshots = [s for s in page.evaluate("window.__snapshots") if s]
    assert len(set(snapshots)) >= 2, f"the answer did not arrive in pieces: {snapshots}"
    assert page.locator("#chat-bot [data-testid='user']").last.inner_text().strip() == \
        "Hello! What is the capital of France?"
    assert page.locator("#chat-status").inner_text().strip() == ""  # no error shown
    (conv,) = db_rows(db, "SELECT * FROM conversations WHERE mode = 'chat'")
    messages = json.loads(conv["messages"])
    assert conv["model"] == NAMES[0] and conv["finish"] == "stop"
    assert messages[0]["content"] == "Hello! What is the capital of France?" and messages[1]["content"].strip()
    assert conv["ip_hash"] and "127.0.0.1" not in conv["ip_hash"]
    page.screenshot(path=str(artifacts_dir / "web_chat.png"))

    # Our own limits answer with a specific message, not a generic error.
    page.locator("#chat-input textarea").fill("x" * 250)
    page.locator("#chat-send").click()
    page.wait_for_function("document.querySelector('#chat-status').innerText.includes('Message too long')")
    assert "250 characters; the limit is 200" in page.locator("#chat-status").inner_text()
    toast = page.locator("[data-testid='toast-body']").filter(has_text="the limit is 200")
    toast.wait_for()
    assert page.locator("#chat-input textarea").input_value() == "x" * 250  # kept for editing
    page.locator("[data-testid='toast-close']").first.click()  # keep the next screenshots clear


def test_arena_battle_vote_reveals_names_and_is_stored(page, web_server, artifacts_dir):
    _, db = web_server
    page.get_by_role("tab", name="Arena (battle)").click()
    page.locator("#arena-input textarea").fill("Write one sentence about the sea.")
    page.locator("#arena-send").click()
    vote_a = page.locator("#arena-vote-a")
    page.wait_for_function("!document.querySelector('#arena-vote-a').disabled")
    panel = page.locator("#arena-a").locator("xpath=ancestor::*[@role='tabpanel'][1]")
    before = panel.inner_text()
    assert "Model A" in before and "Write one sentence about the sea." in before  # the arena tab's text
    assert not any(name in before for name in NAMES), "a model name was shown before the vote"
    for side in ("#arena-a", "#arena-b"):
        assert page.locator(f"{side} [data-testid='bot']").last.inner_text().strip()
    vote_a.click()
    reveal = page.locator("#arena-reveal")
    page.wait_for_function("document.querySelector('#arena-reveal').innerText.includes('Model A:')")
    found = re.search(r"Model A: (\S+) · Model B: (\S+)", reveal.inner_text())
    assert found, reveal.inner_text()
    shown_a, shown_b = found.groups()
    assert {shown_a, shown_b} == set(NAMES)
    assert "A is better" in reveal.inner_text()
    assert page.locator("#arena-vote-a").is_disabled()  # one vote per round
    label_a = "document.querySelector('#arena-a [data-testid=\"block-label\"]').innerText"
    page.wait_for_function(f"{label_a}.includes('{shown_a}')")
    assert shown_b in page.locator("#arena-b [data-testid='block-label']").inner_text()
    page.screenshot(path=str(artifacts_dir / "web_arena.png"))

    (vote,) = db_rows(db, "SELECT * FROM votes")
    assert (vote["model_a"], vote["model_b"], vote["winner"]) == (shown_a, shown_b, "model_a")
    assert vote["anonymous"] == 1 and vote["mode"] == "battle" and vote["void"] == 0
    convs = {r["id"]: r for r in db_rows(db, "SELECT * FROM conversations WHERE mode = 'battle'")}
    assert convs[vote["conv_a"]]["model"] == shown_a and convs[vote["conv_b"]]["model"] == shown_b
    assert json.loads(convs[vote["conv_a"]]["messages"])[0]["content"] == "Write one sentence about the sea."

    # The leaderboard tab now ranks both models from that vote.
    page.get_by_role("tab", name="Leaderboard").click()
    page.wait_for_function("document.querySelector('#lb-table').innerText.includes('tiny-qx')")
    table = page.locator("#lb-table").inner_text()
    assert shown_a in table and shown_b in table and table.index(shown_a) < table.index(shown_b)
    page.screenshot(path=str(artifacts_dir / "web_leaderboard.png"), full_page=True)


def test_leaderboard_category_selector(page, web_server, artifacts_dir):
    """A coding battle is tagged in the SQLite file; the leaderboard's category selector ranks on it alone."""
    _, db = web_server
    page.get_by_role("tab", name="Arena (battle)").click()
    page.locator("#arena-new").click()
    page.locator("#arena-input textarea").fill("Write a Python function that reverses a list.")
    page.locator("#arena-send").click()
    page.wait_for_function("!document.querySelector('#arena-vote-b').disabled")
    page.locator("#arena-vote-b").click()
    page.wait_for_function("document.querySelector('#arena-reveal').innerText.includes('B is better')")
    votes = db_rows(db, "SELECT v.id, v.model_a, v.model_b, group_concat(k.category) AS cats FROM votes v "
                        "LEFT JOIN vote_categories k ON k.vote_id = v.id GROUP BY v.id ORDER BY v.id")
    assert len(votes) == 2 and "coding" in votes[-1]["cats"].split(",") and "coding" not in (votes[0]["cats"] or "")
    coding_winner = votes[-1]["model_b"]

    page.get_by_role("tab", name="Leaderboard").click()
    page.wait_for_function("document.querySelector('#lb-table').innerText.includes('2 votes')")
    assert "Style-controlled" in page.locator("#lb-table").inner_text()
    page.locator("#lb-category input").click()
    page.get_by_role("option", name="coding (1)").click()
    page.wait_for_function("document.querySelector('#lb-table').innerText.includes('Category: coding')")
    table = page.locator("#lb-table").inner_text()
    assert "1 vote;" in table
    rows = [line for line in table.splitlines() if re.match(r"\s*1\t", line)]
    assert rows and coding_winner in rows[0], table  # the coding vote's winner ranks first in coding
    page.screenshot(path=str(artifacts_dir / "web_leaderboard_category.png"), full_page=True)
    page.locator("#lb-category input").click()
    page.get_by_role("option", name="all votes").click()
    page.wait_for_function("document.querySelector('#lb-table').innerText.includes('2 votes')")
