"""The Trio worker's plain-TCP write path (``roomcast.launcher.trio_write``).

Unit tests drive a :class:`DirectWriter` over a real socket pair whose far end reads only
when the test says so, so every branch is reached for real: frames the kernel takes at
once, partial writes, a backlog written by the writer task, a sender waiting beyond the
limit, cancellation, a peer that resets the connection. Then a real server (the launcher's
Trio serving loop) with strict, slow clients. Stalled readers (4008), shutdown (1001),
vanished peers and hostile input are covered for every serving command by test_stalled,
test_shutdown, test_send_timeout, test_vanished and test_hostile.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypercorn.config import Config
from hypercorn.trio.worker_context import WorkerContext
from trio_websocket import open_websocket_url
from wsproto.events import CloseConnection, Event, Ping, Pong, TextMessage

from roomcast import Settings, create_app
from roomcast.launcher import trio_write
from roomcast.launcher.trio_server import ConnectionContext, ContainedTCPServer
from roomcast.launcher.trio_write import DirectWriter
from roomcast.protocol import BATCH_SUBPROTOCOL

from rawws import RawWebSocket, open_raw_websocket
from servers import serve_in_thread

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]

#: the kernel buffers of the pair, kept small so that a backlog builds after a few frames
BUFFER = 4096


@dataclass
class Pair:
    """A writer on one end of a connected socket pair; the test reads the other end."""

    writer: DirectWriter
    peer: trio.socket.SocketType
    nursery: trio.Nursery
    writers_started: int = 0
    closed_calls: int = 0
    received: bytearray = field(default_factory=bytearray)

    async def read_all(self, until: int) -> bytes:
        """Read from the peer until ``until`` bytes have arrived in total."""
        while len(self.received) < until:
            chunk = await self.peer.recv(65536)
            assert chunk, "the writer's end closed early"
            self.received += chunk
        return bytes(self.received)

    def reset(self) -> None:
        """The peer goes away with a RST, as a crashed client does."""
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.peer.close()


@asynccontextmanager
async def open_pair(limit: int = 8 * BUFFER) -> AsyncIterator[Pair]:
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    stream = trio.SocketStream(ours)
    with theirs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            pair: Pair

            def spawn(task: Callable[[], Awaitable[None]]) -> None:
                pair.writers_started += 1
                nursery.start_soon(task)

            async def closed() -> None:
                pair.closed_calls += 1

            pair = Pair(DirectWriter(stream, spawn, closed, limit=limit), theirs, nursery)
            yield pair
        await stream.aclose()


def frame(task: int, n: int, size: int) -> bytes:
    """A self-describing record: header (task, n, length), then ``size`` bytes of ``n``."""
    return struct.pack("!HII", task, n, size) + bytes([n % 251]) * size


def parse(data: bytes) -> list[tuple[int, int]]:
    """Every record in ``data``, checked whole: a cut or interleaved frame fails here."""
    records, at = [], 0
    while at < len(data):
        task, n, size = struct.unpack_from("!HII", data, at)
        body = data[at + 10 : at + 10 + size]
        assert body == bytes([n % 251]) * size, f"record {task}/{n} is cut or interleaved"
        records.append((task, n))
        at += 10 + size
    return records


async def test_frames_the_kernel_takes_are_written_without_a_task_or_a_task_switch() -> None:
    async with open_pair() as pair:
        other_ran = False

        async def other() -> None:
            nonlocal other_ran
            other_ran = True

        pair.nursery.start_soon(other)  # runnable from now on: it runs at our next yield
        frames = [frame(0, n, 100) for n in range(10)]
        for data in frames:
            assert await pair.writer.send(data)
        assert not other_ran
        assert pair.writers_started == 0
        assert parse(await pair.read_all(sum(map(len, frames)))) == [(0, n) for n in range(10)]


async def test_a_backlog_goes_out_through_one_writer_whole_and_in_each_senders_order() -> None:
    async with open_pair() as pair:
        sizes = [1, 700, 3000, 9000, 40]  # partial writes included: frames beyond the buffer

        async def sender(task: int, count: int) -> None:
            for n in range(count):
                assert await pair.writer.send(frame(task, n, sizes[(task + n) % len(sizes)]))
                await trio.lowlevel.checkpoint()

        total = sum(
            len(frame(t, n, sizes[(t + n) % len(sizes)])) for t in range(3) for n in range(60)
        )
        async with trio.open_nursery() as senders:
            for task in range(3):
                senders.start_soon(sender, task, 60)
            data = await pair.read_all(total)  # reading while they send: the backlog comes and goes
        records = parse(data)
        await trio.testing.wait_all_tasks_blocked()
        for task in range(3):
            assert [n for t, n in records if t == task] == list(range(60))
        assert pair.writers_started >= 1
        assert pair.writer.buffered == 0
        assert pair.closed_calls == 0


async def test_a_sender_waits_beyond_the_limit_and_goes_on_when_the_peer_reads() -> None:
    async with open_pair(limit=2 * BUFFER) as pair:
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for n in range(100):
                await pair.writer.send(frame(0, n, 1000))
                sent += 1

        pair.nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked()
        assert 0 < sent < 100  # blocked: the peer reads nothing
        assert pair.writer.buffered <= 2 * BUFFER + len(frame(0, 0, 1000))
        assert parse(await pair.read_all(100 * len(frame(0, 0, 1000)))) == [
            (0, n) for n in range(100)
        ]
        assert sent == 100


async def test_a_cancelled_sender_writes_nothing_of_its_frame() -> None:
    async with open_pair(limit=BUFFER) as pair:
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await pair.writer.send(frame(0, 0, 10))
        assert pair.writer.buffered == 0
        # one frame fills the kernel and the backlog; the next waits and is cancelled there
        await pair.writer.send(frame(0, 1, 6 * BUFFER))
        with trio.move_on_after(0.05) as waited:
            await pair.writer.send(frame(0, 2, 10))
        assert waited.cancelled_caught
        expected = len(frame(0, 1, 6 * BUFFER)) + len(frame(0, 3, 10))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.writer.send, frame(0, 3, 10))  # waits until we read
            data = await pair.read_all(expected)
        assert parse(data) == [(0, 1), (0, 3)]


async def test_flush_writes_the_backlog_even_when_the_caller_is_cancelled() -> None:
    async with open_pair() as pair:
        await pair.writer.send(frame(0, 0, 8 * BUFFER))
        assert pair.writer.buffered > 0
        flushed = trio.Event()

        async def close_under_cancellation() -> None:
            with trio.CancelScope() as scope:
                scope.cancel()
                await pair.writer.flush()  # what a Closed event waits for at shutdown
                flushed.set()

        pair.nursery.start_soon(close_under_cancellation)
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed.is_set()
        assert parse(await pair.read_all(len(frame(0, 0, 8 * BUFFER)))) == [(0, 0)]
        await flushed.wait()
        assert pair.writer.buffered == 0


async def test_the_writer_ends_with_its_backlog_so_the_connection_can_end() -> None:
    async with open_pair() as pair:
        await pair.writer.send(frame(0, 0, 8 * BUFFER))
        assert len(pair.nursery.child_tasks) == 1  # the writer
        await pair.read_all(len(frame(0, 0, 8 * BUFFER)))
        await trio.testing.wait_all_tasks_blocked()
        assert len(pair.nursery.child_tasks) == 0


async def test_a_reset_ends_the_connection_once_and_wakes_waiting_senders() -> None:
    async with open_pair(limit=BUFFER) as pair:
        await pair.writer.send(frame(0, 0, 8 * BUFFER))  # a backlog: the writer is blocked
        results: list[bool] = []

        async def waiting_sender() -> None:
            results.append(await pair.writer.send(frame(0, 1, 10)))

        pair.nursery.start_soon(waiting_sender)
        await trio.testing.wait_all_tasks_blocked()
        assert results == []
        pair.reset()
        await trio.testing.wait_all_tasks_blocked()
        assert results == [False]
        assert pair.closed_calls == 1  # the writer told the protocol, once
        assert not await pair.writer.send(frame(0, 2, 10))
        assert pair.writer.buffered == 0


async def test_a_direct_write_to_a_reset_peer_reports_the_connection_broken() -> None:
    async with open_pair() as pair:
        pair.reset()
        assert not await pair.writer.send(frame(0, 0, 10))
        assert pair.writers_started == 0


async def test_tls_streams_and_untested_hypercorns_keep_hypercorns_write_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ours, theirs = trio.socket.socketpair()
    with ours, theirs:
        plain = trio.SocketStream(ours)
        tls = trio.SSLStream(plain, ssl.create_default_context())

        def connection(stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]) -> Any:
            context = ConnectionContext(WorkerContext(None))
            return ContainedTCPServer(create_app(), Config(), context, {}, stream)

        assert isinstance(connection(plain).writer, DirectWriter)
        assert connection(tls).writer is None
        monkeypatch.setattr(trio_write, "SUPPORTED", False)
        assert connection(plain).writer is None


# -- on a real server ------------------------------------------------------------------------

TALKERS = 3
MESSAGES = 300  # per talker
PADS = [10, 300, 3000]  # characters of chat text: small frames, and frames beyond a read
PAUSE_AT = 200  # messages a slow reader reads before it stops for a while


@dataclass
class StrictReader:
    """A client that parses every frame with wsproto (a cut or interleaved frame is a
    protocol error, which wsproto reports as a close with 1002 or 1007), reads slowly
    through a small window, pings the server, answers its pings, and at :data:`PAUSE_AT`
    messages stops reading (and sending) until told to resume."""

    ws: RawWebSocket
    batch: bool
    paused: threading.Event = field(default_factory=threading.Event)
    resume: threading.Event = field(default_factory=threading.Event)
    messages: list[dict[str, Any]] = field(default_factory=list)
    server_pings: int = 0
    pongs: int = 0
    close: tuple[int, str] | None = None
    _text: str = ""

    @property
    def port(self) -> int:
        port: int = self.ws.sock.getsockname()[1]
        return port

    def run(self) -> None:
        while self.close is None:
            if len(self.messages) >= PAUSE_AT and not self.paused.is_set():
                self.paused.set()
                assert self.resume.wait(30)
            data = self.ws.sock.recv(2048)
            self.ws.conn.receive_data(data or None)
            for event in self.ws.conn.events():
                self._handle(event)
            if not data and self.close is None:
                raise ConnectionError("the server closed the connection without a close frame")
            time.sleep(0.0002)

    def _handle(self, event: Event) -> None:
        if isinstance(event, TextMessage):
            self._text += event.data
            if event.message_finished:
                lines = self._text.split("\n") if self.batch else [self._text]
                self._text = ""
                for line in lines:
                    self._event(json.loads(line))
        elif isinstance(event, Ping):
            self.server_pings += 1
            self._send(event.response())
        elif isinstance(event, Pong):
            self.pongs += 1
        elif isinstance(event, CloseConnection):
            self.close = (event.code, event.reason)
        else:
            raise AssertionError(f"unexpected {event!r}")

    def _event(self, event: dict[str, Any]) -> None:
        if event["type"] == "message":
            self.messages.append(event)
            if len(self.messages) % 50 == 0:
                self._send(Ping(payload=str(len(self.messages)).encode()))

    def _send(self, event: Ping | Pong) -> None:
        if not self.paused.is_set():  # a paused client sends nothing either
            self.ws.sock.sendall(self.ws.conn.send(event))


async def talk(url: str, talker: int) -> None:
    """Publish :data:`MESSAGES` messages as fast as the server takes them; return once
    each was acknowledged (reading everything the room sends meanwhile)."""
    async with open_websocket_url(url + f"&name=t{talker}") as ws:
        acked = trio.Event()

        async def read() -> None:
            acks = 0
            while acks < MESSAGES:
                if json.loads(await ws.get_message())["type"] == "ack":
                    acks += 1
            acked.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for n in range(MESSAGES):
                text = f"{talker}:{n}:" + "x" * PADS[n % len(PADS)]
                await ws.send_message(json.dumps({"text": text, "id": str(n)}))
            await acked.wait()


def check_text(messages: list[dict[str, Any]]) -> None:
    """Every message is whole, and each talker's messages arrive in the order sent."""
    next_n = [0] * TALKERS
    for message in messages:
        talker, n, pad = message["text"].split(":")
        assert (int(n), len(pad)) == (next_n[int(talker)], PADS[int(n) % len(PADS)])
        next_n[int(talker)] += 1


