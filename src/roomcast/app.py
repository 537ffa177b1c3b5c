"""The ASGI entry point: lifespan, HTTP routes and WebSocket routes.

``roomcast.app:app`` reads its settings from the environment when the server starts it
(lifespan startup), not at import, so a bad ``ROOMCAST_*`` value fails startup with a
message naming the variable. Long-lived state (settings, hub, metrics registry, static
files) lives in one :class:`Runtime` created in lifespan startup and reaches every request
through the ASGI lifespan ``state``.
"""

from __future__ import annotations

import gc
import logging
import mimetypes
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from importlib import resources
from typing import Final

import anyio
import orjson
from prometheus_client import CollectorRegistry

from . import api, metrics, protocol
from .admission import (
    default_max_connections,
    origin_allowed,
    presented_token,
    query_param,
    token_valid,
)
from .asgi import ConnectionClosed, Receive, Scope, Send, WebSocket, respond
from .brokers import Broker, BrokerUnavailable, open_broker
from .connection import (
    CLOSE_TIMEOUT,
    Credentials,
    serve_binary_echo,
    serve_echo,
    serve_member,
)
from .hub import Hub, NameTaken, RoomFull
from .identity import Identity, TokenRejected, TokenVerifier
from .protocol import BadQuery, CloseCode
from .settings import Settings

__all__ = ["RoomcastApp", "Runtime", "app", "create_app", "open_runtime"]

log = logging.getLogger("roomcast")

STATE_KEY: Final = "roomcast"
BUSY: Final = b"Service Unavailable: too many connections; try again shortly"


@dataclass(eq=False)
class Runtime:
    """Everything that lives from lifespan startup to shutdown."""

    settings: Settings
    hub: Hub
    broker: Broker
    shared_metrics: metrics.SharedMetrics | None = field(init=False)
    registry: CollectorRegistry = field(init=False)
    static: dict[str, tuple[bytes, str]] = field(init=False)
    max_connections: int = field(init=False)
    #: verifies signed tokens (``None`` unless ROOMCAST_JWT_SECRET/_PUBLIC_KEY is set)
    verifier: TokenVerifier | None = field(init=False)
    #: open WebSockets, counted from the handshake
    connections: int = 0
    #: handshakes answered 503 because ``connections`` was at ``max_connections``
    refused: int = 0

    def __post_init__(self) -> None:
        self.max_connections = self.settings.max_connections or default_max_connections()
        self.verifier = _open_verifier(self.settings)
        self.shared_metrics = metrics.open_shared_metrics()
        self.registry = metrics.open_registry(self)
        self.static = _load_static()


@asynccontextmanager
async def open_runtime(settings: Settings | None = None) -> AsyncIterator[Runtime]:
    """Create the runtime (reading the environment if no settings are given); on exit,
    end every membership with :attr:`CloseCode.GOING_AWAY`.

    :raises SettingsError: if a ``ROOMCAST_*`` variable holds an unusable value
    :raises BrokerUnavailable: if the configured Redis cannot be reached
    """
    settings = Settings.from_env() if settings is None else settings
    hub = Hub(
        outbox_size=settings.outbox_size,
        history_size=settings.history_size,
        room_capacity=settings.room_capacity,
        idle_rooms=settings.idle_rooms,
        history_bytes=settings.history_bytes,
        idle_history_bytes=settings.idle_history_bytes,
        presence_interval=settings.presence_interval,
        presence_grace=settings.presence_grace,
        max_text=settings.max_text,
    )
    with gc_threshold(settings.gc_threshold):
        async with open_broker(settings, hub) as broker, anyio.create_task_group() as tg:
            runtime = Runtime(settings, hub, broker)
            _harden_hypercorn(settings)  # after the broker: a failed startup logs one line only
            if runtime.shared_metrics is not None:
                tg.start_soon(_share_metrics, runtime, runtime.shared_metrics)
            try:
                yield runtime
            finally:
                hub.close_all(CloseCode.GOING_AWAY, "server shutting down")
                tg.cancel_scope.cancel()


def _harden_hypercorn(settings: Settings) -> None:
    """Served by Hypercorn (plain ``hypercorn`` or the launcher): mend, once per process,
    what Hypercorn 0.18 breaks of roomcast's guarantees (:mod:`.launcher.hardening`)."""
    if "hypercorn.protocol" in sys.modules:
        from .launcher import hardening

        hardening.install(settings.send_timeout)


async def _share_metrics(runtime: Runtime, shared: metrics.SharedMetrics) -> None:
    """Keep this worker's values in the files every worker's ``/metrics`` merges."""
    while True:
        shared.sync(runtime)
        await anyio.sleep(metrics.SYNC_INTERVAL)


@contextmanager
def gc_threshold(gen0: int) -> Iterator[None]:
    """Raise CPython's gen-0 collection threshold while serving; restore it after.

    A fan-out allocates a few objects per delivery, so at Python's default (a collection
    every 700 net allocations) the cyclic GC runs thousands of times a second, and its
    older-generation passes walk every connection's tasks, frames and streams: in a room of
    1,000 members that was some 40% of the server's CPU (bench/README.md). Only gen-0
    changes: young objects are still collected every ``gen0`` net allocations (a few MB at
    most) and older generations every 10 and 100 of those, so cyclic garbage from closed
    connections is still reclaimed within seconds under load. ``0`` changes nothing.
    """
    if not gen0:
        yield
        return
    saved = gc.get_threshold()
    gc.set_threshold(gen0, *saved[1:])
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def _open_verifier(settings: Settings) -> TokenVerifier | None:
    if not settings.signed_tokens:
        return None
    return TokenVerifier(
        secret=settings.jwt_secret,
        public_key=settings.jwt_public_key,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )


def _load_static() -> dict[str, tuple[bytes, str]]:
    files = {}
    for entry in resources.files("roomcast").joinpath("static").iterdir():
        if entry.is_file():
            content_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if content_type.startswith("text/") or content_type.endswith("javascript"):
                content_type += "; charset=utf-8"
            files[entry.name] = (entry.read_bytes(), content_type)
    return files


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


async def _echo(runtime: Runtime, ws: WebSocket, identity: Identity | None) -> None:
    await serve_echo(ws)


async def _binary(runtime: Runtime, ws: WebSocket, identity: Identity | None) -> None:
    await serve_binary_echo(ws)


WEBSOCKET_ROUTES: Final[dict[str, Endpoint]] = {
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
    await ws.accept(protocol.BATCH_SUBPROTOCOL if offered and endpoint is _chat else None)
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
