"""Prompt release and descriptor limits (SPEC §7), on a real ``python -m roomcast``.

A connection that ends by close frame, FIN or RST gives back its socket and memory at
once (not at the next WebSocket ping, 20 s later, as under plain Hypercorn); at the
descriptor limit the server refuses handshakes with 503 while it can still answer, keeps
``/healthz`` answering, logs next to nothing, and takes new clients as soon as fds free up.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable

import psutil
import pytest
import trio

from servers import ServerProcess, spawn_server

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["trio"])]

CHURN = 500
IN_FLIGHT = 50


def handshake(target: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def text_frame(text: str) -> bytes:
    payload, mask = text.encode(), os.urandom(4)
    header = struct.pack("!BB", 0x81, 0x80 | len(payload))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_until(sock: trio.socket.SocketType, marker: bytes, received: bytes = b"") -> bytes:
    while marker not in received:
        chunk = await sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before {marker!r}: {received[:200]!r}")
        received += chunk
    return received


async def chat_and_reset(port: int, number: int) -> None:
    """Connect, join, send a message, read its ack, then drop the connection with a RST."""
    sock = trio.socket.socket()
    try:
        await sock.connect(("127.0.0.1", port))
        await sock.send(handshake(f"/ws/chat?room=churn{number % 20}&name=c{number}"))
        received = await read_until(sock, b'"welcome"')
        await sock.send(text_frame(json.dumps({"text": "hi", "id": str(number)})))
        await read_until(sock, b'"ack"', received)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def churn(port: int, count: int) -> None:
    limiter = trio.CapacityLimiter(IN_FLIGHT)

    async def one(number: int) -> None:
        async with limiter:
            await chat_and_reset(port, number)

    async with trio.open_nursery() as nursery:
        for number in range(count):
            nursery.start_soon(one, number)


async def until(condition: Callable[[], bool], interval: float = 0.05) -> None:
    """Poll another process's state: there is nothing of it to await."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(interval)


async def steady_fds(worker: psutil.Process) -> int:
    """The worker's open descriptors once the count has stayed put for a second."""
    count, since = worker.num_fds(), trio.current_time()
    while trio.current_time() - since < 1.0:
        await trio.sleep(0.1)
        if (now := worker.num_fds()) != count:
            count, since = now, trio.current_time()
    return count


def only_worker(server: ServerProcess) -> psutil.Process:
    (pid,) = server.workers()
    return psutil.Process(pid)


async def test_connections_dropped_by_rst_give_back_fds_at_once_and_memory_soon() -> None:
    with spawn_server(env={"ROOMCAST_RATE_LIMIT": "0"}) as server:
        worker = only_worker(server)
        with trio.fail_after(60):
            await churn(server.port, 100)  # warm-up: imports, caches, allocator arenas
            fds, rss = await steady_fds(worker), worker.memory_info().rss
            await churn(server.port, CHURN)
            dropped = trio.current_time()
            await until(lambda: worker.num_fds() <= fds)
            released = trio.current_time() - dropped
            await trio.sleep(10)
        grown = worker.memory_info().rss / rss - 1
        print(f"\nfds {fds} again {released:.2f} s after the last RST; RSS {grown:+.1%} 10 s on")
        assert released <= 2.0
        assert grown <= 0.25


async def test_a_peer_that_sends_fin_without_a_close_frame_is_released_at_once() -> None:
    with spawn_server() as server, trio.fail_after(30):
        worker = only_worker(server)
        fds = await steady_fds(worker)
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", server.port))
        await sock.send(handshake("/ws/chat?room=fin"))
        await read_until(sock, b'"welcome"')
        await until(lambda: worker.num_fds() > fds)
        sock.shutdown(socket.SHUT_WR)  # FIN, no close frame
        with trio.fail_after(2):
            await until(lambda: worker.num_fds() <= fds)
        sock.close()


# -- descriptor limits -----------------------------------------------------------------------

NOFILE = 256
CLIENTS = 400


async def open_client(
    port: int, outcomes: Counter[str], held: list[trio.socket.SocketType]
) -> None:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    await sock.send(handshake("/ws/chat?room=crowd"))
    answer = await read_until(sock, b"\r\n\r\n")
    status = answer.split(b" ", 2)[1].decode()
    outcomes[status] += 1
    if status == "101":
        held.append(sock)
    else:
        sock.close()


async def test_beyond_the_fd_limit_handshakes_get_503_and_healthz_answers_throughout() -> None:
    with spawn_server(nofile=NOFILE) as server, trio.fail_after(60):
        outcomes: Counter[str] = Counter()
        health: Counter[int] = Counter()
        held: list[trio.socket.SocketType] = []
        async with trio.open_nursery() as nursery:

            async def poll_health() -> None:
                while True:
                    health[await trio.to_thread.run_sync(_healthz, server.port)] += 1
                    await trio.sleep(0.05)

            nursery.start_soon(poll_health)
            async with trio.open_nursery() as clients:
                for _ in range(CLIENTS):
                    clients.start_soon(open_client, server.port, outcomes, held)
            for sock in held:
                sock.close()
            await trio.sleep(0.5)
            late: Counter[str] = Counter()
            with trio.fail_after(2):  # new clients get in at once
                await open_client(server.port, late, held)
            nursery.cancel_scope.cancel()
        print(f"\nulimit -n {NOFILE}: {dict(outcomes)}; /healthz {dict(health)}")
        assert outcomes["101"] + outcomes["503"] == CLIENTS
        assert outcomes["503"] >= CLIENTS - NOFILE
        assert set(health) == {200}
        assert late == {"101": 1}
        log = server.text
        assert "Traceback" not in log
        assert log.count("cannot accept connections") <= 2


async def test_out_of_fds_the_worker_waits_quietly_and_resumes_when_fds_free_up() -> None:
    env = {"ROOMCAST_MAX_CONNECTIONS": str(10 * NOFILE)}  # past the fd limit, on purpose
    with spawn_server(nofile=NOFILE, env=env) as server, trio.fail_after(60):
        worker = only_worker(server)
        held: list[trio.socket.SocketType] = []
        outcomes: Counter[str] = Counter()
        async with trio.open_nursery() as clients:
            for _ in range(NOFILE):
                clients.start_soon(open_client, server.port, outcomes, held)
            await until(lambda: worker.num_fds() >= NOFILE - 1)
            await trio.sleep(1)  # the admitted clients' welcomes go out
            worker.cpu_percent()
            await trio.sleep(2)  # the rest wait in the listen backlog
            busy = worker.cpu_percent()
            assert outcomes["101"] < NOFILE
            for sock in held[:50]:  # fds free up: the waiting clients get in
                sock.close()
        for sock in held[50:]:
            sock.close()
        print(f"\nat the fd limit: {dict(outcomes)}, worker CPU {busy:.0f}% while waiting")
        assert outcomes == {"101": NOFILE}
        assert busy < 5
        log = server.text
        assert "Traceback" not in log
        assert 1 <= log.count("cannot accept connections") <= 2


def _healthz(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = sock.recv(100)
    return int(answer.split(b" ", 2)[1])
