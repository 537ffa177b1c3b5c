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
from collections.abc import Iterator

import pytest
from hypercorn.protocol.ws_stream import FrameTooLargeError, WebsocketBuffer
from wsproto.connection import Connection, ConnectionType
from wsproto.events import Message, TextMessage
from wsproto.extensions import PerMessageDeflate

from roomcast.launcher.hardening import (
    COMPRESSION,
    INFLATE_FACTOR,
    BoundedPerMessageDeflate,
    Compression,
)
from roomcast.settings import COMPRESSION_CHOICES

LIMIT = 64 * 1024
#: what Chromium and Firefox offer in every WebSocket handshake
BROWSER_OFFER = "permessage-deflate; client_max_window_bits"


def pair(limit: int = LIMIT, offer: str = "permessage-deflate") -> tuple[Connection, Connection]:
    """A client and a server that negotiated permessage-deflate (the server bounded)."""
    bounded = BoundedPerMessageDeflate()
    answer = bounded.accept(offer)
    assert answer is not None
    bounded.max_message_size = limit
    offered = PerMessageDeflate()
    offered.finalize(f"permessage-deflate; {answer}")
    return Connection(ConnectionType.CLIENT, [offered]), Connection(
        ConnectionType.SERVER, [bounded]
    )


@pytest.fixture
def compression(request: pytest.FixtureRequest) -> Iterator[Compression]:
    """The class's profile set for one test (as ``install`` sets it), then restored."""
    before = BoundedPerMessageDeflate.compression
    BoundedPerMessageDeflate.compression = COMPRESSION[request.param]
    yield BoundedPerMessageDeflate.compression
    BoundedPerMessageDeflate.compression = before


def test_every_compression_setting_has_a_profile() -> None:
    assert set(COMPRESSION) == set(COMPRESSION_CHOICES)


@pytest.mark.parametrize(
    ("compression", "offer", "answer"),
    [
        ("low-memory", BROWSER_OFFER, "client_max_window_bits=10; client_no_context_takeover"),
        (
            "low-memory",
            "permessage-deflate; server_max_window_bits=12; client_max_window_bits=9",
            "server_max_window_bits=10; client_max_window_bits=9; client_no_context_takeover",
        ),
        ("low-memory", "permessage-deflate", "client_no_context_takeover"),
        (
            "low-memory",
            "permessage-deflate; server_no_context_takeover",
            "server_no_context_takeover; client_no_context_takeover",
        ),
        (
            "no-context",
            BROWSER_OFFER,
            "client_max_window_bits=10; server_no_context_takeover; client_no_context_takeover",
        ),
        ("full", BROWSER_OFFER, "client_max_window_bits=15"),
        ("off", BROWSER_OFFER, None),
        ("low-memory", "permessage-deflate; client_max_window_bits=8", None),
        ("low-memory", "permessage-deflate; server_max_window_bits=16", None),
        ("low-memory", "permessage-deflate; client_no_context_takeover=1", None),
        ("low-memory", "permessage-deflate; x-unknown", None),
    ],
    indirect=["compression"],
)
def test_an_offer_is_answered_as_the_setting_says(
    compression: Compression, offer: str, answer: str | None
) -> None:
    assert BoundedPerMessageDeflate().accept(offer) == answer


@pytest.mark.parametrize("compression", ["low-memory"], indirect=True)
def test_the_first_acceptable_offer_is_the_one_answered(compression: Compression) -> None:
    extension = BoundedPerMessageDeflate()
    assert extension.accept("permessage-deflate; client_max_window_bits=9") is not None
    assert extension.accept(BROWSER_OFFER) is None
    assert extension.client_max_window_bits == 9


@pytest.mark.parametrize("compression", ["low-memory", "no-context"], indirect=True)
def test_a_low_memory_connection_keeps_no_inflater_between_messages(
    compression: Compression,
) -> None:
    """The client resets its context, so the server's zlib inflate state (7 KB and its
    window) exists only while a message is inflated; what the server sends still
    round-trips, its deflater kept only if the profile keeps the server's context."""
    client, server = pair(offer=BROWSER_OFFER)
    for text in ("hello, roomcast", "hello again, roomcast", "and once more"):
        assert [str(e.data) for e in deliver(client, server, TextMessage(text))] == [text]
        (extension,) = server._proto.extensions
        assert isinstance(extension, BoundedPerMessageDeflate)
        assert extension._decompressor is None
        client.receive_data(server.send(TextMessage(text.upper())))
        assert [str(e.data) for e in client.events() if isinstance(e, Message)] == [text.upper()]
        assert (extension._compressor is not None) is compression.server_context_takeover


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
