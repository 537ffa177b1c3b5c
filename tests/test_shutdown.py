"""Graceful shutdown of a real server process: every open WebSocket gets 1001."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from wsproto.events import CloseConnection, Ping, TextMessage

from roomcast.identity import mint_token

from rawws import RawWebSocket, open_raw_websocket
from servers import ServerProcess, spawn_server

GRACEFUL = 1
SECRET = "a-secret-for-the-shutdown-tests-32b"


@pytest.mark.parametrize("hypercorn", [False, True], ids=["python-m-roomcast", "hypercorn"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_every_websocket_gets_1001_and_the_process_exits(hypercorn: bool, sig: int) -> None:
    with spawn_server(["--graceful-timeout", str(GRACEFUL)], hypercorn=hypercorn) as server:
        chat = [open_raw_websocket(server.port, f"/ws/chat?room=r{i % 2}") for i in range(6)]
        for ws in chat:
            assert json.loads(ws.next_message())["type"] == "welcome"
        echo = open_raw_websocket(server.port, "/ws/echo")
        binary = open_raw_websocket(server.port, "/ws/binary")
        started = time.monotonic()
        server.terminate(sig)
        for ws in [*chat, echo, binary]:
            code, reason, _ = ws.read_until_close()
            assert (code, reason) == (1001, "server shutting down")
        assert server.process.wait(timeout=GRACEFUL + 5) == 0
        assert time.monotonic() - started < GRACEFUL + 3


@pytest.mark.parametrize("hypercorn", [False, True], ids=["python-m-roomcast", "hypercorn"])
def test_a_client_away_at_shutdown_gets_its_backlog_whole_then_1001(hypercorn: bool) -> None:
    """A client that has not read for a while when SIGTERM arrives: the server holds its
    frames (outbox, write path, socket buffers) past the graceful period. What was written
    reaches it whole and in order, then the close frame its cancelled handler sends."""
    env = {"ROOMCAST_RATE_LIMIT": "0", "ROOMCAST_OUTBOX_SIZE": "2000"}
    args = ["--graceful-timeout", str(GRACEFUL)]
    with spawn_server(args, hypercorn=hypercorn, env=env) as server:
        away = open_raw_websocket(server.port, "/ws/chat?room=r", receive_buffer=4096)
        talker = open_raw_websocket(server.port, "/ws/chat?room=r", receive_buffer=1 << 20)
        for n in range(300):
            talker.send_text(json.dumps({"text": f"{n}:" + "z" * 2000}))
        assert json.loads(talker.next_message())["type"] == "welcome"
        while json.loads(talker.next_message()).get("seq") != 300:
            pass  # every message is in the room
        server.terminate(signal.SIGTERM)
        time.sleep(GRACEFUL + 0.3)  # away through the graceful period: the handler is cancelled
        seqs, text = [], ""
        while not isinstance(event := away.next_event(), CloseConnection):
            if isinstance(event, Ping):  # Hypercorn pings every connection when it opens
                continue
            assert isinstance(event, TextMessage)
            text += event.data
            if event.message_finished:
                message, text = json.loads(text), ""
                if message["type"] == "message":
                    assert message["text"] == f"{message['seq'] - 1}:" + "z" * 2000
                    seqs.append(message["seq"])
        assert (event.code, event.reason) == (1001, "server shutting down")
        assert seqs == list(range(1, len(seqs) + 1))
        assert seqs, "nothing reached the client before the close frame"
        assert server.process.wait(timeout=GRACEFUL + 5) == 0


def _open_clients(server: ServerProcess, signed: bool) -> list[RawWebSocket]:
    """Chat members in two rooms (with signed tokens: two of one user, all having
    refreshed their token once), plus an echo client; each has had its welcome."""
    chat = []
    for i in range(4):
        query = f"/ws/chat?room=r{i % 2}"
        token = mint_token(SECRET, sub=f"u{i // 2}", ttl=600) if signed else None
        ws = open_raw_websocket(server.port, query + (f"&token={token}" if token else ""))
        assert json.loads(ws.next_message())["type"] == "welcome"
        if token is not None:
            fresh = mint_token(SECRET, sub=f"u{i // 2}", ttl=900)
            ws.send_text(json.dumps({"type": "refresh", "token": fresh}))
        ws.send_text(json.dumps({"text": f"hello {i}", "id": f"m{i}"}))
        chat.append(ws)
    echo_query = f"/ws/echo?token={mint_token(SECRET, sub='e', ttl=600)}" if signed else "/ws/echo"
    echo = open_raw_websocket(server.port, echo_query)
    echo.send_text("ping")
    assert echo.next_message() == "Echo: ping"
    return [*chat, echo]


STOPS = [
    pytest.param(worker_class, sig, target, signed, clients, id="-".join(parts))
    for worker_class in ("trio", "asyncio")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for target in ("master", "group")
    for signed, clients in ((True, True), (False, True), (True, False))
    for parts in [
        [
            worker_class,
            f"{sig.name}-to-{target}",
            "signed" if signed else "anonymous",
            "clients" if clients else "idle",
        ]
    ]
]


@pytest.mark.parametrize(("worker_class", "sig", "target", "signed", "clients"), STOPS)
def test_every_stop_path_ends_cleanly(
    worker_class: str, sig: signal.Signals, target: str, signed: bool, clients: bool
) -> None:
    """SIGTERM, SIGINT or SIGHUP, to the master (``kill``) or its whole process group (a
    terminal's Ctrl-C or hang-up, ``kill %1``, a service manager), with or without
    connected clients, with or without signed tokens: every client gets 1001, the
    command exits 0 within the graceful period (and a margin), and the log has no error,
    no traceback and no worker that had to be killed."""
    env = {"ROOMCAST_JWT_SECRET": SECRET} if signed else {}
    args = ["--graceful-timeout", str(GRACEFUL), "-k", worker_class]
    with spawn_server(args, env=env) as server:
        connected = _open_clients(server, signed) if clients else []
        started = time.monotonic()
        if target == "group":
            os.killpg(server.process.pid, sig)
        else:
            server.terminate(sig)
        for ws in connected:
            code, reason, _ = ws.read_until_close()
            assert (code, reason) == (1001, "server shutting down")
        assert server.process.wait(timeout=GRACEFUL + 8) == 0, server.text
        assert time.monotonic() - started < GRACEFUL + 5
        log = server.text
        assert "has not stopped" not in log and "Traceback" not in log, log
        assert "[ERROR]" not in log, log
