"""What an idle WebSocket keeps on the Trio worker (issue 24): no state it no longer needs.

The memory itself is measured by ``bench/experiments/idle_profile.py`` and the bench's
``idle`` workload; these check the causes, one each, on a served connection.
"""

from __future__ import annotations

import gc
import math
import time
import types
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import hypercorn.trio.tcp_server
import pytest
import trio
from hypercorn.protocol.h11 import H11WSConnection
from trio._channel import MemoryChannelState
from wsproto.extensions import PerMessageDeflate

from roomcast import Settings, create_app
from roomcast.launcher import hardening
from roomcast.launcher.hardening import BoundedPerMessageDeflate

from rawws import RawWebSocket, open_raw_websocket
from servers import ThreadedServer, serve_in_thread


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


def test_a_quiet_connection_gives_its_deflater_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that negotiated permessage-deflate (as every browser does) held its
    deflater, 14 KB, for its whole life; now only until it has been quiet a while. The
    next message gets a new deflater, and the client, keeping its own context, reads it."""
    monkeypatch.setattr(hardening, "DEFLATER_IDLE", 0.5, raising=False)
    with serve_in_thread(create_app(Settings(rate_limit=0)), worker_class="trio") as server:
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
