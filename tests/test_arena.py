"""Arena storage (real SQLite files), leaderboard from stored votes, and `vicuna arena` on the command line."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, bradley_terry_battles, cli_env, run_cli

from vicuna.serve.arena import (
    SCHEMA_VERSION, ArenaError, ArenaStore, Battle, compute_leaderboard, identity_leak, identity_terms,
)

TRUTH = {"strong": 1150.0, "middle": 1000.0, "weak": 850.0}  # mean 1000


def add_battle(store: ArenaStore, n: int, a: str, b: str, winner: str, *, anonymous=True, void=None, ip=None):
    ids = [f"{n}-a", f"{n}-b"]
    for cid, model in zip(ids, (a, b)):
        store.save_conversation(cid, mode="battle" if anonymous else "side_by_side", model=model,
                                messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": model}])
    return store.add_vote(mode="battle" if anonymous else "side_by_side", model_a=a, model_b=b, conv_a=ids[0],
                          conv_b=ids[1], winner=winner, anonymous=anonymous, void_reason=void,
                          ip_hash=store.hash_ip(ip))


def synthetic_votes(store: ArenaStore, n: int, seed: int, tie_rate: float = 0.3) -> None:
    """Votes drawn from the Bradley-Terry model with TRUTH ratings; a tie keeps a's expected score at p."""
    for k, (a, b, winner) in enumerate(bradley_terry_battles(TRUTH, n, seed, tie_rate)):
        add_battle(store, k, a, b, winner, ip=f"10.0.0.{k % 7}")


def test_schema_roundtrip_and_constraints(tmp_path):
    store = ArenaStore(tmp_path / "a.db")
    msgs = [{"role": "user", "content": "Hi 😀"}, {"role": "assistant", "content": "Hello"}]
    store.save_conversation("c1", mode="chat", model="m", messages=msgs[:1], params={"temperature": 0.5})
    store.save_conversation("c1", mode="chat", model="m", messages=msgs, params={"temperature": 0.5}, finish="stop")
    conv = store.conversation("c1")
    assert conv["messages"] == msgs and conv["params"] == {"temperature": 0.5} and conv["finish"] == "stop"
    assert conv["updated"] >= conv["created"]
    store.add_feedback(conv_id="c1", model="m", message_index=1, kind="flag", note="Incorrect")
    assert [f["note"] for f in store.iter_feedback()] == ["Incorrect"]
    with pytest.raises(ArenaError, match="unknown conversation"):
        store.add_feedback(conv_id="nope", model="m", message_index=1, kind="upvote")
    with pytest.raises(ValueError, match="winner"):
        store.add_vote(mode="battle", model_a="a", model_b="b", conv_a="c1", conv_b="c1", winner="a", anonymous=True)
    add_battle(store, 1, "x", "y", "tie")
    with pytest.raises(ArenaError, match="already has a vote"):
        store.add_vote(mode="battle", model_a="x", model_b="y", conv_a="1-a", conv_b="1-b", winner="model_a",
                       anonymous=True)
    store.close()
    # Reopened read-only by the CLI path; the schema version is checked.
    again = ArenaStore(tmp_path / "a.db", create=False)
    assert again.counts() == {"conversations": 3, "votes": 1, "feedback": 1, "void_votes": 0}
    again.close()
    with pytest.raises(ArenaError, match="no arena database"):
        ArenaStore(tmp_path / "missing.db", create=False)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ArenaError, match="not an arena database"):
        ArenaStore(other, create=False)


