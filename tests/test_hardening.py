"""roomcast.launcher.hardening's bounded inflation, sans-IO: wsproto connections in memory.

Hypercorn compares a message with ``websocket_max_message_size`` only after wsproto has
inflated it (in characters, for text). ``BoundedPerMessageDeflate`` must hand on enough for
that check to fire (more than the limit, whatever the characters, cut on a character),
never much more (a bounded multiple, whatever the compression ratio), and count a message
in many frames as one.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib

import pytest
from hypercorn.protocol.ws_stream import FrameTooLargeError, WebsocketBuffer
from wsproto.connection import Connection, ConnectionType
from wsproto.events import Message, TextMessage
from wsproto.extensions import PerMessageDeflate

from roomcast.launcher.hardening import INFLATE_FACTOR, BoundedPerMessageDeflate

LIMIT = 64 * 1024


def pair(limit: int = LIMIT) -> tuple[Connection, Connection]:
    """A client and a server that negotiated permessage-deflate (the server bounded)."""
    bounded = BoundedPerMessageDeflate()
    assert bounded.accept("permessage-deflate") is not None
    bounded.max_message_size = limit
    offered = PerMessageDeflate()
    offered.finalize("permessage-deflate")
    return Connection(ConnectionType.CLIENT, [offered]), Connection(
        ConnectionType.SERVER, [bounded]
    )


def deliver(client: Connection, server: Connection, *messages: TextMessage) -> list[Message]:
    """What the server's wsproto hands on (messages only) for ``messages`` from the client."""
    server.receive_data(b"".join(client.send(message) for message in messages))
    return [event for event in server.events() if isinstance(event, Message)]


def size_check(events: list[Message]) -> bool:
    """Whether Hypercorn's own check (its ``WebsocketBuffer``) refuses what was handed on."""
    buffer = WebsocketBuffer(LIMIT)
    try:
        for event in events:
            buffer.extend(event)
    except FrameTooLargeError:
        return True
    return False


def test_a_message_within_the_limit_is_inflated_whole() -> None:
    client, server = pair()
    text = "hello, roomcast " * 4000  # 64,000 characters
    events = deliver(client, server, TextMessage(text), TextMessage("and the next"))
    assert "".join(str(e.data) for e in events) == text + "and the next"
    assert not size_check(events[:-1])


@pytest.mark.parametrize(
    "character", ["a", "é", "€", "😀"], ids=["1-byte", "2-byte", "3-byte", "4-byte"]
)
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_a_bomb_is_cut_where_the_size_check_still_fires(character: str, offset: int) -> None:
    """However many bytes its characters take, what is handed on exceeds the limit in
    characters (so Hypercorn answers 1009) and stays within the inflation budget."""
    client, server = pair()
    text = "x" * offset + character * (2 * LIMIT)
    events = deliver(client, server, TextMessage(text))
    handed_on = "".join(str(e.data) for e in events)
    assert len(handed_on) > LIMIT
    assert len(handed_on.encode()) <= INFLATE_FACTOR * (LIMIT + 1) + 3
    assert size_check(events)


def test_a_60_mb_bomb_allocates_a_bounded_multiple_of_the_limit() -> None:
    client, server = pair()
    data = client.send(TextMessage("a" * 60_000_000))
    assert len(data) < LIMIT  # small on the wire
    tracemalloc.start()
    try:
        server.receive_data(data)
        events = [e for e in server.events() if isinstance(e, Message)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size_check(events)
    assert peak < 4 * INFLATE_FACTOR * LIMIT, f"{peak} bytes allocated"


def fragmented_bomb(fragments: int, each: bytes) -> bytes:
    """One compressed text message in ``fragments`` masked frames, each inflating to
    ``each`` (a sync flush per frame, so every frame inflates on arrival)."""
    compressor = zlib.compressobj(wbits=-15)
    frames = []
    for i in range(fragments):
        last = i == fragments - 1
        payload = compressor.compress(each) + compressor.flush(zlib.Z_SYNC_FLUSH)
        payload = payload[:-4] if last else payload
        first = (0x80 if last else 0) | ((0x40 | 0x1) if i == 0 else 0)
        assert len(payload) < 126
        frames.append(struct.pack("!BB", first, 0x80 | len(payload)) + bytes(4) + payload)
    return b"".join(frames)


def test_a_fragmented_bomb_is_counted_across_its_frames() -> None:
    """The budget is per message, not per frame: 64 frames of 64 KiB each stop at it."""
    _, server = pair()
    server.receive_data(fragmented_bomb(64, b"c" * LIMIT))
    events = [e for e in server.events() if isinstance(e, Message)]
    handed_on = sum(len(str(e.data)) for e in events)
    assert LIMIT < handed_on <= INFLATE_FACTOR * (LIMIT + 1) + 3
    assert size_check(events)
