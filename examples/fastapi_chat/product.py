"""A FastAPI product with roomcast's chat inside it, and the product's own rules in hooks:

- ``POST /login`` checks a password and sets the product's session cookie (signed with
  the product's secret); the ``connect`` hook turns that cookie into the chat identity,
  so chat needs no token of its own;
- the ``message`` hook moderates: a banned word is refused (the sender gets ``error``
  ``banned_word``), ``:)`` becomes 🙂 for everyone (the original kept in ``data``);
- the ``stored`` hook copies every message into the product's SQLite table, with full-text
  search (FTS5) behind ``GET /search?q=``.

Run it (from this folder): ``roomcast --app product:app`` (or ``uvicorn product:app``),
then log in and open ``/chat/``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel

import roomcast
from roomcast import ConnectRequest, Identity, MessageRequest, Refuse, Rewrite, StoredMessage

#: the product's users (a real product has a users table and password hashes)
USERS = {"ann": ("Ann", "ann-password"), "bo": ("Bo", "bo-password")}
BANNED_WORDS = ("spam", "scam")
SESSION_COOKIE = "session"
SESSION_SECONDS = 8 * 3600

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL, epoch TEXT NOT NULL, seq INTEGER NOT NULL,
    user TEXT, name TEXT, text TEXT NOT NULL, ts INTEGER NOT NULL,
    PRIMARY KEY (room, epoch, seq)
);
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(
    text, content='messages', content_rowid='rowid'
);
CREATE TRIGGER IF NOT EXISTS messages_indexed AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, text) VALUES (new.rowid, new.text);
END;
"""


# -- sessions: the product's own, a signed cookie -----------------------------------------


def make_session(secret: str, user: str, now: float | None = None) -> str:
    """``user.expiry.signature``: the product's session cookie."""
    expires = int((time.time() if now is None else now) + SESSION_SECONDS)
    payload = f"{user}.{expires}"
    return f"{payload}.{_mac(secret, payload)}"


def read_session(secret: str, cookie: str | None) -> tuple[str, int] | None:
    """The user and expiry of a valid, unexpired session cookie; else ``None``."""
    if not cookie or cookie.count(".") != 2:
        return None
    user, expires, signature = cookie.split(".")
    if not hmac.compare_digest(_mac(secret, f"{user}.{expires}"), signature):
        return None
    if not expires.isdigit() or int(expires) < time.time() or user not in USERS:
        return None
    return user, int(expires)


def _mac(secret: str, payload: str) -> str:
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


# -- the product's message table ---------------------------------------------------------


class Archive:
    """The product's copy of every chat message, searchable. SQLite calls run in a
    worker thread: the event loop serves chat meanwhile."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = anyio.Lock()  # one writer or reader at a time on the one connection
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "the archive is opened by the app's lifespan"
        return self._db

    def open(self) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.executescript(SCHEMA)

    async def add(self, batch: Sequence[StoredMessage]) -> None:
        """Insert by ``(room, epoch, seq)``: a message seen twice is kept once."""
        rows = [(m.room, m.epoch, m.seq, m.user, m.name, m.text, m.ts) for m in batch]
        async with self.lock:
            await anyio.to_thread.run_sync(self._insert, rows)

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    async def search(self, query: str, limit: int = 50) -> list[dict[str, Any]]:
        async with self.lock:
            return await anyio.to_thread.run_sync(self._search, query, limit)

    def _search(self, query: str, limit: int) -> list[dict[str, Any]]:
        phrase = '"' + query.replace('"', '""') + '"'  # the words as typed, not FTS syntax
        rows = self.db.execute(
            "SELECT m.room, m.seq, m.name, m.text, m.ts FROM messages_fts"
            " JOIN messages m ON m.rowid = messages_fts.rowid"
            " WHERE messages_fts MATCH ? ORDER BY m.ts DESC LIMIT ?",
            (phrase, limit),
        ).fetchall()
        return [dict(zip(("room", "seq", "name", "text", "ts"), row, strict=True)) for row in rows]

    def close(self) -> None:
        self.db.close()


# -- the hooks ---------------------------------------------------------------------------


def chat_hooks(secret: str, archive: Archive) -> roomcast.Hooks:
    hooks = roomcast.Hooks()

    @hooks.connect
    async def connect(request: ConnectRequest) -> Identity | Refuse:
        session = read_session(secret, request.cookies.get(SESSION_COOKIE))
        if session is None:
            return Refuse(4001, "log in first")
        user, expires = session
        return Identity(user, USERS[user][0], rooms=None, expires=expires)

    @hooks.message
    async def moderate(message: MessageRequest) -> Rewrite | Refuse | None:
        if any(word in message.text.lower() for word in BANNED_WORDS):
            return Refuse("banned_word", "mind your language")
        if ":)" in message.text:
            return Rewrite(message.text.replace(":)", "🙂"), {"original": message.text})
        return None

    @hooks.stored
    async def keep(message: StoredMessage) -> None:
        await archive.add([message])

    return hooks


# -- the product -------------------------------------------------------------------------


class Login(BaseModel):
    user: str
    password: str


def create_product(
    *, database: str = "product.db", secret: str, chat_settings: roomcast.Settings | None = None
) -> FastAPI:
    """The product: its routes, its database, and roomcast mounted at ``/chat``."""
    archive = Archive(database)
    chat = roomcast.create_app(chat_settings, hooks=chat_hooks(secret, archive))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        archive.open()
        try:
            async with chat.lifespan(app) as state:  # roomcast's lifespan in the host's
                yield state
        finally:
            archive.close()

    app = FastAPI(lifespan=lifespan)

    @app.post("/login")
    async def login(form: Login, response: Response) -> dict[str, str]:
        known = USERS.get(form.user)
        if known is None or not hmac.compare_digest(known[1], form.password):
            raise HTTPException(401, "wrong user or password")
        cookie = make_session(secret, form.user)
        response.set_cookie(SESSION_COOKIE, cookie, max_age=SESSION_SECONDS, httponly=True)
        return {"user": form.user, "name": known[0]}

    @app.get("/search")
    async def search(q: str) -> list[dict[str, Any]]:
        return await archive.search(q)

    app.mount("/chat", chat)
    return app


def _app_from_environment() -> FastAPI:
    database = os.environ.get("PRODUCT_DATABASE", str(Path(__file__).with_name("product.db")))
    return create_product(database=database, secret=os.environ.get("PRODUCT_SECRET", "dev-only"))


app = _app_from_environment()