def test_ip_is_stored_only_as_salted_hash(tmp_path, monkeypatch):
    monkeypatch.delenv("VICUNA_ARENA_SALT", raising=False)
    db = tmp_path / "a.db"
    store = ArenaStore(db)
    ip = "203.0.113.77"
    h = store.hash_ip(ip)
    add_battle(store, 1, "x", "y", "model_a", ip=ip)
    store.close()
    assert (tmp_path / "a.db.salt").stat().st_mode & 0o777 == 0o600
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("a.db*") if not p.name.endswith(".salt"))
    assert ip.encode() not in raw and h.encode() in raw
    assert ArenaStore(db).hash_ip(ip) == h  # same salt file -> same pseudonym across restarts
    assert ArenaStore(tmp_path / "b.db").hash_ip(ip) != h  # another salt -> unlinkable
    assert ArenaStore(db, salt="explicit").hash_ip(ip) != h
    assert ArenaStore(db).hash_ip(None) is None
    (tmp_path / "c.db.salt").write_text("")
    with pytest.raises(ArenaError, match="no usable salt"):
        ArenaStore(tmp_path / "c.db").hash_ip(ip)


def test_salt_created_once_by_racing_processes(tmp_path, monkeypatch):
    monkeypatch.delenv("VICUNA_ARENA_SALT", raising=False)
    code = ("import sys; from vicuna.serve.arena import ArenaStore\n"
            "print(ArenaStore(sys.argv[1]).hash_ip('203.0.113.5'))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "a.db")], env=cli_env(), cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    hashes = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert len(hashes) == 1 and len(next(iter(hashes))) == 32
    assert sorted(p.name for p in tmp_path.iterdir() if "salt" in p.name) == ["a.db.salt"]  # no temp files left


def test_unusable_path_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArenaError, match="cannot create the folder"):
        ArenaStore(tmp_path / "file" / "arena.db")


def test_database_and_its_wal_and_shm_are_private(tmp_path):
    """Conversations are in the file: it and SQLite's side files are the server user's only (0600)."""
    old = os.umask(0o022)
    try:
        store = ArenaStore(tmp_path / "a.db", salt="s")
        add_battle(store, 1, "x", "y", "model_a")  # writes: the -wal and -shm files exist now
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        store.close()
    finally:
        os.umask(old)
    assert {"a.db", "a.db-wal", "a.db-shm"} <= set(modes), modes
    assert all(mode == 0o600 for mode in modes.values()), modes


def test_locked_database_is_retried_a_bounded_number_of_times(tmp_path, caplog):
    store = ArenaStore(tmp_path / "a.db", busy_timeout=0.05, attempts=3)
    holder = sqlite3.connect(tmp_path / "a.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another process (a sqlite3 shell) holds the write lock
    with pytest.raises(ArenaError, match=r"is locked by another process \(tried 3 times"):
        store.save_conversation("c1", mode="chat", model="m", messages=[])
    assert caplog.text.count("is locked (attempt") == 2
    holder.execute("COMMIT")
    store.save_conversation("c1", mode="chat", model="m", messages=[])  # works again at once

    # A lock released while we retry: the write goes through.
    released = threading.Event()

    class ReleaseOnRetry(logging.Handler):
        def emit(self, record):
            if "is locked (attempt 1" in record.getMessage() and not released.is_set():
                holder.execute("COMMIT")
                released.set()

    holder.execute("BEGIN EXCLUSIVE")
    handler = ReleaseOnRetry()
    logging.getLogger("vicuna.serve.arena").addHandler(handler)
    try:
        store.save_conversation("c2", mode="chat", model="m", messages=[])
    finally:
        logging.getLogger("vicuna.serve.arena").removeHandler(handler)
    assert released.is_set() and store.conversation("c2") is not None
    holder.close()
    store.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_deleted_or_replaced_database_fails_loudly_and_is_not_recreated(tmp_path, how):
    db = tmp_path / "a.db"
    store = ArenaStore(db, salt="s")
    add_battle(store, 1, "x", "y", "model_a")
    for p in tmp_path.glob("a.db*"):  # rm arena.db*
        p.unlink()
    if how == "replaced":  # e.g. a backup copied into place
        with ArenaStore(tmp_path / "backup.db", salt="s") as other:
            add_battle(other, 7, "p", "q", "model_b")
        os.replace(tmp_path / "backup.db", db)
    for use in (lambda: store.save_conversation("c", mode="chat", model="m", messages=[]),
                lambda: add_battle(store, 2, "x", "y", "tie"), store.battles, store.counts):
        with pytest.raises(ArenaError, match=f"was {how}.* while the server was running"):
            use()
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(ArenaError, store.battles)))
    worker.start()  # a thread that never had a connection must not create an empty database either
    worker.join()
    assert errors and db.exists() == (how == "replaced")
    store.close()


