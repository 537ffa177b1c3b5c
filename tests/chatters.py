"""Chat members on raw sockets that check what they receive, for process-level tests.

A :class:`Chatter` keeps the last ``seq`` it saw in its room and fails the test if a
``message`` arrives out of order, twice or after a gap: a worker that died, or a room that
stalled, shows up as a broken connection or a seq that does not follow.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import psutil

from rawws import RawWebSocket, open_raw_websocket


@dataclass
class Chatter:
    ws: RawWebSocket
    name: str
    seq: int
    said: int = 0
    seen: list[int] = field(default_factory=list)

    @classmethod
    def join(cls, port: int, room: str, name: str, timeout: float = 10.0) -> Chatter:
        ws = open_raw_websocket(port, f"/ws/chat?room={room}&name={name}", timeout=timeout)
        welcome = json.loads(ws.next_message())
        assert welcome["type"] == "welcome", welcome
        return cls(ws, name, welcome["seq"])

    def say(self, text: str | None = None) -> int:
        """Send a message and read until its own echo; every message read on the way
        must follow the last one. Returns the message's seq.

        :raises ConnectionError: if the connection ends first
        """
        self.said += 1
        id = f"{self.name}-{self.said}"
        self.ws.send_text(json.dumps({"text": text or id, "id": id}))
        while True:
            event = self.next_event()
            if event["type"] == "message" and event.get("id") == id:
                return int(event["seq"])

    def next_event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.ws.next_message())
        if event["type"] == "message":
            assert event["seq"] == self.seq + 1, f"{self.name}: seq {event['seq']} after {self.seq}"
            self.seq = event["seq"]
            self.seen.append(self.seq)
        return event

    def close_code(self) -> int:
        """Read until the close frame; its code (1006 if the connection just ended)."""
        try:
            code, _, _ = self.ws.read_until_close()
        except (ConnectionError, OSError):
            return 1006
        return code

    def local_address(self) -> tuple[str, int]:
        host, port = self.ws.sock.getsockname()[:2]
        return host, port

    def kill(self) -> None:
        self.ws.kill()


def owner_of(pids: list[int], client: tuple[str, int]) -> int | None:
    """The pid among ``pids`` holding the server side of the TCP connection from ``client``."""
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        for connection in connections:
            if connection.raddr and (connection.raddr.ip, connection.raddr.port) == client:
                return pid
    return None


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a RST (SO_LINGER 0), as a crashed client would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
