"""What an idle WebSocket keeps on the Trio worker (issue 24): no state it no longer needs.

The memory itself is measured by ``bench/experiments/idle_profile.py`` and the bench's
``idle`` workload; these check the causes, one each, on a served connection.
"""

from __future__ import annotations

import gc
import math
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import hypercorn.trio
import hypercorn.trio.tcp_server
import pytest
import trio
from hypercorn.config import Config
from hypercorn.protocol.h11 import H11WSConnection
from trio._channel import MemoryChannelState
from wsproto.events import Ping
from wsproto.extensions import PerMessageDeflate

from roomcast import Settings, create_app
from roomcast.asgi import ASGIApp, Receive, Scope, Send
from roomcast.launcher import hardening
from roomcast.launcher.hardening import BoundedPerMessageDeflate, IdleDeflaters
from roomcast.runtime import STATE_KEY

from rawws import RawWebSocket, open_raw_websocket
from servers import (
    LifespanSpy,
    ThreadedServer,
    bind_loopback,
    run_telling_ready,
    serve_in_thread,
)


class CountingTrio(types.ModuleType):
    """Trio as Hypercorn's connection handler sees it, noting each ``fail_after``'s
    timeout (one is the TLS handshake's, which a plain-TCP connection asks for too)."""

    def __init__(self) -> None:
        super().__init__("trio")
        self.fail_afters: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)

    def fail_after(self, seconds: float) -> AbstractContextManager[trio.CancelScope]:
        self.fail_afters.append(seconds)
        return trio.fail_after(seconds)


@pytest.fixture
def counting_trio(monkeypatch: pytest.MonkeyPatch) -> CountingTrio:
    counting = CountingTrio()
    monkeypatch.setattr(hypercorn.trio.tcp_server, "trio", counting)
    return counting


@pytest.fixture
def server() -> Iterator[ThreadedServer]:
    """roomcast's Trio serving loop, without a read timeout (Hypercorn's default)."""
    with serve_in_thread(create_app(Settings(rate_limit=0)), worker_class="trio") as s:
        yield s


def echoed(ws: RawWebSocket, text: str) -> str | bytes:
    ws.send_text(text)
    return ws.next_message()


def test_reads_without_a_timeout_open_no_cancel_scope(
    counting_trio: CountingTrio, server: ThreadedServer
) -> None:
    """Hypercorn wraps every read in ``fail_after(read_timeout or inf)``: a cancel scope
    that lives as long as an idle connection waits, for a timeout that is not set."""
    ws = open_raw_websocket(server.port, "/ws/echo", timeout=10)
    try:
        for n in range(3):
            assert echoed(ws, f"hello {n}") == f"Echo: hello {n}"
    finally:
        ws.sock.close()
    assert math.inf not in counting_trio.fail_afters


def test_a_read_timeout_still_ends_a_silent_connection(counting_trio: CountingTrio) -> None:
    """With ``read_timeout`` set, reads keep Hypercorn's timed loop."""
    app = create_app(Settings(rate_limit=0))
    with serve_in_thread(app, worker_class="trio", read_timeout=0.5) as server:
        ws = open_raw_websocket(server.port, "/ws/echo", timeout=10)
        try:
            with pytest.raises(ConnectionError):
                ws.next_message()  # nothing sent: the server ends it after 0.5 s
        finally:
            ws.sock.close()
    assert 0.5 in counting_trio.fail_afters


def test_a_peer_that_leaves_is_released_by_the_untimed_read(server: ThreadedServer) -> None:
    """A FIN and a RST each end the connection's read, and with it the connection."""
    idle = server.task_count()
    for leave in (lambda ws: ws.sock.close(), RawWebSocket.kill):
        ws = open_raw_websocket(server.port, "/ws/echo", timeout=10)
        assert echoed(ws, "hi") == "Echo: hi"
        leave(ws)
        _until_tasks(server, idle)


