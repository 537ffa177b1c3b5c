"""An in-process ASGI harness: drives the app through its ASGI interface, no sockets.

Runs on whichever anyio backend the test uses. The app's ``send`` goes into a bounded
memory stream per connection, so a test client that stops reading makes the app's
``send`` block exactly as a stalled socket would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import orjson
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from roomcast.asgi import ASGIApp
from roomcast.runtime import STATE_KEY, Runtime

Message = MutableMapping[str, Any]
T = TypeVar("T")


class Denied(Exception):
    """The app refused the handshake (a server answers HTTP 403)."""


class Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@dataclass
class HTTPResponse:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(eq=False)
class WebSocketClient:
    to_app: MemoryObjectSendStream[Message]
    from_app: MemoryObjectReceiveStream[Message]
    subprotocol: str | None = None
    close: tuple[int, str] | None = field(default=None)

    async def receive(self) -> str | bytes:
        """The next frame the app sent.

        :raises Closed: with the code and reason when the app closed the connection
        """
        message = await self.from_app.receive()
        if message["type"] == "websocket.close":
            self.close = (message.get("code", 1000), message.get("reason", ""))
            raise Closed(*self.close)
        assert message["type"] == "websocket.send", message
        text = message.get("text")
        return text if text is not None else message["bytes"]

    async def receive_json(self) -> Any:
        frame = await self.receive()
        assert isinstance(frame, str)
        return orjson.loads(frame)

    async def receive_until(self, type_: str) -> Any:
        while True:
            event = await self.receive_json()
            if event["type"] == type_:
                return event

    async def send_text(self, text: str) -> None:
        await self.to_app.send({"type": "websocket.receive", "text": text})

    async def send_json(self, data: Any) -> None:
        await self.send_text(orjson.dumps(data).decode())

    async def send_bytes(self, data: bytes) -> None:
        await self.to_app.send({"type": "websocket.receive", "bytes": data})

    async def disconnect(self, code: int = 1006) -> None:
        await self.to_app.send({"type": "websocket.disconnect", "code": code})

    async def expect_close(self) -> tuple[int, str]:
        """Read (and discard) frames until the app closes; return (code, reason)."""
        while True:
            try:
                await self.receive()
            except Closed as closed:
                return closed.code, closed.reason


@dataclass
class ASGIClient:
    app: ASGIApp
    state: MutableMapping[str, Any]
    tg: TaskGroup

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.state[STATE_KEY]
        return runtime

    async def get(self, path: str, method: str = "GET") -> HTTPResponse:
        path, _, query = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": [(b"host", b"testserver")],
            "state": dict(self.state),
        }
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
        headers = {k.decode(): v.decode() for k, v in start["headers"]}
        return HTTPResponse(start["status"], headers, body)

    @asynccontextmanager
    async def websocket(
        self,
        path: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        subprotocols: list[str] | None = None,
        buffer: int = 10_000,
    ) -> AsyncIterator[WebSocketClient]:
        """Open a WebSocket to the app; ``buffer`` bounds the frames the app can send
        before its ``send`` blocks (a small buffer and no reads make a stalled client).

        :raises Denied: if the app refused the handshake (a close after accept is read
            from the client, with :meth:`WebSocketClient.receive`)
        """
        path, _, query = path.partition("?")
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "scheme": "ws",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "headers": [(b"host", b"testserver"), *(headers or [])],
            "subprotocols": subprotocols or [],
            "state": dict(self.state),
        }
        to_app_send, to_app_receive = anyio.create_memory_object_stream[Message](16)
        from_app_send, from_app_receive = anyio.create_memory_object_stream[Message](buffer)
        finished = anyio.Event()

        async def run_app() -> None:
            try:
                async with from_app_send:
                    await self.app(scope, to_app_receive.receive, from_app_send.send)
            finally:
                finished.set()

        self.tg.start_soon(run_app)
        await to_app_send.send({"type": "websocket.connect"})
        first = await from_app_receive.receive()
        if first["type"] == "websocket.close":
            await finished.wait()
            raise Denied()
        assert first["type"] == "websocket.accept", first
        client = WebSocketClient(to_app_send, from_app_receive, first.get("subprotocol"))
        try:
            yield client
        finally:
            if not finished.is_set():
                with anyio.move_on_after(5, shield=True):
                    await to_app_send.send({"type": "websocket.disconnect", "code": 1000})
                    async for _ in from_app_receive:  # let a blocked send finish
                        pass
                    await finished.wait()


@asynccontextmanager
async def open_asgi_client(app: ASGIApp) -> AsyncIterator[ASGIClient]:
    """Run the app's lifespan around the block and yield a client for it."""
    state: dict[str, Any] = {}
    to_app_send, to_app_receive = anyio.create_memory_object_stream[Message](4)
    from_app_send, from_app_receive = anyio.create_memory_object_stream[Message](4)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    failure = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(app, scope, to_app_receive.receive, from_app_send.send)
        await to_app_send.send({"type": "lifespan.startup"})
        started = await from_app_receive.receive()
        if started["type"] != "lifespan.startup.complete":
            failure = started.get("message", "startup failed")
        else:
            try:
                yield ASGIClient(app, state, tg)
            finally:
                with anyio.move_on_after(5, shield=True):
                    await to_app_send.send({"type": "lifespan.shutdown"})
                    assert (await from_app_receive.receive())[
                        "type"
                    ] == "lifespan.shutdown.complete"
    if failure is not None:
        raise RuntimeError(failure)


async def loop_passes_during(work: Awaitable[T]) -> tuple[T, int]:
    """Await ``work`` while another task counts the passes the event loop gives it:
    ``(work's result, passes)``. A long synchronous stretch in ``work`` shows as few."""
    passes = 0

    async def the_rest_of_the_server() -> None:
        nonlocal passes
        while True:
            await anyio.lowlevel.checkpoint()
            passes += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(the_rest_of_the_server)
        await anyio.lowlevel.checkpoint()
        before = passes
        result = await work
        tg.cancel_scope.cancel()
    return result, passes - before