def test_concurrent_writers_threads_and_processes(tmp_path):
    """8 threads and a second process write at once; nothing is lost, nothing fails."""
    db = tmp_path / "a.db"
    store = ArenaStore(db)
    child_code = (
        "import sys; from vicuna.serve.arena import ArenaStore\n"
        "s = ArenaStore(sys.argv[1])\n"
        "for i in range(100):\n"
        "    s.save_conversation(f'p{i}', mode='chat', model='proc', messages=[{'role': 'user', 'content': str(i)}])\n"
        "    s.add_feedback(conv_id=f'p{i}', model='proc', message_index=0, kind='upvote')\n"
    )
    child = subprocess.Popen([sys.executable, "-c", child_code, str(db)], env=cli_env(), cwd=ROOT)
    errors = []

    def worker(t: int) -> None:
        try:
            for i in range(25):
                add_battle(store, t * 1000 + i, f"m{t}", f"n{t}", "model_a", ip=f"1.2.3.{t}")
                store.battles()  # readers run alongside writers (WAL)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert child.wait(timeout=120) == 0
    assert not errors, errors
    assert store.counts() == {"conversations": 8 * 25 * 2 + 100, "votes": 200, "feedback": 100, "void_votes": 0}
    assert store._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_identity_leak():
    names = ["lmsys/vicuna-7b-v1.5", "tiny-b", "ab", "Llama-2-13b-chat-hf"]
    assert identity_terms(names) == ["lmsys/vicuna-7b-v1.5", "Llama-2-13b-chat-hf", "vicuna-7b-v1.5", "tiny-b",
                                     "vicuna", "Llama", "lmsys"]
    assert identity_leak({"model A": ["I am Vicuna-7B-v1.5."]}, names) == \
        "the answer of model A mentions 'vicuna-7b-v1.5'"
    assert identity_leak({"model A": ["I am Vicuna, a chat assistant"]}, names) == \
        "the answer of model A mentions 'vicuna'"  # the family word gives it away too
    assert identity_leak({"model B": ["I was trained by LMSYS"]}, names) == "the answer of model B mentions 'lmsys'"
    assert "model B" in identity_leak({"model A": ["fine"], "model B": ["Hi, tiny-b here"]}, names)
    assert identity_leak({"model A": ["I was made by OpenAI"]}, names) is None
    assert "'OpenAI'" in identity_leak({"model A": ["I was made by OpenAI"]}, names, extra=["OpenAI", "x"])
    # whole words only; short names and generic parts ("chat", "tiny") are not tells
    assert identity_leak({"model A": ["tiny-bee, vicunas, a chat, ab, llamas", "abc"]}, names) is None


def test_leaderboard_from_stored_votes_recovers_truth(tmp_path):
    store = ArenaStore(tmp_path / "a.db")
    synthetic_votes(store, 1500, seed=5)
    # Votes that must not count: void (identity leak) and named side-by-side ones, all for "weak".
    for k in range(40):
        add_battle(store, 10_000 + k, "weak", "strong", "model_a", void="the answer of model A mentions 'weak'")
        add_battle(store, 20_000 + k, "weak", "strong", "model_a", anonymous=False)
    battles = store.battles()
    assert len(battles) == 1500
    lb = compute_leaderboard(battles, rounds=200, seed=1, online=True)
    assert [r.model for r in lb.rows] == list(TRUTH)
    for r in lb.rows:
        assert r.lower < r.rating < r.upper
        assert r.lower <= TRUTH[r.model] <= r.upper, r
        assert r.online_elo is not None
    assert sum(r.votes for r in lb.rows) == 2 * 1500
    assert lb.win_rate["strong"]["weak"] > 0.75 and lb.win_rate["weak"]["strong"] == pytest.approx(
        1 - lb.win_rate["strong"]["weak"])
    # The excluded votes are all wins of "weak": counting them moves it up.
    with_named = compute_leaderboard(store.battles(include_named=True), rounds=10)
    assert {r.model: r.rating for r in with_named.rows}["weak"] > {r.model: r.rating for r in lb.rows}["weak"]