def _until_tasks(server: ThreadedServer, count: int, timeout: float = 10.0) -> None:
    """Wait until the server runs at most ``count`` tasks (its connection released)."""
    deadline = time.monotonic() + timeout
    while server.task_count() > count:
        assert time.monotonic() < deadline, "the connection was not released"
        time.sleep(0.05)


def _h11_connections_kept() -> int:
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, H11WSConnection) and type(o.h11_connection).__module__.startswith("h11")
    )


def test_an_upgraded_connection_keeps_no_h11_state(server: ThreadedServer) -> None:
    """Hypercorn's WebSocket pass-through kept h11's whole connection for its life, to
    write one 101 response."""
    ws = open_raw_websocket(server.port, "/ws/echo", timeout=10)
    try:
        assert echoed(ws, "hello") == "Echo: hello"
        assert server.run_sync(_h11_connections_kept) == 0
        assert echoed(ws, "again") == "Echo: again"
    finally:
        ws.sock.close()


def _objects_of(*kinds: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kinds))


def test_an_idle_connection_waits_without_a_channel_or_events(server: ThreadedServer) -> None:
    """Hypercorn gave each app a memory channel (its state, two ends, a deque, two ordered
    dicts) and each connection three events (the ping loop's wake-up, h11's ``can_read``,
    the close timer's) that an idle WebSocket never uses: 2.6 KB of 30."""

    def kept() -> int:
        return _objects_of(trio.Event, MemoryChannelState)

    idle = server.run_sync(kept)
    ws = open_raw_websocket(server.port, "/ws/echo", timeout=10)
    try:
        assert echoed(ws, "hello") == "Echo: hello"
        assert server.run_sync(kept) == idle
        assert echoed(ws, "again") == "Echo: again"
    finally:
        ws.sock.close()


def _deflaters_held() -> int:
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, BoundedPerMessageDeflate) and o._compressor is not None
    )


@contextmanager
def serve(app: ASGIApp, serving: str) -> Iterator[ThreadedServer]:
    """``app`` served as ``serving`` says: roomcast's Trio loop (``python -m roomcast``),
    or plain Hypercorn's Trio or asyncio worker (``hypercorn --worker-class ...``)."""
    if serving == "hypercorn-trio":
        with serve_in_one_trio_loop(app) as loop:
            yield loop.servers[0]
    else:
        worker_class = "trio" if serving == "launcher-trio" else "asyncio"
        with serve_in_thread(app, worker_class=worker_class) as server:
            yield server


@pytest.mark.parametrize("serving", ["launcher-trio", "hypercorn-trio", "hypercorn-asyncio"])
def test_a_quiet_connection_gives_its_deflater_back(
    monkeypatch: pytest.MonkeyPatch, serving: str
) -> None:
    """A connection that negotiated permessage-deflate (as every browser does) held its
    deflater, 14 KB, for its whole life; now only until it has been quiet a while. The
    next message gets a new deflater, and the client, keeping its own context, reads it."""
    monkeypatch.setattr(hardening, "DEFLATER_IDLE", 0.5, raising=False)
    with serve(create_app(Settings(rate_limit=0)), serving) as server:
        ws = open_raw_websocket(server.port, "/ws/echo", extensions=[PerMessageDeflate()])
        try:
            for text in ("hello", "hello again"):  # and the new deflater goes too
                assert echoed(ws, text) == f"Echo: {text}"
                assert echoed(ws, text) == f"Echo: {text}"
                assert server.run_sync(_deflaters_held) == 1
                _until_released(server)
        finally:
            ws.sock.close()


