"""A peer that never reads, against a real server process: every serving command has the
kernel end it after ROOMCAST_SEND_TIMEOUT (TCP_USER_TIMEOUT)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from rawws import RawWebSocket, open_raw_websocket
from servers import ServerProcess, spawn_server

SEND_TIMEOUT = 2.0
ENV = {
    "ROOMCAST_SEND_TIMEOUT": str(SEND_TIMEOUT),
    "ROOMCAST_RATE_LIMIT": "0",
    "ROOMCAST_OUTBOX_SIZE": "8",
    "ROOMCAST_MAX_TEXT": "30000",
}


def metric(server: ServerProcess, name: str) -> float:
    with urllib.request.urlopen(server.http_url("/metrics"), timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def stall_one_reader(server: ServerProcess) -> tuple[RawWebSocket, RawWebSocket]:
    """A talker and a reader that never reads; the talker sends big messages (reading its
    own echoes) until the stalled reader is evicted, so its sender is stuck in a write."""
    stalled = open_raw_websocket(server.port, "/ws/chat?room=t&name=stalled", receive_buffer=4096)
    talker = open_raw_websocket(server.port, "/ws/chat?room=t&name=talker")
    for _ in range(2000):
        if metric(server, "roomcast_evictions_total") == 1:
            return stalled, talker
        talker.send_text(json.dumps({"text": "x" * 29_000}))
        while json.loads(talker.next_message())["type"] != "message":
            pass
    raise AssertionError("not evicted after 2000 messages")


def next_chat_text(ws: RawWebSocket, text: str) -> str:
    """Send ``text`` and return the text of the next ``message`` event."""
    ws.send_text(text)
    while (event := json.loads(ws.next_message()))["type"] != "message":
        pass
    return str(event["text"])


def wait_for(condition: object, timeout: float) -> float:
    """Seconds until ``condition()`` held (polling a separate process: no event to await)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.mark.parametrize(
    ("command", "args"),
    [
        pytest.param("python -m roomcast", [], id="python-m-roomcast"),
        pytest.param("hypercorn", [], id="hypercorn-trio"),
        pytest.param("hypercorn", ["-k", "asyncio"], id="hypercorn-asyncio"),
    ],
)
def test_the_kernel_ends_a_peer_that_never_reads(command: str, args: list[str]) -> None:
    """``python -m roomcast`` sets TCP_USER_TIMEOUT on its listening sockets; under plain
    Hypercorn roomcast sets it on each accepted socket (roomcast.launcher.hardening)."""
    with spawn_server(args, command=command, env=ENV) as server:
        stalled, talker = stall_one_reader(server)
        took = wait_for(lambda: metric(server, "roomcast_connections") == 1, SEND_TIMEOUT + 10)
        assert took <= SEND_TIMEOUT + 5
        with pytest.raises(ConnectionError):  # aborted with a RST by the server's kernel
            stalled.read_until_close()
        assert next_chat_text(talker, "still here") == "still here"  # the room was never affected