def test_ties_count_half_a_win():
    lb = compute_leaderboard([Battle("a", "b", "tie"), Battle("a", "b", "tie (bothbad)"), ("b", "a", "model_a")],
                             rounds=20)
    rows = {r.model: r for r in lb.rows}
    assert rows["a"].wins == 1.0 and rows["b"].wins == 2.0 and rows["a"].votes == 3
    assert lb.win_rate["b"]["a"] == pytest.approx(2 / 3)
    assert compute_leaderboard([], rounds=5).rows == []


def test_cli_export_and_leaderboard(tmp_path):
    db = tmp_path / "arena.db"
    store = ArenaStore(db)
    synthetic_votes(store, 120, seed=2)
    add_battle(store, 999, "strong", "weak", "model_b", void="leak")
    store.save_conversation("chat1", mode="chat", model="middle", messages=[{"role": "user", "content": "x"}])
    store.close()

    out = tmp_path / "battles.jsonl"
    run_cli("arena", "export", "--db", db, "-o", out, check=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 121 and sum(r["void"] for r in rows) == 1
    first = rows[0]
    assert first["anony"] is True and first["winner"] in ("model_a", "model_b", "tie", "tie (bothbad)")
    assert first["conversation_a"][1] == {"role": "assistant", "content": first["model_a"]}
    assert len(first["judge"]) == 32  # the salted hash, not an IP

    again = run_cli("arena", "export", "--db", db, "-o", out)
    assert again.returncode == 2 and "--force" in again.stderr
    conv = tmp_path / "conv.json"
    run_cli("arena", "export", "--db", db, "--table", "conversations", "-o", conv, check=True)
    assert len(json.loads(conv.read_text())) == 2 * 121 + 1
    stdout = run_cli("arena", "export", "--db", db, "--table", "feedback", "--format", "jsonl", check=True)
    assert stdout.stdout == ""
    bad = run_cli("arena", "export", "--db", db, "-o", tmp_path / "x.csv")
    assert bad.returncode == 2 and "--format" in bad.stderr

    lb_json, lb_png = tmp_path / "lb.json", tmp_path / "lb.png"
    proc = run_cli("arena", "leaderboard", "--db", db, "--bootstrap", "100", "--online-elo", "--json", lb_json,
                   "--plot", lb_png, check=True)
    assert "| 1 | strong |" in proc.stdout and "Online Elo" in proc.stdout and "1 void" in proc.stdout
    data = json.loads(lb_json.read_text())
    assert data["battles"] == 120 and data["bootstrap_rounds"] == 100
    assert [r["model"] for r in data["ratings"]][0] == "strong"
    assert lb_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    missing = run_cli("arena", "leaderboard", "--db", tmp_path / "none.db")
    assert missing.returncode == 1 and "no arena database" in missing.stderr
    zero = run_cli("arena", "leaderboard", "--db", db, "--bootstrap", "0")
    assert zero.returncode == 2 and "--bootstrap" in zero.stderr
    helptext = run_cli("arena", "leaderboard", "--help", check=True).stdout
    assert "example" in helptext and "--bootstrap" in helptext


def test_a_version_1_database_is_upgraded_in_place(tmp_path):
    """Databases written before endpoints (schema 1) gain the two columns; their votes stay."""
    db = tmp_path / "a.db"
    with ArenaStore(db, salt="s") as store:
        add_battle(store, 1, "x", "y", "model_a")
    conn = sqlite3.connect(db)
    conn.executescript("ALTER TABLE conversations DROP COLUMN served_by; DROP TABLE vote_categories; "
                       "ALTER TABLE conversations DROP COLUMN upstream_model; PRAGMA user_version = 1;")
    conn.close()
    with ArenaStore(db, salt="s") as store:
        (vote,) = list(store.iter_votes())
        assert (vote["model_a"], vote["served_by_a"], vote["upstream_model_b"]) == ("x", "local", None)
        store.save_conversation("c", mode="battle", model="e", messages=[], served_by="endpoint",
                                upstream_model="gpt-x")
        assert store.conversation("c")["upstream_model"] == "gpt-x"
        assert vote["categories"] == []  # "hi" is too short to tell its language, and nothing else
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


# The tables of schema version 2, as vicuna wrote them before categories (kept verbatim: the upgrade's input).
SCHEMA_2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE conversations (id TEXT PRIMARY KEY, mode TEXT NOT NULL, model TEXT NOT NULL, messages TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}', finish TEXT, error TEXT, ip_hash TEXT, created REAL NOT NULL,
    updated REAL NOT NULL, served_by TEXT, upstream_model TEXT);