def _until_released(server: ThreadedServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server.run_sync(_deflaters_held):
        assert time.monotonic() < deadline, "the idle deflater was kept"
        time.sleep(0.1)


@dataclass
class OneTrioLoop:
    """Apps served by plain Hypercorn's Trio worker in one Trio loop (one thread)."""

    servers: list[ThreadedServer]
    token: trio.lowlevel.TrioToken
    shutdowns: list[trio.Event]
    stopped: list[Future[None]]

    def stop(self, index: int) -> None:
        """Begin the graceful shutdown of one server (its lifespan ends after it)."""
        trio.from_thread.run_sync(self.shutdowns[index].set, trio_token=self.token)


@contextmanager
def serve_in_one_trio_loop(*apps: ASGIApp) -> Iterator[OneTrioLoop]:
    """Serve each app with ``hypercorn.trio.serve`` (what ``hypercorn --worker-class
    trio`` runs in a worker), all on one Trio loop in a background thread: one process,
    one loop, one lifespan per app."""
    ready: Future[OneTrioLoop] = Future()
    spies = [LifespanSpy(app) for app in apps]
    sockets = [bind_loopback() for _ in apps]
    ports = [sock.getsockname()[1] for sock in sockets]

    async def serve_one(
        spy: LifespanSpy,
        config: Config,
        shutdown: trio.Event,
        stopped: Future[None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await hypercorn.trio.serve(
                spy,  # type: ignore[arg-type]
                config,
                shutdown_trigger=shutdown.wait,
                task_status=task_status,  # type: ignore[arg-type]
            )
        finally:
            stopped.set_result(None)

    async def main() -> None:
        token = trio.lowlevel.current_trio_token()
        call: Callable[[Callable[[], Any]], Any] = partial_call(token)
        shutdowns = [trio.Event() for _ in apps]
        stopped: list[Future[None]] = [Future() for _ in apps]
        async with trio.open_nursery() as nursery:
            for spy, sock, shutdown, done in zip(spies, sockets, shutdowns, stopped, strict=True):
                config = Config()
                config.bind = [f"fd://{sock.detach()}"]
                config.graceful_timeout = 2.0
                config.accesslog = None
                await nursery.start(serve_one, spy, config, shutdown, done)
            servers = [
                ThreadedServer(spy, port, "trio", call)
                for spy, port in zip(spies, ports, strict=True)
            ]
            ready.set_result(OneTrioLoop(servers, token, shutdowns, stopped))

    thread = threading.Thread(
        target=run_telling_ready, args=(partial(trio.run, main), ready), daemon=True
    )
    thread.start()
    loop = ready.result(timeout=10)
    try:
        yield loop
    finally:
        for index, done in enumerate(loop.stopped):
            if not done.done():
                loop.stop(index)
        thread.join(timeout=15)
        assert not thread.is_alive(), "the servers did not shut down"


def partial_call(token: trio.lowlevel.TrioToken) -> Callable[[Callable[[], Any]], Any]:
    """Run a function on the Trio loop of ``token`` from another thread, for
    :meth:`ThreadedServer.run_sync`."""
    return lambda fn: trio.from_thread.run_sync(fn, trio_token=token)


async def foreign_echo(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app other than roomcast, served by the same (hardened) Hypercorn: it echoes
    text and puts nothing in the lifespan state."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": f"Echo: {message['text']}"})


def _deflaters_by_owner() -> Counter[IdleDeflaters | None]:
    """The deflaters held now, counted by the registry each connection was handed."""
    gc.collect()
    return Counter(
        o.idle_deflaters
        for o in gc.get_objects()
        if isinstance(o, BoundedPerMessageDeflate) and o._compressor is not None
    )


def test_each_app_frees_its_own_deflaters_and_none_after_its_lifespan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The idle deflaters live on each app's runtime, created with its lifespan: two
    roomcast apps on one loop keep theirs apart (a per-thread registry was shared by
    both), an app ended leaves none behind, and a connection of an app other than
    roomcast keeps its deflater (no runtime to free it) without an error."""
    monkeypatch.setattr(hardening, "DEFLATER_IDLE", 60.0, raising=False)  # none freed here
    apps: list[ASGIApp] = [
        create_app(Settings(rate_limit=0)),
        create_app(Settings(rate_limit=0)),
        foreign_echo,
    ]
    with serve_in_one_trio_loop(*apps) as loop:
        first, second, foreign = loop.servers
        clients = [
            open_raw_websocket(server.port, path, extensions=[PerMessageDeflate()])
            for server, path in ((first, "/ws/echo"), (second, "/ws/echo"), (foreign, "/"))
        ]
        try:
            for ws in clients:
                assert echoed(ws, "hello") == "Echo: hello"
            ended, going_on = first.runtime.idle_deflaters, second.runtime.idle_deflaters
            assert ended is not None and going_on is not None and ended is not going_on
            assert first.run_sync(_deflaters_by_owner) == Counter([ended, going_on, None])
            assert first.run_sync(lambda: (len(ended), len(going_on))) == (1, 1)

            loop.stop(0)  # the first app shuts down: its connection is closed 1001
            assert clients[0].read_until_close()[0] == 1001
            clients[0].sock.close()
            loop.stopped[0].result(timeout=10)  # and its lifespan has ended
            assert first.run_sync(lambda: len(ended)) == 0
            assert first.run_sync(_deflaters_by_owner) == Counter([going_on, None])
            for ws in clients[1:]:
                assert echoed(ws, "still here") == "Echo: still here"
        finally:
            for ws in clients:
                ws.sock.close()


def test_the_runtime_key_is_the_runtimes() -> None:
    """hardening finds the runtime under the lifespan state's key without importing the
    runtime (which imports the whole app)."""
    assert hardening.RUNTIME_KEY == STATE_KEY


PING_INTERVAL = 0.3


@pytest.fixture
def pinging_server() -> Iterator[ThreadedServer]:
    app = create_app(Settings(rate_limit=0))
    with serve_in_thread(app, worker_class="trio", websocket_ping_interval=PING_INTERVAL) as s:
        yield s


def _pings_waiting(ws: RawWebSocket) -> int:
    """Pings received so far and not yet read."""
    pings = 0
    ws.sock.settimeout(0.05)
    while True:
        try:
            event = ws.next_event()
        except TimeoutError:
            return pings
        pings += isinstance(event, Ping)


def _pings_over(sockets: list[RawWebSocket], seconds: float) -> list[int]:
    """Pings each socket receives over the next ``seconds``: at every interval, within
    the pinger's tick (0.5 s, more than the test's interval)."""
    for ws in sockets:
        _pings_waiting(ws)
    time.sleep(seconds)
    return [_pings_waiting(ws) for ws in sockets]


def test_pings_come_from_one_task_not_one_per_connection(pinging_server: ThreadedServer) -> None:
    """Hypercorn pinged each WebSocket from a task of its own that slept between pings:
    4 KB per idle connection. The runtime's pinger pings them all from one."""
    server = pinging_server
    idle = server.task_count()
    sockets = [open_raw_websocket(server.port, "/ws/echo", timeout=10) for _ in range(4)]
    try:
        for ws in sockets:
            assert echoed(ws, "hello") == "Echo: hello"
        # a connection's reader and its app; a ping's task lives for one write
        assert min(server.task_count() for _ in range(5)) == idle + 2 * len(sockets)
        assert all(3 <= pings <= 8 for pings in _pings_over(sockets, 2.0))
    finally:
        for ws in sockets:
            ws.sock.close()


def test_a_peer_that_stops_reading_delays_no_one_elses_pings(
    pinging_server: ThreadedServer,
) -> None:
    """Each ping is written by a task of its own connection: one that cannot be written
    (the peer reads nothing, the server's writes back up) holds up no other."""
    server = pinging_server
    idle = server.task_count()
    stuck = open_raw_websocket(server.port, "/ws/echo", receive_buffer=4096, timeout=10)
    healthy = open_raw_websocket(server.port, "/ws/echo", timeout=10)
    try:
        stuck.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # echoes back up until the server stops reading
            for _ in range(10_000):
                stuck.send_text("x" * 65_536)
        assert 3 <= _pings_over([healthy], 2.0)[0] <= 8
        # the stuck one's pings wait in one task, which none piles up behind
        assert server.task_count() <= idle + 2 * 2 + 2 + 1
    finally:
        stuck.kill()
        healthy.sock.close()
