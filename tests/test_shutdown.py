"""Graceful shutdown of a real server process: every open WebSocket gets 1001."""

from __future__ import annotations

import json
import signal
import time

import pytest

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
