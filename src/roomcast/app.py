"""The ASGI entry point: lifespan, HTTP routes and WebSocket routes.

``roomcast.app:app`` reads its settings from the environment when the server starts it
(lifespan startup), not at import, so a bad ``ROOMCAST_*`` value fails startup with a
message naming the variable. Long-lived state (settings, hub, metrics registry, static
files) lives in one :class:`~.runtime.Runtime` created in lifespan startup
(:func:`~.runtime.open_runtime`) and reaches every request through the ASGI lifespan
``state``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import Final

import anyio
import orjson

from . import api, metrics, protocol
from .admission import (
    origin_allowed,
    presented_token,
    query_param,
    token_valid,
)
from .asgi import ConnectionClosed, Receive, Scope, Send, WebSocket, respond
from .brokers import BrokerUnavailable
from .connection import (
    CLOSE_TIMEOUT,
    Credentials,
    serve_binary_echo,
    serve_echo,
    serve_member,
)
from .hub import NameTaken, RoomFull
from .identity import Identity, TokenRejected
from .multiroom import serve_rooms
from .protocol import BadQuery, CloseCode
from .runtime import STATE_KEY, Runtime, open_runtime
from .settings import Settings

__all__ = ["RoomcastApp", "app", "create_app"]

log = logging.getLogger("roomcast")

BUSY: Final = b"Service Unavailable: too many connections; try again shortly"


class RoomcastApp:
    """The roomcast ASGI application. Use :func:`create_app` to build one."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        runtime = scope.get("state", {}).get(STATE_KEY)
        if runtime is None:
            raise RuntimeError(
                "roomcast needs an ASGI server that runs the lifespan protocol; mounted in "
                "another app, give that app roomcast's: Starlette(lifespan=chat.lifespan)"
            )
        if kind == "http":
            await _http(runtime, scope, receive, send)
        elif kind == "websocket":
            await _websocket(runtime, WebSocket(scope, receive, send))

    @asynccontextmanager
    async def lifespan(self, host: object) -> AsyncIterator[dict[str, Runtime]]:
        """roomcast's lifespan for an app that mounts it (Starlette, FastAPI)::

            chat = roomcast.create_app()
            app = FastAPI(lifespan=chat.lifespan)
            app.mount("/chat", chat)

        Frameworks do not run a mounted app's own lifespan; this runs it in the host's,
        and the state it yields reaches every request to the mount.
        """
        async with open_runtime(self._settings) as runtime:
            yield {STATE_KEY: runtime}

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with AsyncExitStack() as stack:
            try:
                if "state" not in scope:
                    raise RuntimeError("the ASGI server does not support lifespan state")
                runtime = await stack.enter_async_context(open_runtime(self._settings))
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": _reason(exc)})
                return
            scope["state"][STATE_KEY] = runtime
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})


def _reason(exc: BaseException) -> str:
    """What went wrong, in words: task groups wrap the errors that end them, and "1
    sub-exception" names no cause."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_reason(inner) for inner in exc.exceptions)
    return str(exc) or type(exc).__name__


def create_app(settings: Settings | None = None) -> RoomcastApp:
    """An app with explicit settings; ``None`` reads ``ROOMCAST_*`` at startup."""
    return RoomcastApp(settings)


app: Final = create_app()

# -- HTTP -----------------------------------------------------------------------------------


def route_path(scope: Scope) -> str:
    """The request's path below this app's mount point (``root_path``): Starlette's
    ``Mount`` and Hypercorn's ``root_path`` both leave the full path in ``path``."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


async def _http(runtime: Runtime, scope: Scope, receive: Receive, send: Send) -> None:
    path = route_path(scope)
    method: str = scope["method"]
    if path.startswith(api.PREFIX) or path == "/api":
        with suppress(ConnectionClosed):
            await api.handle(runtime, path, scope, receive, send)
        return
    if not path:  # the mount point itself: the page's relative links need its slash
        location = (scope.get("root_path", "") + "/").encode()
        await respond(send, 308, b"", "text/plain", headers=[(b"location", location)])
        return
    if path in WEBSOCKET_ROUTES:
        await _upgrade_required(scope, send, head=method == "HEAD")
        return
    if path == "/":
        path = "/static/index.html"
    known = path in ("/healthz", "/metrics") or path.removeprefix("/static/") in runtime.static
    if not known:
        await respond(send, 404, b"Not Found", "text/plain; charset=utf-8")
    elif method not in ("GET", "HEAD"):
        await respond(
            send,
            405,
            b"Method Not Allowed",
            "text/plain; charset=utf-8",
            headers=[(b"allow", b"GET, HEAD")],
        )
    else:
        body, content_type, status = _get(runtime, path)
        await respond(send, status, body, content_type, head=method == "HEAD")


async def _upgrade_required(scope: Scope, send: Send, *, head: bool) -> None:
    """A WebSocket endpoint asked for over plain HTTP (a browser's address bar, curl):
    426 with ``Upgrade: websocket`` (RFC 9110 §15.5.22) and a line saying so, where a
    bare 404 would suggest a wrong path."""
    body = f"Upgrade Required: {scope['path']} is a WebSocket endpoint; connect with ws://\n"
    await respond(
        send,
        426,
        body.encode(),
        "text/plain; charset=utf-8",
        head=head,
        headers=[(b"upgrade", b"websocket")],
    )


def _get(runtime: Runtime, path: str) -> tuple[bytes, str, int]:
    if path == "/healthz":
        broker = runtime.broker
        status, code = ("ok", 200) if broker.healthy else ("unavailable", 503)
        return orjson.dumps({"status": status, "broker": broker.name}), "application/json", code
    if path == "/metrics":
        return metrics.render(runtime), metrics.CONTENT_TYPE, 200
    body, content_type = runtime.static[path.removeprefix("/static/")]
    return body, content_type, 200


