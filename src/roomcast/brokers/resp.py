"""Sans-IO RESP2: encoding commands and parsing replies, for the broker's subscriber.

Pure functions and one incremental parser, no sockets: the subscriber feeds it whatever a
socket read returned (a whole burst of pub/sub messages, or half of one) and takes every
complete reply out at once. Only what a subscribed connection sees is supported: simple
strings, errors, integers, bulk strings (possibly null) and arrays of those.
"""

from __future__ import annotations

from typing import Final, TypeAlias

__all__ = ["ProtocolError", "Reply", "ReplyError", "ReplyParser", "encode_command"]

CRLF: Final = b"\r\n"

Reply: TypeAlias = "bytes | int | ReplyError | list[Reply] | None"


class ProtocolError(Exception):
    """The server sent bytes that are not RESP2."""


class ReplyError(Exception):
    """An error reply (``-ERR ...``), returned in place of a value, never raised by the parser."""


def encode_command(*args: str | bytes | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    pass


class ReplyParser:
    """Incremental RESP2 parser: :meth:`feed` bytes, then take complete :meth:`replies`.

    A reply split across reads stays buffered until the rest arrives; the buffer never
    holds more than one incomplete reply beyond what the caller has not taken yet.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def replies(self) -> list[Reply]:
        """Every complete reply buffered so far, in order.

        :raises ProtocolError: on bytes that cannot be RESP2
        """
        out: list[Reply] = []
        pos = 0
        buffer = self._buffer
        try:
            while pos < len(buffer):
                reply, pos = self._parse(buffer, pos)
                out.append(reply)
        except _Incomplete:
            pass
        finally:
            del buffer[:pos]
        return out

    def _parse(self, buffer: bytearray, pos: int) -> tuple[Reply, int]:
        end = buffer.find(CRLF, pos)
        if end < 0:
            raise _Incomplete
        kind, line = buffer[pos], bytes(buffer[pos + 1 : end])
        pos = end + 2
        if kind == ord("+"):
            return line, pos
        if kind == ord("-"):
            return ReplyError(line.decode(errors="replace")), pos
        if kind == ord(":"):
            return _int(line), pos
        if kind == ord("$"):
            size = _int(line)
            if size < 0:
                return None, pos
            if len(buffer) < pos + size + 2:
                raise _Incomplete
            return bytes(buffer[pos : pos + size]), pos + size + 2
        if kind == ord("*"):
            count = _int(line)
            if count < 0:
                return None, pos
            items: list[Reply] = []
            for _ in range(count):
                item, pos = self._parse(buffer, pos)
                items.append(item)
            return items, pos
        raise ProtocolError(f"unexpected RESP type byte {kind!r}")


def _int(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise ProtocolError(f"not a RESP integer: {line[:20]!r}") from None
