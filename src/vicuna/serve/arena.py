"""Arena storage: conversations, votes and feedback in one SQLite file, and the leaderboard.

Why SQLite: one file that a user can copy, query and back up, transactions for free, and
WAL mode lets the leaderboard read while chat sessions write. Each thread gets its own
connection (sqlite3 connections must not be shared across threads); writers wait on the
database lock (``busy_timeout``), then retry a few times, and then fail with an
:class:`ArenaError` the UI shows — a round that could not be stored offers no vote.

The file is watched: deleted or replaced while the server runs, every use fails loudly
instead of writing into the unlinked file while a new empty one appears. (Reopening a
replaced file is not safe either: SQLite would replay the old file's ``-wal`` onto it.)

Privacy: client IPs are never stored. ``hash_ip`` keys an HMAC with a secret salt kept
*outside* the database (``<db>.salt``, or ``VICUNA_ARENA_SALT``), so a shared database
cannot be reversed by hashing all 2**32 IPv4 addresses. The database holds whole
conversations, so it (and SQLite's ``-wal``/``-shm`` files, which take its mode) is created
0600: readable by the server's user only.

The maths (Bradley-Terry, bootstrap, online Elo) lives in ``vicuna.ratings``; this module
only turns stored votes into battles and summarises them for the CLI and the web UI.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import UsageError, VicunaError
from ..files import write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 1: first; 2: conversations.served_by/upstream_model; 3: vote_categories
MODES = ("chat", "battle", "side_by_side")
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
FEEDBACK_KINDS = ("upvote", "downvote", "flag", "retract")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per conversation with one model; rewritten as it grows (upsert by id).
CREATE TABLE IF NOT EXISTS conversations (
    id       TEXT PRIMARY KEY,
    mode     TEXT NOT NULL CHECK (mode IN ('chat', 'battle', 'side_by_side')),
    model    TEXT NOT NULL,
    messages TEXT NOT NULL,               -- JSON list of {"role", "content"}
    params   TEXT NOT NULL DEFAULT '{}',  -- JSON sampling parameters
    finish   TEXT,                        -- 'stop', 'stopped', 'cancelled', 'error' or 'flagged' (last answer)
    error    TEXT,                        -- what failed, as shown to the user
    ip_hash  TEXT,
    created  REAL NOT NULL,
    updated  REAL NOT NULL,
    served_by      TEXT,                  -- 'endpoint' for an OpenAI-compatible upstream, else 'local'
    upstream_model TEXT                   -- the upstream's model that answered (endpoints only)
);
CREATE INDEX IF NOT EXISTS conversations_created ON conversations (created);
-- One vote per pair of conversations (a battle or a named side-by-side round).
CREATE TABLE IF NOT EXISTS votes (
    id          INTEGER PRIMARY KEY,
    created     REAL NOT NULL,
    mode        TEXT NOT NULL CHECK (mode IN ('battle', 'side_by_side')),
    anonymous   INTEGER NOT NULL CHECK (anonymous IN (0, 1)),
    model_a     TEXT NOT NULL,
    model_b     TEXT NOT NULL,
    conv_a      TEXT NOT NULL REFERENCES conversations (id),
    conv_b      TEXT NOT NULL REFERENCES conversations (id),
    winner      TEXT NOT NULL CHECK (winner IN ('model_a', 'model_b', 'tie', 'tie (bothbad)')),
    void        INTEGER NOT NULL DEFAULT 0 CHECK (void IN (0, 1)),
    void_reason TEXT,
    ip_hash     TEXT,
    UNIQUE (conv_a, conv_b)
);
CREATE INDEX IF NOT EXISTS votes_created ON votes (created);
-- Thumbs up/down and flags on single answers.
CREATE TABLE IF NOT EXISTS feedback (
    id            INTEGER PRIMARY KEY,
    created       REAL NOT NULL,
    conv_id       TEXT NOT NULL REFERENCES conversations (id),
    model         TEXT NOT NULL,
    message_index INTEGER NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('upvote', 'downvote', 'flag', 'retract')),
    note          TEXT,
    ip_hash       TEXT
);
"""
# Version 3. Categories of each vote's conversation (coding, math, multi-turn, ...), one row per
# tag, with the tagger that gave it ('rules-v1'; later e.g. a judge model's name).
CATEGORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS vote_categories (
    vote_id  INTEGER NOT NULL REFERENCES votes (id),
    category TEXT NOT NULL,
    tagger   TEXT NOT NULL,
    PRIMARY KEY (vote_id, category)
);
CREATE INDEX IF NOT EXISTS vote_categories_category ON vote_categories (category);
"""


class ArenaError(VicunaError):
    """The arena database cannot be used as asked."""


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: str
    style_a: dict[str, int] | None = None  # vicuna.ratings.style_of each side's answers (battles(with_style=True))
    style_b: dict[str, int] | None = None
    categories: tuple[str, ...] = ()

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.model_a, self.model_b, self.winner)


class ArenaStore:
    """The arena database. Safe to use from many threads at once (one connection each).

    ``busy_timeout`` is how long one attempt waits for another writer's lock; ``attempts``
    how often a locked operation is tried before it fails.
    """

    def __init__(self, path: str | os.PathLike, *, salt: str | None = None, create: bool = True,
                 busy_timeout: float = 2.0, attempts: int = 3, tagger: Any = None, tagger_name: str | None = None):
        from .categories import RULES_TAGGER, tag_conversation

        self.path = Path(path)
        # what tags a vote's conversation as it is stored (see serve/categories.py)
        self.tagger = tagger or tag_conversation
        self.tagger_name = tagger_name or (RULES_TAGGER if tagger is None else getattr(tagger, "__name__", "custom"))
        self.busy_timeout, self.attempts = busy_timeout, attempts
        if not create and not self.path.is_file():
            raise ArenaError(f"no arena database at {self.path}; pass --db with the file `vicuna serve --web` wrote")
        if create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ArenaError(f"cannot create the folder of arena database {self.path}: {e}") from None
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                pass
            except OSError as e:
                raise ArenaError(f"cannot create arena database {self.path}: {e}") from None
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._salt = salt
        self._identity = self._file_identity()
        self._check_schema(self._conn(), create)

    def _check_schema(self, conn: sqlite3.Connection, create: bool) -> None:
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ArenaError(
                    f"{self.path} has arena schema version {version}; this vicuna knows up to {SCHEMA_VERSION} "
                    "(upgrade vicuna)"
                )
            if version == 0 and not create:
                raise ArenaError(f"{self.path} is not an arena database (no arena tables in it)")
            if version == 0:
                conn.executescript(SCHEMA + CATEGORY_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
                return
            if version < 2:  # version 1 (before endpoints): two nullable columns more
                conn.executescript("BEGIN IMMEDIATE; ALTER TABLE conversations ADD COLUMN served_by TEXT; "
                                   "ALTER TABLE conversations ADD COLUMN upstream_model TEXT; "
                                   "PRAGMA user_version = 2; COMMIT;")
            if version < 3:  # version 2: the categories table, and the old votes tagged
                conn.executescript("BEGIN IMMEDIATE;" + CATEGORY_SCHEMA + "PRAGMA user_version = 3; COMMIT;")
                tagged = self.retag()
                log.info("arena database %s upgraded to schema 3: %d earlier votes tagged with categories",
                         self.path, tagged)
        except sqlite3.DatabaseError as e:
            raise ArenaError(f"cannot open arena database {self.path}: {e}") from None

    # -- connections -------------------------------------------------------------------

    def _file_identity(self) -> tuple[int, int] | None:
        """(device, inode) of the database file, None once it is gone."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _conn(self) -> sqlite3.Connection:
        identity = self._file_identity()
        if identity != self._identity:
            what = "deleted" if identity is None else "replaced by another file"
            raise ArenaError(f"the arena database {self.path} was {what} while the server was running; nothing can "
                             "be stored until the server is restarted (which opens the file now at that path, or "
                             "creates a new one)")
        conn = getattr(self._local, "conn", None)
        return conn if conn is not None else self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            # mode=rw: never create a file here (a deleted database must not come back empty);
            # autocommit (isolation_level=None): each statement is its own transaction.
            conn = sqlite3.connect(f"file:{quote(str(self.path.absolute()))}?mode=rw", uri=True,
                                   timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as e:
            raise ArenaError(f"cannot open arena database {self.path}: {e}") from None
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One statement, retried while another process holds the lock, then a clear ArenaError."""
        for attempt in range(1, self.attempts + 1):
            try:
                return self._conn().execute(sql, params)
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise ArenaError(f"arena database {self.path}: {e}") from None
                if attempt == self.attempts:
                    raise ArenaError(
                        f"the arena database {self.path} is locked by another process (tried {attempt} times, "
                        f"{self.busy_timeout:g} s each); close whatever holds it (an open sqlite3 shell?)"
                    ) from None
                log.warning("arena database %s is locked (attempt %d of %d); retrying", self.path, attempt,
                            self.attempts)
                time.sleep(0.05 * attempt)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    def __enter__(self) -> ArenaStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- privacy -----------------------------------------------------------------------

    def _secret(self) -> bytes:
        """The HMAC key for IPs: explicit, from the environment, or a 0600 file beside the db."""
        if self._salt is None:
            self._salt = os.environ.get("VICUNA_ARENA_SALT") or self._salt_file()
        return self._salt.encode()

    def _salt_file(self) -> str:
        """Read ``<db>.salt``, creating it atomically (written aside, then hard-linked into place,
        so a second process starting at the same moment reads the winner's salt, never half of it)."""
        path = self.path.with_name(self.path.name + ".salt")
        if not path.exists():
            try:
                write_text(path, secrets.token_hex(32) + "\n", permissions=0o600, replace=False)
            except FileExistsError:
                pass  # another process won the race: use its salt
        salt = path.read_text().strip()
        if len(salt) < 16:
            raise ArenaError(f"{path} holds no usable salt; delete it (IP pseudonyms will change) "
                             "or set VICUNA_ARENA_SALT")
        return salt

    def hash_ip(self, ip: str | None) -> str | None:
        """A stable pseudonym for a client IP (same salt, same IP -> same hash)."""
        if not ip:
            return None
        return hmac.new(self._secret(), ip.encode(), hashlib.sha256).hexdigest()[:32]

    # -- writes ------------------------------------------------------------------------

    def save_conversation(
        self,
        conv_id: str,
        *,
        mode: str,
        model: str,
        messages: Sequence[dict[str, Any]],
        params: dict[str, Any] | None = None,
        finish: str | None = None,
        error: str | None = None,
        ip_hash: str | None = None,
        served_by: str = "local",
        upstream_model: str | None = None,
    ) -> None:
        """Insert or update one conversation (the whole message list each time)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        now = time.time()
        self._execute(
            """INSERT INTO conversations (id, mode, model, messages, params, finish, error, ip_hash, created, updated,
                                          served_by, upstream_model)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (id) DO UPDATE SET messages = excluded.messages, params = excluded.params,
                   finish = excluded.finish, error = excluded.error, updated = excluded.updated""",
            (conv_id, mode, model, json.dumps(list(messages), ensure_ascii=False), json.dumps(params or {}),
             finish, error, ip_hash, now, now, served_by, upstream_model),
        )

    def add_vote(
        self,
        *,
        mode: str,
        model_a: str,
        model_b: str,
        conv_a: str,
        conv_b: str,
        winner: str,
        anonymous: bool,
        void_reason: str | None = None,
        ip_hash: str | None = None,
    ) -> int:
        """Store a vote, tagged with the categories of its conversation; a vote with ``void_reason``
        is kept but left out of the leaderboard."""
        if winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, not {winner!r}")
        row = self._execute("SELECT messages FROM conversations WHERE id = ?", (conv_a,)).fetchone()
        tags = self._tags(json.loads(row["messages"])) if row else []
        try:
            cur = self._execute(
                """INSERT INTO votes (created, mode, anonymous, model_a, model_b, conv_a, conv_b, winner,
                                      void, void_reason, ip_hash)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (time.time(), mode, int(anonymous), model_a, model_b, conv_a, conv_b, winner,
                 int(void_reason is not None), void_reason, ip_hash),
            )
        except sqlite3.IntegrityError as e:
            if "UNIQUE" in str(e):
                raise ArenaError("this round already has a vote; start a new round to vote again") from None
            raise ArenaError(f"vote not stored: {e} (both conversations must be saved first)") from None
        vote_id = int(cur.lastrowid)
        self._store_tags(vote_id, tags, self.tagger_name)
        return vote_id

    # -- categories ----------------------------------------------------------------------

    def _tags(self, messages: list[dict[str, Any]]) -> list[str]:
        """The tagger's categories; a failing tagger costs the tags, never the vote."""
        try:
            return sorted({str(t) for t in self.tagger(messages)})
        except Exception as e:  # noqa: BLE001 -- a pluggable tagger may fail in any way
            log.warning("arena: the category tagger %s failed (%r); vote stored without categories",
                        self.tagger_name, e)
            return []

    def _store_tags(self, vote_id: int, tags: Iterable[str], tagger: str) -> None:
        for tag in tags:
            self._execute("INSERT OR IGNORE INTO vote_categories (vote_id, category, tagger) VALUES (?, ?, ?)",
                          (vote_id, tag, tagger))

    def retag(self, *, force: bool = False) -> int:
        """Tag the votes that have no tag of this store's tagger yet (all of them with ``force``,
        replacing its earlier tags); returns how many votes were looked at (a vote the tagger
        finds no category for is looked at again next time). How an old database's votes get
        categories, and how a new tagger (a judge model) is run over stored battles. Two taggers
        giving a vote the same category keep the first one's row."""
        if force:
            self._execute("DELETE FROM vote_categories WHERE tagger = ?", (self.tagger_name,))
        rows = self._execute(
            """SELECT v.id, c.messages FROM votes v JOIN conversations c ON c.id = v.conv_a
               WHERE v.id NOT IN (SELECT vote_id FROM vote_categories WHERE tagger = ?) ORDER BY v.id""",
            (self.tagger_name,)).fetchall()
        for r in rows:
            self._store_tags(r["id"], self._tags(json.loads(r["messages"])), self.tagger_name)
        return len(rows)

    def categories(self, *, include_named: bool = False, include_void: bool = False) -> dict[str, int]:
        """Category -> number of counted votes in it, most votes first."""
        sql = ("SELECT k.category, COUNT(*) AS n FROM vote_categories k JOIN votes v ON v.id = k.vote_id"
               + _vote_filter(include_named, include_void, "v.") + " GROUP BY k.category ORDER BY n DESC, k.category")
        return {r["category"]: r["n"] for r in self._execute(sql).fetchall()}

    def add_feedback(
        self,
        *,
        conv_id: str,
        model: str,
        message_index: int,
        kind: str,
        note: str | None = None,
        ip_hash: str | None = None,
    ) -> int:
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"feedback kind must be one of {FEEDBACK_KINDS}, not {kind!r}")
        try:
            cur = self._execute(
                """INSERT INTO feedback (created, conv_id, model, message_index, kind, note, ip_hash)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (time.time(), conv_id, model, message_index, kind, note, ip_hash),
            )
        except sqlite3.IntegrityError as e:
            raise ArenaError(f"feedback not stored: {e} (unknown conversation {conv_id!r})") from None
        return int(cur.lastrowid)

    # -- reads -------------------------------------------------------------------------

    def battles(self, *, include_named: bool = False, include_void: bool = False, category: str | None = None,
                with_style: bool = False) -> list[Battle]:
        """Votes as rating battles, oldest first (anonymous, non-void ones by default).

        ``category``: only votes tagged with it. ``with_style``: each battle also carries the
        style of both sides' answers (``vicuna.ratings.style_of`` over all assistant turns) and
        its categories, for the style-controlled leaderboard."""
        where = _vote_filter(include_named, include_void, "v.")
        params: list[Any] = []
        if category is not None:
            where += (" AND " if where else " WHERE ") + "v.id IN (SELECT vote_id FROM vote_categories WHERE category = ?)"
            params.append(category)
        if not with_style:
            rows = self._execute(f"SELECT v.model_a, v.model_b, v.winner FROM votes v{where} ORDER BY v.created, v.id",
                                 params).fetchall()
            return [Battle(r["model_a"], r["model_b"], r["winner"]) for r in rows]
        from ..conversation import message_text
        from ..ratings import style_of

        sql = f"""SELECT v.id, v.model_a, v.model_b, v.winner, ca.messages AS ma, cb.messages AS mb,
                         (SELECT group_concat(category, char(10)) FROM vote_categories WHERE vote_id = v.id) AS cats
                  FROM votes v JOIN conversations ca ON ca.id = v.conv_a JOIN conversations cb ON cb.id = v.conv_b
                  {where} ORDER BY v.created, v.id"""
        out = []
        for r in self._execute(sql, params).fetchall():
            styles = [style_of([message_text(m.get("content")) for m in json.loads(r[k]) if m.get("role") == "assistant"])
                      for k in ("ma", "mb")]
            out.append(Battle(r["model_a"], r["model_b"], r["winner"], styles[0], styles[1],
                              tuple(sorted((r["cats"] or "").split("\n"))) if r["cats"] else ()))
        return out

    def counts(self) -> dict[str, int]:
        out = {t: self._execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
               for t in ("conversations", "votes", "feedback")}
        out["void_votes"] = self._execute("SELECT COUNT(*) FROM votes WHERE void = 1").fetchone()[0]
        return out

    def conversation(self, conv_id: str) -> dict[str, Any] | None:
        row = self._execute("SELECT * FROM conversations WHERE id = ?", (conv_id,)).fetchone()
        return _conversation_dict(row) if row else None

    def iter_conversations(self) -> Iterator[dict[str, Any]]:
        for row in self._execute("SELECT * FROM conversations ORDER BY created, id"):
            yield _conversation_dict(row)

    def iter_votes(self) -> Iterator[dict[str, Any]]:
        """Votes with both conversations inlined (the export format)."""
        sql = """SELECT v.*, ca.messages AS messages_a, ca.params AS params_a, ca.served_by AS served_by_a,
                        ca.upstream_model AS upstream_model_a, cb.messages AS messages_b, cb.params AS params_b,
                        cb.served_by AS served_by_b, cb.upstream_model AS upstream_model_b,
                        (SELECT group_concat(category, char(10)) FROM vote_categories WHERE vote_id = v.id) AS cats
                 FROM votes v JOIN conversations ca ON ca.id = v.conv_a JOIN conversations cb ON cb.id = v.conv_b
                 ORDER BY v.created, v.id"""
        for r in self._execute(sql):
            yield {
                "id": r["id"],
                "tstamp": r["created"],
                "mode": r["mode"],
                "anony": bool(r["anonymous"]),
                "model_a": r["model_a"],
                "model_b": r["model_b"],
                "winner": r["winner"],
                "void": bool(r["void"]),
                "void_reason": r["void_reason"],
                "judge": r["ip_hash"],
                "turn": sum(1 for m in json.loads(r["messages_a"]) if m.get("role") == "user"),
                "conversation_a": json.loads(r["messages_a"]),
                "conversation_b": json.loads(r["messages_b"]),
                "params_a": json.loads(r["params_a"]),
                "params_b": json.loads(r["params_b"]),
                "served_by_a": r["served_by_a"] or "local",
                "served_by_b": r["served_by_b"] or "local",
                "upstream_model_a": r["upstream_model_a"],
                "upstream_model_b": r["upstream_model_b"],
                "categories": sorted(r["cats"].split("\n")) if r["cats"] else [],
            }

    def iter_feedback(self) -> Iterator[dict[str, Any]]:
        for r in self._execute("SELECT * FROM feedback ORDER BY created, id"):
            d = dict(r)
            d["tstamp"] = d.pop("created")
            yield d


def _vote_filter(include_named: bool, include_void: bool, prefix: str = "") -> str:
    where = ([] if include_named else [f"{prefix}anonymous = 1"]) + ([] if include_void else [f"{prefix}void = 0"])
    return (" WHERE " + " AND ".join(where)) if where else ""


def _conversation_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["messages"] = json.loads(d["messages"])
    d["params"] = json.loads(d["params"])
    return d


# -- identity leaks ------------------------------------------------------------------------


# Parts of model names that say nothing about who made the model.
GENERIC_NAME_PARTS = frozenset(
    "chat instruct instruction base model models tuned turbo preview mini tiny small medium large hf gguf "
    "awq gptq bf16 fp16 int4 int8 delta lora merged sft dpo rlhf test demo".split()
)


def identity_terms(names: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    """Words that give a model away: each name, its last path part ("lmsys/vicuna-7b" ->
    "vicuna-7b"), its distinctive alphabetic parts ("lmsys/vicuna-7b-v1.5" -> "lmsys", "vicuna";
    4+ letters, not generic like "chat"), plus ``extra`` words (makers: "openai", ...)."""
    terms = set()
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        terms.update(v for v in (name, base) if len(v) >= 3)
        terms.update(w for w in re.findall(r"[^\W\d_]+", name) if len(w) >= 4 and w.lower() not in GENERIC_NAME_PARTS)
    terms.update(w.strip() for w in extra if len(w.strip()) >= 3)
    return sorted(terms, key=lambda t: (-len(t), t.lower()))


def identity_leak(answers: dict[str, Iterable[str]], names: Iterable[str], extra: Iterable[str] = ()) -> str | None:
    """Why a battle vote must be void, or None: an answer says which model (or maker) wrote it.

    ``answers`` maps a side ("model A") to its answer texts; the words checked are
    :func:`identity_terms` of the served ``names``, matched as whole words, case-insensitively,
    so "I am Vicuna" voids a battle with vicuna-7b-v1.5, and "made by OpenAI" one with
    ``extra=["openai"]``.
    Terms shorter than 3 characters are skipped: they would void votes on ordinary words.
    """
    patterns = [(t, re.compile(rf"(?<!\w){re.escape(t)}(?!\w)", re.IGNORECASE)) for t in identity_terms(names, extra)]
    for side, texts in answers.items():
        for text in texts:
            for term, pattern in patterns:
                if pattern.search(text):
                    return f"the answer of {side} mentions {term!r}"
    return None


# -- leaderboard ---------------------------------------------------------------------------


@dataclass
class LeaderboardRow:
    model: str
    rating: float
    lower: float
    upper: float
    votes: int
    wins: float  # ties count as half a win
    online_elo: float | None = None
    style: Any = None  # RatingInterval of the style-controlled rating, when computed
    style_rank: int | None = None

    @property
    def win_rate(self) -> float:
        return self.wins / self.votes if self.votes else 0.0


@dataclass
class Leaderboard:
    rows: list[LeaderboardRow]
    win_rate: dict[str, dict[str, float | None]]  # observed P(row beats column), ties = 1/2
    battles: int
    rounds: int
    confidence: float = 0.95
    notes: list[str] = field(default_factory=list)
    category: str | None = None
    style_coefficients: dict[str, Any] | None = None  # feature -> RatingInterval (Elo points per SD)

    def as_dict(self) -> dict[str, Any]:
        return {
            "battles": self.battles,
            "bootstrap_rounds": self.rounds,
            "confidence": self.confidence,
            "category": self.category,
            "ratings": [
                {"rank": i + 1, "model": r.model, "rating": r.rating, "lower": r.lower, "upper": r.upper,
                 "votes": r.votes, "win_rate": r.win_rate,
                 **({"online_elo": r.online_elo} if r.online_elo is not None else {}),
                 **({"style_controlled": {"rank": r.style_rank, **r.style.as_dict()}} if r.style is not None else {})}
                for i, r in enumerate(self.rows)
            ],
            "style_coefficients": ({f: iv.as_dict() for f, iv in self.style_coefficients.items()}
                                   if self.style_coefficients else None),
            "win_rate": self.win_rate,
        }


def compute_leaderboard(
    battles: Iterable[Battle | tuple[str, str, str]],
    *,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int | None = 0,
    online: bool = False,
    category: str | None = None,
) -> Leaderboard:
    """Bradley-Terry ratings with bootstrap intervals, vote counts and the win-rate matrix.

    When every battle carries its answers' style (``ArenaStore.battles(with_style=True)``),
    the rows also get the style-controlled rating and rank (``ratings.bootstrap_style_controlled``).
    ``category`` only labels the result (filter the battles with ``battles(category=...)``)."""
    from .. import ratings  # numpy: imported only when a leaderboard is asked for

    if rounds < 1:
        raise UsageError(f"bootstrap rounds must be >= 1, got {rounds}")
    battles = list(battles)
    tuples = [b.as_tuple() if isinstance(b, Battle) else tuple(b) for b in battles]
    if not tuples:
        return Leaderboard([], {}, 0, rounds, confidence, ["no votes yet" if category is None else
                                                           f"no votes in category {category!r} yet"],
                           category=category)
    intervals = ratings.bootstrap_bradley_terry(tuples, rounds=rounds, confidence=confidence, seed=seed)
    styled = all(isinstance(b, Battle) and b.style_a is not None and b.style_b is not None for b in battles)
    sc = (ratings.bootstrap_style_controlled(tuples, [b.style_a for b in battles], [b.style_b for b in battles],
                                             rounds=rounds, confidence=confidence, seed=seed) if styled else None)
    elo = ratings.online_elo(tuples) if online else {}
    votes: dict[str, int] = {}
    wins: dict[str, float] = {}
    pair_games: dict[tuple[str, str], int] = {}
    pair_wins: dict[tuple[str, str], float] = {}
    for a, b, w in tuples:
        score_a = 1.0 if w == "model_a" else 0.0 if w == "model_b" else 0.5
        for x, y, s in ((a, b, score_a), (b, a, 1.0 - score_a)):
            votes[x] = votes.get(x, 0) + 1
            wins[x] = wins.get(x, 0.0) + s
            pair_games[x, y] = pair_games.get((x, y), 0) + 1
            pair_wins[x, y] = pair_wins.get((x, y), 0.0) + s
    style_rank = {m: i for i, m in enumerate(sc.ratings, 1)} if sc else {}
    rows = [
        LeaderboardRow(m, iv.rating, iv.lower, iv.upper, votes[m], wins[m], elo.get(m),
                       sc.ratings[m] if sc else None, style_rank.get(m)) for m, iv in intervals.items()
    ]
    order = [r.model for r in rows]
    matrix = {
        a: {b: (pair_wins[a, b] / pair_games[a, b] if (a, b) in pair_games else None) for b in order if b != a}
        for a in order
    }
    notes = []
    if len(tuples) < 50:
        notes.append(f"only {len(tuples)} vote{'s' if len(tuples) != 1 else ''}: intervals are wide")
    return Leaderboard(rows, matrix, len(tuples), rounds, confidence, notes, category,
                       sc.coefficients if sc else None)


def leaderboard_markdown(lb: Leaderboard) -> str:
    """The ratings table as Markdown (used by the web UI and `vicuna arena leaderboard`)."""
    if not lb.rows:
        if lb.category is not None:
            return f"_No votes in category **{lb.category}** yet._"
        return "_No votes yet: play a few arena battles first._"
    pct = int(round(lb.confidence * 100))
    online = any(r.online_elo is not None for r in lb.rows)
    styled = any(r.style is not None for r in lb.rows)
    head = ["Rank", "Model", "Rating", f"{pct}% CI", "Votes", "Win rate"] + (["Online Elo"] if online else [])
    head += ["Rank (style ctrl.)", f"Style-controlled ({pct}% CI)"] if styled else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(lb.rows, 1):
        ci = f"{r.lower:.0f} – {r.upper:.0f} (+{r.upper - r.rating:.0f}/-{r.rating - r.lower:.0f})"
        cells = [str(i), r.model, f"{r.rating:.0f}", ci, str(r.votes), f"{r.win_rate:.0%}"]
        if online:
            cells.append(f"{r.online_elo:.0f}")
        if styled:
            cells += [str(r.style_rank), f"{r.style.rating:.0f} ({r.style.lower:.0f} – {r.style.upper:.0f})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{lb.battles} vote{'s' if lb.battles != 1 else ''}; Bradley–Terry maximum likelihood on the Elo scale, "
        f"{pct}% intervals from "
        f"{lb.rounds} bootstrap rounds; ties count as half a win."
        + (f" Category: **{lb.category}**." if lb.category is not None else "")
        + (" Style-controlled: the same fit with the answers' length and markdown (headers, lists, bold) as "
           "covariates, so it ranks models as if they wrote equally long, equally formatted answers." if styled else "")
        + ("".join(f" Note: {n}." for n in lb.notes))
    )
    return "\n".join(lines)


def win_rate_markdown(lb: Leaderboard) -> str:
    """Observed win rate of the row model against the column model (ties = 1/2)."""
    if not lb.rows:
        return ""
    names = [r.model for r in lb.rows]
    lines = ["| row beats column | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for a in names:
        cells = ["—" if a == b else ("·" if lb.win_rate[a][b] is None else f"{lb.win_rate[a][b]:.0%}") for b in names]
        lines.append(f"| **{a}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leaderboard_figure(lb: Leaderboard):
    """A matplotlib figure: ratings with their confidence intervals, best at the top."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 1.4 + 0.4 * max(1, len(lb.rows))), layout="constrained")
    ax = fig.add_subplot()
    if not lb.rows:
        ax.text(0.5, 0.5, "no votes yet", ha="center", va="center")
        ax.set_axis_off()
        return fig
    rows = lb.rows[::-1]
    y = range(len(rows))
    x = [r.rating for r in rows]
    err = [[max(0.0, r.rating - r.lower) for r in rows], [max(0.0, r.upper - r.rating) for r in rows]]
    ax.errorbar(x, y, xerr=err, fmt="o", capsize=4, color="tab:blue", label="Bradley–Terry")
    legend = False
    if all(r.style is not None for r in rows):
        ys = [v - 0.2 for v in y]
        # a percentile interval need not contain the point estimate (few, lopsided votes): clip at 0
        ax.errorbar([r.style.rating for r in rows], ys, xerr=[[max(0.0, r.style.rating - r.style.lower) for r in rows],
                    [max(0.0, r.style.upper - r.style.rating) for r in rows]], fmt="s", capsize=3, color="tab:green",
                    label="style-controlled")
        legend = True
    if any(r.online_elo is not None for r in rows):
        ax.plot([r.online_elo for r in rows], y, "x", color="tab:orange", label="online Elo")
        legend = True
    if legend:
        ax.legend(loc="lower right")
    ax.set_yticks(list(y), [r.model for r in rows])
    ax.set_xlabel(f"rating ({int(round(lb.confidence * 100))}% bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    return fig


DEFAULT_DB_HELP = "$VICUNA_HOME/arena.db if set, else $XDG_DATA_HOME/vicuna/arena.db (~/.local/share/vicuna/arena.db)"


def default_db() -> Path:
    """Where votes go when no file is named: the user's data folder, never the working directory.

    Not inside the virtual environment like the model cache: the models can be imported again, the
    votes cannot, and `make clean` removes the environment.  ``$VICUNA_HOME`` moves both.
    """
    if os.environ.get("VICUNA_HOME"):
        return Path(os.environ["VICUNA_HOME"]).expanduser() / "arena.db"
    return Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser() / "vicuna" / "arena.db"
