"""A bare WebSocket client on a plain socket (wsproto for framing), for the cases real
client libraries hide: a peer that stops reading with a tiny receive buffer, and a peer
whose socket is killed without a close frame."""

from __future__ import annotations

import socket
import struct
import zlib
from dataclasses import dataclass, field

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    RejectConnection,
    Request,
)
from wsproto.extensions import Extension


@dataclass
class RawWebSocket:
    sock: socket.socket
    conn: WSConnection
    pending: list[Event] = field(default_factory=list)

    def send_text(self, text: str) -> None:
        from wsproto.events import TextMessage

        self.sock.sendall(self.conn.send(TextMessage(data=text)))

    def next_event(self) -> Event:
        """The next WebSocket event, reading from the socket as needed (blocking)."""
        while not self.pending:
            data = self.sock.recv(65536)
            self.conn.receive_data(data or None)
            self.pending.extend(self.conn.events())
            if not data and not self.pending:
                raise ConnectionError("connection closed without a close frame")
        return self.pending.pop(0)

    def next_message(self) -> str | bytes:
        """The next whole message (wsproto hands over large ones in pieces)."""
        parts: list[str | bytes] = []
        while True:
            event = self.next_event()
            if isinstance(event, Message):
                parts.append(event.data)
                if event.message_finished:
                    return parts[0][:0].join(parts)  # type: ignore[arg-type]
            if isinstance(event, CloseConnection):
                raise ConnectionError(f"closed {event.code}")

    def read_until_close(self) -> tuple[int, str, int]:
        """Read everything until the close frame; returns (code, reason, messages read)."""
        messages = 0
        while True:
            event = self.next_event()
            if isinstance(event, CloseConnection):
                return event.code, event.reason, messages
            if isinstance(event, Message) and event.message_finished:
                messages += 1

    def kill(self) -> None:
        """Close the socket with a RST and no close frame, as a crashed client would."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def open_raw_websocket(
    port: int,
    target: str,
    *,
    receive_buffer: int | None = None,
    timeout: float = 10.0,
    host: str = "127.0.0.1",
    subprotocols: list[str] | None = None,
    extensions: list[Extension] | None = None,
) -> RawWebSocket:
    """Connect and complete the handshake; ``receive_buffer`` sets SO_RCVBUF before
    connecting, so the advertised TCP window stays tiny from the start; ``extensions``
    are offered (``PerMessageDeflate()``, as browsers do)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(timeout)
    sock.connect((host, port))
    conn = WSConnection(ConnectionType.CLIENT)
    request = Request(
        host=f"{host}:{port}",
        target=target,
        subprotocols=subprotocols or [],
        extensions=extensions or [],
    )
    sock.sendall(conn.send(request))
    ws = RawWebSocket(sock, conn)
    event = ws.next_event()
    if isinstance(event, RejectConnection):
        sock.close()
        raise ConnectionError(f"handshake rejected with HTTP {event.status_code}")
    assert isinstance(event, AcceptConnection), event
    assert event.extensions or not extensions, "the server declined the offered extensions"
    return ws


def deflated(data_chunk: bytes, repeat: int) -> bytes:
    """``data_chunk * repeat`` compressed as one permessage-deflate message payload (send
    it in a frame with RSV1 set)."""
    compressor = zlib.compressobj(wbits=-15)
    out = b"".join(compressor.compress(data_chunk) for _ in range(repeat))
    out += compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]