async def test_frames_from_concurrent_writers_arrive_whole_and_in_order_then_1001(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Slow readers of a busy room get, on one connection, the sender task's frames, the
    ping task's pings, the reader's pongs, and at shutdown the close frame their handler
    sends when it is cancelled: all intact, in order, the close after everything queued
    before it, although the server had a backlog for them when it began to shut down."""
    writers: dict[int, DirectWriter] = {}  # by the client's port
    writer_runs = 0
    init, write_pending = DirectWriter.__init__, DirectWriter._write_pending

    def recording_init(self: DirectWriter, stream: trio.SocketStream, *args: Any) -> None:
        init(self, stream, *args)
        writers[stream.socket.getpeername()[1]] = self

    async def counting_write_pending(self: DirectWriter) -> None:
        nonlocal writer_runs
        writer_runs += 1
        await write_pending(self)

    monkeypatch.setattr(DirectWriter, "__init__", recording_init)
    monkeypatch.setattr(DirectWriter, "_write_pending", counting_write_pending)
    settings = Settings(rate_limit=0, room_capacity=0, outbox_size=10_000)
    app = create_app(settings)
    with contextlib.ExitStack() as stack, trio.fail_after(60):
        server = stack.enter_context(
            serve_in_thread(app, websocket_ping_interval=0.01, graceful_timeout=0.3)
        )
        url = server.url("/ws/chat?room=busy")
        readers = [
            StrictReader(
                open_raw_websocket(
                    server.port,
                    "/ws/chat?room=busy",
                    receive_buffer=4096,
                    subprotocols=[BATCH_SUBPROTOCOL] if batch else None,
                ),
                batch,
            )
            for batch in (False, True)
        ]
        async with trio.open_nursery() as nursery:
            for reader in readers:
                nursery.start_soon(trio.to_thread.run_sync, reader.run)
            async with trio.open_nursery() as talkers:
                for talker in range(TALKERS):
                    talkers.start_soon(talk, url, talker)
            for reader in readers:
                assert await trio.to_thread.run_sync(reader.paused.wait, 30)
            backlogs = server.run_sync(lambda: [writers[r.port].buffered for r in readers])
            assert all(backlogs), backlogs  # the server is holding frames for both
            nursery.start_soon(trio.to_thread.run_sync, stack.close)  # shut down, and wait
            await trio.sleep(0.6)  # the readers stay away through the graceful period
            for reader in readers:
                reader.resume.set()
    assert writer_runs > 0
    for reader in readers:
        assert reader.close == (1001, "server shutting down")
        seqs = [message["seq"] for message in reader.messages]
        assert seqs == list(range(1, len(seqs) + 1))  # no gap, no duplicate, in order
        assert len(seqs) > PAUSE_AT  # what was queued for it when it paused came through
        check_text(reader.messages)
        assert reader.server_pings > 0
        assert reader.pongs > 0
