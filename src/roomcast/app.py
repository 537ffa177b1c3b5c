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
from functools import partial
from typing import Final
from urllib.parse import parse_qsl

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
from .hooks import (
    HOOK_UNAVAILABLE,
    ConnectRequest,
    HookCalls,
    HookFailed,
    Hooks,
    JoinRequest,
    PythonHooks,
    Refuse,
)
from .hub import NameTaken, RoomFull
from .identity import Identity, TokenRejected
from .multiroom import serve_rooms
from .protocol import BadQuery, CloseCode, ErrorCode
from .runtime import STATE_KEY, Runtime, open_runtime
from .scrollback import scrollback
from .settings import Settings

__all__ = ["RoomcastApp", "app", "create_app"]

log = logging.getLogger("roomcast")

BUSY: Final = b"Service Unavailable: too many connections; try again shortly"


class RoomcastApp:
    """The roomcast ASGI application. Use :func:`create_app` to build one."""

    def __init__(self, settings: Settings | None = None, hooks: HookCalls | None = None) -> None:
        self._settings = settings
        self._hooks = hooks

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
        async with open_runtime(self._settings, self._hooks) as runtime:
            yield {STATE_KEY: runtime}

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        async with AsyncExitStack() as stack:
            try:
                if "state" not in scope:
                    raise RuntimeError("the ASGI server does not support lifespan state")
                runtime = await stack.enter_async_context(open_runtime(self._settings, self._hooks))
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


def create_app(
    settings: Settings | None = None, *, hooks: Hooks | HookCalls | None = None
) -> RoomcastApp:
    """An app with explicit settings (``None`` reads ``ROOMCAST_*`` at startup) and the
    application's ``hooks`` (SPEC §10), if any."""
    calls = PythonHooks(hooks) if isinstance(hooks, Hooks) else hooks
    return RoomcastApp(settings, calls)


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
    if not await _join_allowed(runtime, ws, identity, query.room, name):
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
    credentials = None if identity is None else Credentials(runtime.verifier, identity)
    await serve_member(
        ws,
        runtime.broker,
        member,
        runtime.settings,
        batch=batch,
        credentials=credentials,
        hooks=runtime.hooks,
    )


async def _join_allowed(
    runtime: Runtime, ws: WebSocket, identity: Identity | None, room: str, name: str | None
) -> bool:
    """The ``join`` hook's word on a v1 connection's one room: a refusal closes 4403 with
    its reason; a hook that failed closes it as an unreachable broker would (1011)."""
    hooks = runtime.hooks
    if hooks is None or "join" not in hooks.present:
        return True
    user = None if identity is None else identity.user
    try:
        refusal = await hooks.join(JoinRequest(user, name, room))
    except HookFailed:
        await _unavailable(ws)
        return False
    if refusal is not None:
        await ws.close(CloseCode.FORBIDDEN, refusal.reason or f"not allowed in #{room}")
        return False
    return True


async def _unavailable(ws: WebSocket) -> None:
    """Fail closed before a connection is served: an ``unavailable`` error saying why,
    then 1011, as when the broker cannot be reached."""
    await ws.send_text(protocol.encode_error(ErrorCode.UNAVAILABLE, HOOK_UNAVAILABLE))
    await ws.close(CloseCode.INTERNAL_ERROR, "chat service unavailable; try again shortly")


async def _rooms(runtime: Runtime, ws: WebSocket, identity: Identity | None) -> None:
    """``/ws``: protocol v2, a connection in no room until it joins some (SPEC §9)."""
    name = None
    if identity is not None:
        name = identity.name
    else:
        try:
            name = protocol.parse_rooms_name(ws.scope.get("query_string", b""))
        except BadQuery as exc:
            await ws.close(CloseCode.BAD_REQUEST, exc.message)
            return
    credentials = None if identity is None else Credentials(runtime.verifier, identity)
    batch = ws.subprotocol == protocol.BATCH_SUBPROTOCOL
    await serve_rooms(
        ws,
        runtime.broker,
        runtime.settings,
        name=name,
        batch=batch,
        credentials=credentials,
        hooks=runtime.hooks,
        pages=partial(scrollback, runtime),
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
        identity = await _identify(runtime, ws)
    except TokenRejected as rejected:
        await ws.close(CloseCode.UNAUTHORIZED, rejected.reason)
        return
    except ConnectRefused as refused:
        await ws.close(refused.code, refused.reason)
        return
    except HookFailed:
        await _unavailable(ws)
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
        with claim.revoked:
            await endpoint(runtime, ws, identity)
        if claim.revoked.cancelled_caught:  # (the broker let the claim go already)
            await ws.close(CloseCode.TOO_MANY_CONNECTIONS, "too many connections for this user")
    finally:
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await broker.release_connection(claim)


class ConnectRefused(Exception):
    """The ``connect`` hook refused the client: close with its ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


async def _identify(runtime: Runtime, ws: WebSocket) -> Identity | None:
    """Who the client is: what the ``connect`` hook says, else a verified identity with
    signed tokens, else ``None``.

    :raises TokenRejected: for a token that is refused (with the reason for the 4001)
    :raises ConnectRefused: if the ``connect`` hook refused the client
    :raises HookFailed: if the ``connect`` hook failed (fail closed)
    """
    hooks = runtime.hooks
    if hooks is not None and "connect" in hooks.present:
        answer = await hooks.connect(connect_request(ws.scope))
        if isinstance(answer, Refuse):
            assert isinstance(answer.code, int)  # (the runner checked it)
            raise ConnectRefused(answer.code, answer.reason)
        if answer is not None:
            return answer
    token = presented_token(ws.headers, query_param(ws.scope.get("query_string", b""), "token"))
    if runtime.verifier is not None:
        return runtime.verifier.verify(token)
    if not token_valid(runtime.settings, token):
        raise TokenRejected("missing or invalid token")
    return None


def connect_request(scope: Scope) -> ConnectRequest:
    """What the ``connect`` hook is shown of a handshake."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        joiner = "; " if name == "cookie" else ", "  # (HTTP/2 sends cookies one a header)
        headers[name] = f"{headers[name]}{joiner}{value}" if name in headers else value
    query: dict[str, str] = {}
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        query.setdefault(key, value)
    client = scope.get("client")
    return ConnectRequest(
        headers=headers,
        cookies=_cookies(headers.get("cookie", "")),
        query=query,
        client=None if client is None else (str(client[0]), int(client[1])),
        path=route_path(scope),
    )


def _cookies(header: str) -> dict[str, str]:
    """``a=1; b=2`` as a dict, leniently (RFC 6265 §5.4: what browsers send); a cookie
    without ``=`` or with an empty name is skipped, the first of a name wins."""
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, equals, value = part.strip().partition("=")
        if equals and name:
            cookies.setdefault(name, value.strip().strip('"'))
    return cookies


async def _refuse_busy(runtime: Runtime, ws: WebSocket) -> None:
    """Answer a handshake beyond ``ROOMCAST_MAX_CONNECTIONS`` with 503, never upgraded."""
    runtime.refused += 1
    with suppress(ConnectionClosed):
        await ws.wait_connect()
        await ws.reject(503, BUSY, "text/plain; charset=utf-8")
