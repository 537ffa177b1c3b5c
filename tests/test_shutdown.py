"""Graceful shutdown of a real server process: every open WebSocket gets 1001."""

from __future__ import annotations

import json
import signal
import time

import pytest
from wsproto.events import CloseConnection, Ping, TextMessage

from rawws import open_raw_websocket
from servers import spawn_server

GRACEFUL = 1


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
