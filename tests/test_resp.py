"""The subscriber's sans-IO RESP2 core: commands out, replies in, whatever the split."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roomcast.brokers.resp import ProtocolError, ReplyError, ReplyParser, encode_command


def pmessage(channel: bytes, data: bytes) -> bytes:
    parts = [b"pmessage", b"roomcast:0:room:*", channel, data]
    return b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def test_encode_command() -> None:
    assert encode_command("PSUBSCRIBE", "a*", 7, b"\r\n") == (
        b"*4\r\n$10\r\nPSUBSCRIBE\r\n$2\r\na*\r\n$1\r\n7\r\n$2\r\n\r\n\r\n"
    )
    assert encode_command("AUTH", "pässword") == b"*2\r\n$4\r\nAUTH\r\n$9\r\np\xc3\xa4ssword\r\n"


def test_every_reply_kind() -> None:
    parser = ReplyParser()
    parser.feed(b"+OK\r\n-ERR wrong\r\n:42\r\n$-1\r\n*-1\r\n$0\r\n\r\n")
    parser.feed(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    ok, error, number, null, null_array, empty, pong = parser.replies()
    assert (ok, number, null, null_array, empty) == (b"OK", 42, None, None, b"")
    assert pong == [b"pong", b""]
    assert isinstance(error, ReplyError) and str(error) == "ERR wrong"


def test_a_burst_in_one_read_is_every_message_in_order() -> None:
    parser = ReplyParser()
    parser.feed(b"".join(pmessage(b"roomcast:0:room:r", b"M|e|%d|{}" % n) for n in range(500)))
    replies = parser.replies()
    assert [reply[3] for reply in replies] == [b"M|e|%d|{}" % n for n in range(500)]  # type: ignore[index]
    assert parser.replies() == []


@given(st.lists(st.integers(min_value=1, max_value=40), max_size=30), st.binary(max_size=300))
def test_any_split_gives_the_same_replies(cuts: list[int], data: bytes) -> None:
    """Bytes split anywhere (even inside ``\\r\\n`` or a bulk string's body, which may
    itself hold ``\\r\\n``) parse to the same replies, each exactly once."""
    wire = pmessage(b"c", data) + b":1\r\n" + pmessage(b"c\r\n", b"\r\n" + data)
    expected = [
        [b"pmessage", b"roomcast:0:room:*", b"c", data],
        1,
        [b"pmessage", b"roomcast:0:room:*", b"c\r\n", b"\r\n" + data],
    ]
    parser = ReplyParser()
    got = []
    position = 0
    for cut in cuts:
        parser.feed(wire[position : position + cut])
        position += cut
        got += parser.replies()
    parser.feed(wire[position:])
    got += parser.replies()
    assert got == expected


def test_not_resp_is_a_protocol_error() -> None:
    parser = ReplyParser()
    parser.feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(ProtocolError):
        parser.replies()
    parser = ReplyParser()
    parser.feed(b"$abc\r\n")
    with pytest.raises(ProtocolError):
        parser.replies()