CREATE TABLE votes (id INTEGER PRIMARY KEY, created REAL NOT NULL, mode TEXT NOT NULL, anonymous INTEGER NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, conv_a TEXT NOT NULL REFERENCES conversations (id),
    conv_b TEXT NOT NULL REFERENCES conversations (id), winner TEXT NOT NULL, void INTEGER NOT NULL DEFAULT 0,
    void_reason TEXT, ip_hash TEXT, UNIQUE (conv_a, conv_b));
CREATE TABLE feedback (id INTEGER PRIMARY KEY, created REAL NOT NULL, conv_id TEXT NOT NULL, model TEXT NOT NULL,
    message_index INTEGER NOT NULL, kind TEXT NOT NULL, note TEXT, ip_hash TEXT);
PRAGMA user_version = 2;
"""

PROMPTS = {
    "code": [{"role": "user", "content": "Write a Python function that reverses a linked list."}],
    "math": [{"role": "user", "content": "Solve 3x + 5 = 20 for x."}],
    "french": [{"role": "user", "content": "Écris un petit poème sur la mer, s'il te plaît."},
               {"role": "assistant", "content": "..."}, {"role": "user", "content": "Encore un, plus court."}],
    "plain": [{"role": "user", "content": "Tell me a short story about a brave little dog."}],
}


def test_categories_are_tagged_stored_and_filtered(tmp_path):
    """An old (schema 2) database is upgraded: its votes are tagged; new votes are tagged as stored;
    the leaderboard filters by category in the SQLite file and on the command line."""
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA_2)
    for n, (name, msgs) in enumerate(PROMPTS.items()):
        for side, model in (("a", "x"), ("b", "y")):
            answer = [{"role": "assistant", "content": f"{model} answers"}]
            conn.execute("INSERT INTO conversations VALUES (?, 'battle', ?, ?, '{}', 'stop', NULL, NULL, 1, 1, "
                         "'local', NULL)", (f"{name}-{side}", model, json.dumps(msgs + answer)))
        conn.execute("INSERT INTO votes (created, mode, anonymous, model_a, model_b, conv_a, conv_b, winner) "
                     "VALUES (?, 'battle', 1, 'x', 'y', ?, ?, 'model_a')", (n, f"{name}-a", f"{name}-b"))
    conn.commit()
    conn.close()
    with ArenaStore(db, salt="s") as store:  # the upgrade tags the four old votes
        assert [v["categories"] for v in store.iter_votes()] == [["coding", "english", "lang:en"], ["math"],
                                       ["lang:fr", "multi-turn", "non-english"], ["english", "lang:en"]]
        # a new vote is tagged as it is stored (a long coding question, in a fenced block)
        long_q = "Why does this fail?\n```python\n" + "x = 1\n" * 300 + "```"
        for side, model in (("a", "y"), ("b", "x")):
            store.save_conversation(f"new-{side}", mode="battle", model=model,
                                    messages=[{"role": "user", "content": long_q},
                                              {"role": "assistant", "content": "## Fix\n- **one**\n- two"}])
        store.add_vote(mode="battle", model_a="y", model_b="x", conv_a="new-a", conv_b="new-b", winner="model_a",
                       anonymous=True)
        assert store.categories() == {"english": 3, "lang:en": 3, "coding": 2, "lang:fr": 1, "long-query": 1,
                                      "math": 1, "multi-turn": 1, "non-english": 1}
        coding = store.battles(category="coding", with_style=True)
        assert [b.as_tuple() for b in coding] == [("x", "y", "model_a"), ("y", "x", "model_a")]
        assert coding[1].style_a == {"tokens": 11, "headers": 1, "lists": 2, "bold": 1}
        assert "long-query" in coding[1].categories
        assert store.battles(category="nothing") == []
        assert len(store.battles()) == 5
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 3

    out = run_cli("arena", "leaderboard", "--db", db, "--category", "coding", "--bootstrap", "20",
                  "--json", tmp_path / "c.json", check=True).stdout
    assert "Category: **coding**" in out and "Style-controlled" in out
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["category"] == "coding" and data["battles"] == 2
    assert {r["model"] for r in data["ratings"]} == {"x", "y"} and "style_controlled" in data["ratings"][0]
    listing = run_cli("arena", "leaderboard", "--db", db, "--list-categories", check=True).stdout
    assert "coding" in listing and "2" in listing
    unknown = run_cli("arena", "leaderboard", "--db", db, "--category", "poetry")
    assert unknown.returncode == 2 and "coding" in unknown.stderr  # names the categories there are


def test_a_pluggable_tagger_and_retag(tmp_path):
    db = tmp_path / "a.db"
    with ArenaStore(db, salt="s") as store:
        add_battle(store, 1, "x", "y", "model_a")
    with ArenaStore(db, salt="s", tagger=lambda msgs: ["hard-prompt"], tagger_name="judge-x") as store:
        assert store.retag() == 1 and store.retag() == 0  # only votes this tagger has not seen
        assert store.categories() == {"hard-prompt": 1}
        assert [b.as_tuple() for b in store.battles(category="hard-prompt")] == [("x", "y", "model_a")]
    def broken(msgs):
        raise RuntimeError("judge down")
    with ArenaStore(db, salt="s", tagger=broken) as store:  # a failing tagger costs the tags, never the vote
        add_battle(store, 2, "y", "x", "tie")
        assert len(store.battles()) == 2


def test_default_database_lives_in_the_users_data_folder(monkeypatch, tmp_path):
    """No `arena.db*` in whatever folder the server was started from (issue 29): the data folder, made on demand."""
    from vicuna.cli import main
    from vicuna.serve.arena import default_db
    from vicuna.serve.launch import WebConfig, web_store

    monkeypatch.delenv("VICUNA_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert default_db() == tmp_path / "data" / "vicuna" / "arena.db"
    store = web_store(WebConfig())  # what `vicuna serve --web` opens without --arena-db
    for cid, model in (("a1", "alpha"), ("b1", "beta")):
        store.save_conversation(cid, mode="battle", model=model, messages=[{"role": "user", "content": "hi"}])
    store.add_vote(mode="battle", model_a="alpha", model_b="beta", conv_a="a1", conv_b="b1", winner="model_a",
                   anonymous=True)
    store.close()
    assert (tmp_path / "data" / "vicuna" / "arena.db").is_file() and not list((tmp_path / "cwd").iterdir())
    assert main(["arena", "leaderboard", "--bootstrap", "10"]) == 0  # reads the same default
    monkeypatch.setenv("VICUNA_HOME", str(tmp_path / "home"))
    assert default_db() == tmp_path / "home" / "arena.db"
    monkeypatch.delenv("VICUNA_HOME")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_db() == Path.home() / ".local" / "share" / "vicuna" / "arena.db"
