"""A webhook receiver for a standalone roomcast server: the application's rules over HTTP.

Run roomcast with the receiver's URL and a shared secret, and the receiver with the same
secret (from this folder; Hypercorn comes with roomcast, uvicorn works the same way)::

    ROOMCAST_WEBHOOK_SECRET=change-me hypercorn webhook_receiver:app --bind 127.0.0.1:9000
    ROOMCAST_WEBHOOK_URL=http://127.0.0.1:9000/roomcast \\
        ROOMCAST_WEBHOOK_SECRET=change-me roomcast

Every request is checked with :func:`roomcast.webhooks.verify` before anything else: a
request without roomcast's signature, or one replayed more than five minutes later, is
answered 401 (roomcast would take that as a failure, but roomcast never sends one).
What each event may answer is in docs/protocol.md, "Webhooks".
"""

from __future__ import annotations

import json
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from roomcast.webhooks import verify

Event = dict[str, Any]
Answer = dict[str, Any]

#: who a session cookie belongs to (a real app asks its session store)
SESSIONS = {"s3cr3t-ann": ("ann", "Ann"), "s3cr3t-bo": ("bo", "Bo")}
BANNED_WORDS = ("spam",)


async def connect(event: Event) -> Answer:
    """A known session cookie logs in; anyone else is refused with 4001."""
    session = _cookie(event["headers"].get("cookie", ""), "session")
    if session not in SESSIONS:
        return {"refuse": {"code": 4001, "reason": "log in first"}}
    user, name = SESSIONS[session]
    return {"user": user, "name": name, "rooms": None, "exp": None}


async def message(event: Event) -> Answer:
    """Moderation: banned words are refused; ``:)`` becomes 🙂 (the original kept in data)."""
    text: str = event["text"]
    if any(word in text.lower() for word in BANNED_WORDS):
        return {"refuse": {"code": "banned_word", "reason": "mind your language"}}
    if ":)" in text:
        return {"text": text.replace(":)", "🙂"), "data": {"original": text}}
    return {}


def build(secret: str) -> Starlette:
    """The receiver, checking signatures made with ``secret``; stored messages are kept
    in ``app.state.stored`` (a real app writes them to its database, keyed by
    ``(room, epoch, seq)``: a retried post may arrive twice)."""
    if not secret:
        raise ValueError("the webhook secret must not be empty")
    stored: list[Event] = []

    async def webhook(request: Request) -> JSONResponse:
        body = await request.body()  # the raw bytes: the signature is over them
        headers = request.headers
        if not verify(
            secret, headers.get("roomcast-timestamp"), body, headers.get("roomcast-signature")
        ):
            return JSONResponse({"error": "bad signature"}, status_code=401)
        event: Event = json.loads(body)
        if event["event"] == "connect":
            return JSONResponse(await connect(event))
        if event["event"] == "message":
            return JSONResponse(await message(event))
        if event["event"] == "stored":
            stored.append(event)
        return JSONResponse({})  # join: let everyone in; stored, leave: observed

    app = Starlette(routes=[Route("/roomcast", webhook, methods=["POST"])])
    app.state.stored = stored
    return app


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


app = build(os.environ["ROOMCAST_WEBHOOK_SECRET"])
