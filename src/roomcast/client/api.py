"""The server API from Python (SPEC §8.2), on anyio and httpx: publish from a backend or a
background job, read history, presence and rooms, disconnect a user.

::

    async with open_server_api("http://127.0.0.1:8000", key) as api:
        seq = await api.publish("lobby", "deploy finished", sender="ci")
        page = await api.history("lobby", since=seq - 10)
        earlier = await api.scrollback("lobby", before=page.messages[0].seq)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import orjson

from .events import Message, Scrollback, parse_event

__all__ = ["ApiRefused", "HistoryPage", "ServerAPI", "open_server_api"]

TIMEOUT = 10.0


class ApiRefused(Exception):
    """The server refused the request: HTTP ``status``, and its ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class HistoryPage:
    room: str
    epoch: str | None
    seq: int  # the room's latest
    first: int  # the first seq still retained
    messages: list[Message]


class ServerAPI:
    """A connection to one server's API. Use :func:`open_server_api`."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def publish(
        self, room: str, text: str, *, sender: str | None = None, id: str | None = None
    ) -> int:
        """Publish ``text`` into ``room`` as ``sender``; returns its seq.

        :raises ApiRefused: if the server refused it (401 key, 413 too long, 503 ...)
        """
        body: dict[str, Any] = {"text": text}
        if sender is not None:
            body["from"] = sender
        if id is not None:
            body["id"] = id
        data = await self._request("POST", f"rooms/{quote(room)}/messages", json=body)
        return int(data["seq"])

    async def history(self, room: str, *, since: int = 0, limit: int = 100) -> HistoryPage:
        """Up to ``limit`` retained messages after ``since``, oldest first."""
        params = {"since": since, "limit": limit}
        data = await self._request("GET", f"rooms/{quote(room)}/history", params=params)
        messages = [  # each keeps the API's JSON in ``raw``, as events from a room do
            event
            for raw in data["messages"]
            if isinstance(event := parse_event(raw, orjson.dumps(raw).decode()), Message)
        ]
        return HistoryPage(data["room"], data["epoch"], data["seq"], data["first"], messages)

    async def scrollback(self, room: str, *, before: int, limit: int = 50) -> Scrollback:
        """Up to ``limit`` (1-200) messages before seq ``before``, in seq order (a
        ``before`` past the room's latest seq gives the newest); ``more`` says whether
        earlier ones exist: page on with ``before=page.messages[0].seq``."""
        params = {"before": before, "limit": limit}
        data = await self._request("GET", f"rooms/{quote(room)}/history", params=params)
        page = parse_event({"type": "history", **data}, orjson.dumps(data).decode())
        if not isinstance(page, Scrollback):
            raise ApiRefused(200, "bad_response", f"not a page of history: {data!r:.200}")
        return page

    async def presence(self, room: str) -> list[dict[str, str | None]]:
        """The room's members: ``{"user", "name"}`` each."""
        data = await self._request("GET", f"rooms/{quote(room)}/presence")
        members: list[dict[str, str | None]] = data["members"]
        return members

    async def rooms(self) -> dict[str, int]:
        """Rooms with members, and how many."""
        data = await self._request("GET", "rooms")
        return {room["name"]: room["count"] for room in data["rooms"]}

    async def disconnect_user(self, user: str) -> int:
        """Close every connection of the verified ``user`` (4001 "disconnected by the
        server") on every worker and server; returns how many were closed. Not a ban: the
        user may connect again with a valid token.

        :raises ApiRefused: if the server refused it (400 bad user id, 401 key, 503 ...)
        """
        data = await self._request("POST", f"users/{quote(user, safe='')}/disconnect")
        return int(data["closed"])

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._http.request(method, path, **kwargs)
        if response.is_success:
            return response.json()
        try:
            error = response.json()
            code, message = error["error"], error["message"]
        except (ValueError, KeyError, TypeError):
            code, message = _plain_refusal(response)
        raise ApiRefused(response.status_code, code, message)


def _plain_refusal(response: httpx.Response) -> tuple[str, str]:
    """``(code, message)`` for an answer that is not the API's JSON error. A plain 404 is
    what a roomcast server answers under ``/api/`` while its API is off (with the API on,
    even an unknown endpoint gets a JSON ``not_found``), or what another app answers when
    the URL misses the mount prefix: say how to fix either rather than "Not Found"."""
    if response.status_code == 404:
        api = str(response.url.copy_with(query=None))
        return "api_off", (
            f"no server API at {api}: the server answers /api/ only when it was started with "
            "ROOMCAST_API_KEY set (and the URL must include the prefix roomcast is mounted at)"
        )
    return "http_error", response.reason_phrase or response.text[:200]


@asynccontextmanager
async def open_server_api(url: str, key: str) -> AsyncIterator[ServerAPI]:
    """The API of the server at ``url`` (``http(s)://host:port``, with its mount prefix
    if it has one; ``ws://`` works too), authenticated with ``key``."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {url!r}")
    base = urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/api/", "", ""))
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=TIMEOUT) as http:
        yield ServerAPI(http)
