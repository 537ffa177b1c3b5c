"""A peer that vanishes without closing (its host drops off the network: no FIN, no RST)
is detected and cleaned up within ping interval + send timeout, under ``python -m roomcast``
and plain Hypercorn alike: Hypercorn's pings keep data in flight and TCP_USER_TIMEOUT (set
on the listening sockets by the launcher, on each accepted socket by roomcast's hardening
under plain Hypercorn) aborts the connection when it goes unacknowledged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ci import missing
from netns import PeerHost, can_make_hosts, peer_host
from rawws import RawWebSocket, open_raw_websocket
from servers import ServerProcess, spawn_server

PING_INTERVAL = 1.0
SEND_TIMEOUT = 2.0

GHOST = """
import sys
sys.path.insert(0, sys.argv[3])
from rawws import open_raw_websocket
ws = open_raw_websocket(int(sys.argv[2]), "/ws/chat?room=v&name=ghost", host=sys.argv[1])
ws.next_message()
print("joined", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def peer() -> Iterator[PeerHost]:
    reason = can_make_hosts()
    if reason is not None:
        missing(reason)
    with peer_host() as host:
        yield host


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "hypercorn.toml"
    path.write_text(
        f'worker_class = "trio"\nwebsocket_ping_interval = {PING_INTERVAL}\n'
        "graceful_timeout = 1\nwebsocket_max_message_size = 65536\n"
    )
    return str(path)


def join_ghost(peer: PeerHost, server: ServerProcess) -> subprocess.Popen[bytes]:
    tests = os.path.dirname(os.path.abspath(__file__))
    ghost = peer.run(
        sys.executable,
        "-c",
        GHOST,
        server.host,
        str(server.port),
        tests,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert ghost.stdout is not None
    assert ghost.stdout.readline() == b"joined\n"
    return ghost


def next_system(ws: RawWebSocket, seconds: float) -> dict[str, object] | None:
    """The next ``system`` event within ``seconds``, or ``None`` (the server's pings keep
    arriving meanwhile, so a socket timeout alone would never fire)."""
    deadline = time.monotonic() + seconds
    ws.sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            event = json.loads(ws.next_message())
        except TimeoutError:
            continue
        if event["type"] == "system":
            return dict(event)
    return None


@pytest.mark.parametrize("hypercorn", [False, True], ids=["python-m-roomcast", "hypercorn"])
def test_a_vanished_peer_is_cleaned_up(peer: PeerHost, config: str, hypercorn: bool) -> None:
    env = {"ROOMCAST_SEND_TIMEOUT": str(SEND_TIMEOUT), "ROOMCAST_PRESENCE_GRACE": "0"}
    with spawn_server(
        env=env, host=peer.server_address, config=config, hypercorn=hypercorn
    ) as server:
        watcher = open_raw_websocket(server.port, "/ws/chat?room=v&name=watcher", host=server.host)
        ghost = join_ghost(peer, server)
        try:
            joined = next_system(watcher, 10)
            assert joined is not None and joined["event"] == "join"
            peer.vanish()
            vanished = time.monotonic()
            left = next_system(watcher, PING_INTERVAL + SEND_TIMEOUT + 4)
            took = time.monotonic() - vanished
            assert left is not None
            assert (left["event"], left["name"], left["count"]) == ("leave", "ghost", 1)
            print(f"\nvanished peer cleaned up after {took:.1f} s")
        finally:
            ghost.kill()
            ghost.wait(timeout=10)
            watcher.sock.close()
