"""The ASGI edge: typed aliases, a small WebSocket wrapper, HTTP response helpers.

This is the only module that speaks raw ASGI messages; everything above it deals in text
frames, byte frames and close codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from enum import Enum, auto
from typing import Any

from .protocol import CloseCode

__all__ = [
    "ASGIApp",
    "BodyTooLarge",
    "ConnectionClosed",
    "Receive",
    "Scope",
    "Send",
    "WebSocket",
    "read_body",
    "respond",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ConnectionClosed(Exception):
    """The WebSocket is gone: the peer disconnected, or the server could not send to it."""

    def __init__(self, code: int = CloseCode.NORMAL) -> None:
        super().__init__(code)
        self.code = code


class WebSocketState(Enum):
    CONNECTING = auto()
    CONNECTED = auto()
    CLOSED = auto()


class WebSocket:
    """One ASGI WebSocket connection with explicit state.

    Any error from the server's ``send`` ends the connection (:class:`ConnectionClosed`):
    servers raise assorted exceptions while they tear a connection down (Hypercorn's Trio
    worker, for one, can raise ``trio.BusyResourceError``), and none of them is the app's
    business beyond "this peer is gone".
    """

    __slots__ = ("_receive", "_send", "scope", "state", "subprotocol")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.state = WebSocketState.CONNECTING
        self.subprotocol: str | None = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.scope.get("headers", []))

    @property
    def subprotocols(self) -> list[str]:
        return list(self.scope.get("subprotocols", []))

    async def wait_connect(self) -> None:
        """Wait for the handshake's ``websocket.connect``.

        :raises ConnectionClosed: if the client disconnected first
        """
        message = await self._receive()
        if message["type"] != "websocket.connect":
            self.state = WebSocketState.CLOSED
            raise ConnectionClosed(message.get("code", CloseCode.NORMAL))

    async def accept(self, subprotocol: str | None = None) -> None:
        await self._send_message({"type": "websocket.accept", "subprotocol": subprotocol})
        self.state = WebSocketState.CONNECTED
        self.subprotocol = subprotocol

    async def deny(self) -> None:
        """Refuse the handshake: the server answers HTTP 403 and never upgrades."""
        await self._send_message({"type": "websocket.close", "code": CloseCode.NORMAL})
        self.state = WebSocketState.CLOSED

    async def reject(self, status: int, body: bytes, content_type: str) -> None:
        """Refuse the handshake with an HTTP response of our own (the ASGI
        ``websocket.http.response`` extension); servers without it answer 403."""
        if "websocket.http.response" not in self.scope.get("extensions", {}):
            await self.deny()
            return
        await self._send_message(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": _response_headers(body, content_type, [(b"connection", b"close")]),
            }
        )
        await self._send_message({"type": "websocket.http.response.body", "body": body})
        self.state = WebSocketState.CLOSED

    async def receive(self) -> str | bytes:
        """The next data frame's payload.

        :raises ConnectionClosed: when the client disconnects
        """
        message = await self._receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            return text if text is not None else bytes(message.get("bytes") or b"")
        self.state = WebSocketState.CLOSED
        raise ConnectionClosed(message.get("code", CloseCode.NORMAL))

    async def send_text(self, text: str) -> None:
        await self._send_message({"type": "websocket.send", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self._send_message({"type": "websocket.send", "bytes": data})

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send a close frame, once; later calls and calls after a disconnect do nothing."""
        if self.state is WebSocketState.CLOSED:
            return
        self.state = WebSocketState.CLOSED
        with contextlib.suppress(Exception):  # the peer is gone: nobody is left to tell
            await self._send({"type": "websocket.close", "code": int(code), "reason": reason})

    async def _send_message(self, message: Message) -> None:
        if self.state is WebSocketState.CLOSED:
            raise ConnectionClosed()
        try:
            await self._send(message)
        except Exception as exc:
            self.state = WebSocketState.CLOSED
            raise ConnectionClosed(CloseCode.INTERNAL_ERROR) from exc


class BodyTooLarge(Exception):
    """A request body is longer than the caller accepts (reading stopped there)."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """An HTTP request's whole body, refusing more than ``limit`` bytes without reading
    them all into memory.

    :raises BodyTooLarge: past ``limit`` bytes
    :raises ConnectionClosed: if the client disconnected first
    """
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionClosed()
        body += message.get("body", b"")
        if len(body) > limit:
            raise BodyTooLarge(limit)
        if not message.get("more_body", False):
            return bytes(body)


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    *,
    head: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A complete HTTP response, always with ``content-type`` and ``content-length``."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": _response_headers(body, content_type, headers or []),
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


def _response_headers(
    body: bytes, content_type: str, extra: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