# -- WebSockets -----------------------------------------------------------------------------

Endpoint = Callable[[Runtime, WebSocket, "Identity | None"], Awaitable[None]]


async def _chat(runtime: Runtime, ws: WebSocket, identity: Identity | None) -> None:
    try:
        query = protocol.parse_chat_query(ws.scope.get("query_string", b""))
        name = identity.name if identity is not None else query.name
    except BadQuery as exc:
        await ws.close(CloseCode.BAD_REQUEST, exc.message)
        return
    if identity is not None and not identity.may_enter(query.room):
        await ws.close(CloseCode.FORBIDDEN, f"not allowed in #{query.room}")
        return
    user = None if identity is None else identity.user
    try:
        member = await runtime.broker.join(
            query.room, name, since=query.since, epoch=query.epoch, user=user
        )
    except NameTaken:
        await ws.close(CloseCode.BAD_REQUEST, f"the name {name} is taken in #{query.room}")
        return
    except RoomFull:
        await ws.close(CloseCode.ROOM_FULL, "room full")
        return
    except BrokerUnavailable:
        await ws.close(CloseCode.INTERNAL_ERROR, "chat service unavailable; try again shortly")
        return
    batch = ws.subprotocol == protocol.BATCH_SUBPROTOCOL
    credentials = None
    if identity is not None and runtime.verifier is not None:
        credentials = Credentials(runtime.verifier, identity)
    await serve_member(
        ws, runtime.broker, member, runtime.settings, batch=batch, credentials=credentials
    )


async def _rooms(runtime: Runtime, ws: WebSocket, identity: Identity | None) -> None:
    """``/ws``: protocol v2, a connection in no room until it joins some (SPEC §9)."""
    name = None
    if identity is not None:
        name = identity.name
    else:
        try:
            name = protocol.parse_chat_query(ws.scope.get("query_string", b"")).name
        except BadQuery as exc:
            await ws.close(CloseCode.BAD_REQUEST, exc.message)
            return
    credentials = None
    if identity is not None and runtime.verifier is not None:
        credentials = Credentials(runtime.verifier, identity)
    batch = ws.subprotocol == protocol.BATCH_SUBPROTOCOL
    await serve_rooms(
        ws, runtime.broker, runtime.settings, name=name, batch=batch, credentials=credentials
    )


async def _echo(runtime: Runtime, ws: WebSocket, identity: Identity | None) -> None:
    await serve_echo(ws)


async def _binary(runtime: Runtime, ws: WebSocket, identity: Identity | None) -> None:
    await serve_binary_echo(ws)


WEBSOCKET_ROUTES: Final[dict[str, Endpoint]] = {
    "/ws": _rooms,
    "/ws/chat": _chat,
    "/ws/echo": _echo,
    "/ws/binary": _binary,
}


async def _websocket(runtime: Runtime, ws: WebSocket) -> None:
    if runtime.connections >= runtime.max_connections:
        await _refuse_busy(runtime, ws)
        return
    runtime.connections += 1
    try:
        await _admit(runtime, ws)
    except ConnectionClosed:
        pass
    except anyio.get_cancelled_exc_class():
        # Servers cancel handlers when they shut down: say so, briefly, then go.
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await ws.close(CloseCode.GOING_AWAY, "server shutting down")
        raise
    finally:
        runtime.connections -= 1


async def _admit(runtime: Runtime, ws: WebSocket) -> None:
    settings = runtime.settings
    path = route_path(ws.scope)
    await ws.wait_connect()
    if not origin_allowed(settings, ws.headers):
        await ws.deny()
        return
    endpoint = WEBSOCKET_ROUTES.get(path)
    offered = protocol.BATCH_SUBPROTOCOL in ws.subprotocols
    batching = endpoint is _chat or endpoint is _rooms
    await ws.accept(protocol.BATCH_SUBPROTOCOL if offered and batching else None)
    if endpoint is None:
        unknown = ws.scope["path"]
        await ws.close(CloseCode.UNKNOWN_PATH, f"no WebSocket endpoint at {unknown[:80]}")
        return
    try:
        identity = _identify(runtime, ws)
    except TokenRejected as rejected:
        await ws.close(CloseCode.UNAUTHORIZED, rejected.reason)
        return
    if identity is None:
        await endpoint(runtime, ws, None)
        return
    broker = runtime.broker
    try:
        claim = await broker.claim_connection(identity.user, settings.max_connections_per_user)
    except BrokerUnavailable:
        await ws.close(CloseCode.INTERNAL_ERROR, "chat service unavailable; try again shortly")
        return
    if claim is None:
        await ws.close(CloseCode.TOO_MANY_CONNECTIONS, "too many connections for this user")
        return
    try:
        await endpoint(runtime, ws, identity)
    finally:
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await broker.release_connection(claim)


def _identify(runtime: Runtime, ws: WebSocket) -> Identity | None:
    """Who the client is: a verified identity with signed tokens, ``None`` otherwise.

    :raises TokenRejected: for a token that is refused (with the reason for the 4001)
    """
    token = presented_token(ws.headers, query_param(ws.scope.get("query_string", b""), "token"))
    if runtime.verifier is not None:
        return runtime.verifier.verify(token)
    if not token_valid(runtime.settings, token):
        raise TokenRejected("missing or invalid token")
    return None


async def _refuse_busy(runtime: Runtime, ws: WebSocket) -> None:
    """Answer a handshake beyond ``ROOMCAST_MAX_CONNECTIONS`` with 503, never upgraded."""
    runtime.refused += 1
    with suppress(ConnectionClosed):
        await ws.wait_connect()
        await ws.reject(503, BUSY, "text/plain; charset=utf-8")
