"""What roomcast installs into Hypercorn wherever it is served, plain ``hypercorn`` included.

``python -m roomcast`` runs its own Trio serving loop (:mod:`.trio_server`), but people
serve ``roomcast.app:app`` the documented Hypercorn way too: ``hypercorn --worker-class
trio roomcast.app:app``. Hypercorn 0.18 breaks three of roomcast's guarantees there, each
for bytes any anonymous client can send (the last two found by a hostile pass on this
module's first version):

- **One connection ends its worker.** An upgrade request followed, in the same TCP write,
  by anything at all makes the Trio worker's h11 layer raise, and ``worker_serve`` lets
  that end the worker with every room in it (pgjones/hypercorn#225).
- **A compressed message is inflated whole.** wsproto inflates a whole socket read before
  Hypercorn compares the message with ``websocket_max_message_size``: 57 kB of
  permessage-deflate on the wire made the server allocate ~180 MB before it answered 1009.
- **A close is forgotten.** After Hypercorn sends 1009 it tells the app nothing until the
  peer answers the close frame; a peer that never answers stays a member of its room for
  as long as it keeps its socket (and everything it sends is appended to the refused
  message). A stream Hypercorn refuses with 400 after starting the app (data before the
  accept) is never reported to the app at all.
- **HTTP/2 flow control does not hold back a writer** whose peer's window is shut.

:func:`install` mends all three from inside the worker process, once, when the app's
lifespan starts (which Hypercorn runs before it builds its connection handler, so every
connection gets the mended classes). It replaces module attributes Hypercorn looks up when
it serves (``hypercorn.trio.run.TCPServer``, the ``WSStream`` of the h11 and h2 protocols,
``PerMessageDeflate`` of the WebSocket handshake, HTTP/2's ``StreamBuffer`` and
``H2Protocol``), with subclasses that change one thing each:

- :class:`ServedTCPServer` is the launcher's :class:`~.trio_server.ContainedTCPServer`
  (containment, prompt release, direct writes) for ``worker_serve``'s per-connection
  ``partial(TCPServer, app, config, context, state)``: one connection's failure is that
  connection's, under plain Hypercorn as under the launcher. The asyncio worker needs no
  such class: asyncio logs a failed connection task and the worker goes on.
- :class:`BoundedPerMessageDeflate` inflates each message at most
  :data:`INFLATE_FACTOR` times the message size limit (bytes, as a text message's
  characters take at most four): past that it stops inflating and hands on what reaches
  the limit, so Hypercorn's own size check answers 1009 as for an uncompressed message.
- :class:`ClosingWSStream` drops a connection whose peer has not answered a close frame
  the server sent within :data:`CLOSE_TIMEOUT` seconds: the app hears
  ``websocket.disconnect`` (so the member leaves its room) and the socket closes; and it
  tells the app of a stream refused before the accept.
- :class:`FlowControlledStreamBuffer` and :class:`ClosingH2Protocol`: an HTTP/2 stream's
  writer waits while the peer's window is shut, and is released when the stream ends.
- :class:`UpgradedH11Protocol` drops h11's connection state once a WebSocket's 101 is
  written (not a guarantee: memory, 0.8 KB per idle connection), and
  :class:`ClosingWSStream` the parsed handshake once accepted.
- :class:`~.trio_inbox.InboxTaskGroup` (``hypercorn.trio.tcp_server.TaskGroup``) gives
  each app a small queue of its own instead of a trio memory channel (memory again).
- :class:`IdleDeflaters` frees a connection's deflater once it is quiet, and the
  :class:`~.pinger.Pinger` pings every WebSocket from one task instead of a task each
  (memory). They are state, so they are not installed here: roomcast's runtime creates
  them per lifespan, and :class:`ClosingWSStream` finds them through the lifespan state
  in its scope.
- Each accepted socket gets ``TCP_USER_TIMEOUT`` (``ROOMCAST_SEND_TIMEOUT``), which the
  launcher sets on the listening sockets it binds: a peer that never reads what it is
  sent is ended by the kernel, the only end for a write Hypercorn's Trio worker shields.

The launcher's workers get the same classes the same way (its serving loop uses
:class:`~.trio_server.ContainedTCPServer` directly). What stays the launcher's alone is
what no worker can do for itself: replacing a dead worker, ending the workers with the
master, one ``/metrics`` for all workers, raising the fd limit and pausing accepts at it.
Hypercorn releases other than the ones the internals tests describe
(``tests/test_launcher.py::TestHypercornInternals``, :data:`.trio_write.SUPPORTED`) keep
their own behaviour, with a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import sys
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, NoReturn

import anyio
import anyio.lowlevel
from hypercorn.protocol.events import Body, Data, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import BUFFER_LOW_WATER, H2Protocol, StreamBuffer
from hypercorn.protocol.h11 import H11Protocol, H11WSConnection
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.typing import WebsocketAcceptEvent, WebsocketScope
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Ping
from wsproto.events import Event as WSProtoEvent
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

from . import trio_write
from .logs import configure_logging
from .pinger import Pinger
from .sockets import set_send_timeout

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFLATER_IDLE",
    "INFLATE_FACTOR",
    "RUNTIME_KEY",
    "BoundedPerMessageDeflate",
    "ClosingWSStream",
    "IdleDeflaters",
    "install",
]

#: seconds a peer has to answer a close frame the server sent before it is dropped
CLOSE_TIMEOUT = 5.0
#: a compressed message is inflated to at most this many times the message size limit
INFLATE_FACTOR = 4
#: until the stream sets the configured limit (before any frame of a well-behaved client)
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024
#: seconds a connection's deflater outlives its last compressed message (then freed; the
#: next message gets a new one)
DEFLATER_IDLE = 10.0
#: deflaters freed (about 14 KB each at ``low-memory``) before the worker hands their
#: memory back to the system (glibc's ``malloc_trim``, which walks the whole heap)
TRIM_AFTER = 256
#: a compressed message is never inflated past INFLATE_FACTOR times this, whatever
#: ``websocket_max_message_size`` says (Hypercorn's default is 16 MiB): beyond it the
#: connection is dropped (wsproto's 1009, without a close frame)
INFLATE_CEILING = 256 * 1024
#: deflaters an idle sweep frees between two checkpoints
RELEASE_PER_PASS = 256
#: where roomcast's runtime waits in the lifespan state (``roomcast.runtime.STATE_KEY``,
#: which this module does not import: the runtime imports the whole app)
RUNTIME_KEY: Final = "roomcast"

log = logging.getLogger("roomcast.hardening")


@dataclass(frozen=True, slots=True)
class Compression:
    """How the server negotiates permessage-deflate (``ROOMCAST_COMPRESSION``).

    What an idle connection holds is the zlib state of each direction that keeps its
    context between messages: deflate's is about ``2 ** (window_bits + 2) + 2 **
    (mem_level + 9)`` bytes (262 KB at wsproto's 15 and 8), inflate's 7 KB plus its
    window. A direction without context takeover has zlib state only while it
    (de)compresses a message.
    """

    #: whether the extension is accepted at all
    accept: bool = True
    #: the largest LZ77 window the server compresses with and the client may use (9-15)
    window_bits: int = 15
    #: zlib's memLevel of the server's compressor (1-9): its hash table and buffers
    mem_level: int = 8
    #: whether the server keeps its compressor (and its window) between messages
    server_context_takeover: bool = True
    #: whether the client may keep its compressor between messages (then the server keeps
    #: a decompressor for the connection's life)
    client_context_takeover: bool = True


#: ``ROOMCAST_COMPRESSION``'s values
COMPRESSION: dict[str, Compression] = {
    "off": Compression(accept=False),
    "low-memory": Compression(window_bits=10, mem_level=3, client_context_takeover=False),
    "no-context": Compression(
        window_bits=10, mem_level=3, server_context_takeover=False, client_context_takeover=False
    ),
    "full": Compression(),
}


class BoundedPerMessageDeflate(PerMessageDeflate):
    """wsproto's permessage-deflate, inflating each message at most about
    ``INFLATE_FACTOR * max_message_size`` bytes.

    Once a message reaches that bound the rest of it is not inflated at all: its frames'
    payloads are dropped. What was handed on already exceeds the limit (in bytes, and in
    characters for text), so Hypercorn closes 1009 before the message could be delivered.
    The connection's zlib stream is then unusable, which does not matter: it is closing.
    """

    #: what the server accepts: :func:`install` sets it from ``ROOMCAST_COMPRESSION``
    compression = COMPRESSION["low-memory"]
    #: where the deflater is noted and freed once idle: the app's runtime's, which
    #: :class:`ClosingWSStream` hands over once the extension is negotiated (None: kept)
    idle_deflaters: IdleDeflaters | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_message_size = DEFAULT_MAX_MESSAGE_SIZE
        self._inflated = 0  # bytes of the current message so far
        self._inbound_text = False
        self.noted_at = -math.inf  # when :class:`IdleDeflaters` last noted a message

    def accept(self, offer: str) -> str | None:
        """The response to one offer of the extension, as :attr:`compression` says, or
        None to decline it.

        wsproto's own answer echoes the client's window sizes and keeps both contexts:
        a deflate state of 262 KB for each connection's life (RFC 7692 lets the server
        shrink both windows it is offered and ask for ``client_no_context_takeover``,
        offered or not). The first offer accepted is the one answered.
        """
        profile = self.compression
        if not profile.accept or self._enabled:
            return None
        try:
            offered = _offer_parameters(offer)
        except ValueError:
            return None
        answer = []
        server_bits = profile.window_bits
        if "server_max_window_bits" in offered:
            server_bits = min(server_bits, offered["server_max_window_bits"] or 15)
            answer.append(f"server_max_window_bits={server_bits}")
        client_bits = 15  # a client not offering the parameter may use the largest window
        if "client_max_window_bits" in offered:
            client_bits = min(profile.window_bits, offered["client_max_window_bits"] or 15)
            answer.append(f"client_max_window_bits={client_bits}")
        if "server_no_context_takeover" in offered or not profile.server_context_takeover:
            self.server_no_context_takeover = True
            answer.append("server_no_context_takeover")
        if "client_no_context_takeover" in offered or not profile.client_context_takeover:
            self.client_no_context_takeover = True
            answer.append("client_no_context_takeover")
        self.server_max_window_bits = server_bits
        self.client_max_window_bits = client_bits
        self._enabled = True
        return "; ".join(answer)

    def frame_outbound(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        data: bytes,
        fin: bool,
    ) -> tuple[RsvBits, bytes]:
        if self._compressor is None and opcode in (Opcode.TEXT, Opcode.BINARY):
            # wsproto would build it with zlib's default memLevel (8: 256 KB of hash
            # table and buffers, whatever the window)
            self._compressor = zlib.compressobj(
                zlib.Z_DEFAULT_COMPRESSION,
                zlib.DEFLATED,
                -self.server_max_window_bits,
                self.compression.mem_level,
            )
        framed = super().frame_outbound(proto, opcode, rsv, data, fin)
        if self._compressor is not None and self.idle_deflaters is not None:
            self.idle_deflaters.used(self)
        return framed

    def release_deflater(self) -> None:
        """Let go of the deflater between messages; the next message gets a new one.

        Allowed with context takeover too: RFC 7692 lets the server use the previous
        messages' window, never obliges it to. A new deflater's output refers to nothing
        before its own start, which the client's inflater, keeping its window, reads
        like any other message."""
        self._compressor = None
        self.noted_at = -math.inf  # the next message is noted at once

    @property
    def _budget(self) -> int:
        # n bytes of UTF-8 hold at least (n - 3) / 4 whole characters (at most 3 bytes of a
        # character can wait for the rest): this many always exceed the limit, text or not
        return INFLATE_FACTOR * (min(self.max_message_size, INFLATE_CEILING) + 1) + 3

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        if opcode in (Opcode.TEXT, Opcode.BINARY):  # a message's first frame
            self._inbound_text = opcode is Opcode.TEXT
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        if self._inflated >= self._budget:
            return b""
        assert self._decompressor is not None
        try:
            # max_length 0 would mean "no limit": the budget check above keeps it positive
            inflated = self._decompressor.decompress(data, self._budget - self._inflated)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(inflated)
        if self._inflated >= self._budget and self.max_message_size > INFLATE_CEILING:
            return CloseReason.MESSAGE_TOO_BIG  # what was handed on may be within the limit
        if self._inflated >= self._budget and self._inbound_text:
            # cut on a character: a dangling part would fail the message as invalid UTF-8
            # (1007, and no close frame) before Hypercorn's size check could answer 1009
            return _whole_characters(inflated)
        return inflated

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not (fin and self._inbound_is_compressible):  # a frame, or a ping amid a message
            return super().frame_inbound_complete(proto, fin)
        overflowed = self._inflated >= self._budget
        self._inflated = 0
        if overflowed:
            self._inbound_compressed = None  # its rest was dropped: nothing to flush
            return None
        return super().frame_inbound_complete(proto, fin)


class IdleDeflaters:
    """The connections of one app's runtime that hold a deflater between messages, least
    recently used first: :meth:`run` frees those unused for :data:`DEFLATER_IDLE` seconds.

    A connection keeps its deflater (14 KB at ``low-memory``) while its room talks and
    gives it up when it goes quiet: idle browsers cost what those without compression do.
    roomcast's runtime creates one when its lifespan starts and runs :meth:`run` in its
    task group (so it ends with the lifespan, and two apps in one process keep theirs
    apart); each connection's stream finds it through the lifespan state in its scope
    (:func:`_idle_deflaters_of`). Only the loop that runs that lifespan and its
    connections touches it. The weak references let a closed connection's extension go at
    once: nothing here keeps a connection's deflater alive.
    """

    def __init__(self) -> None:
        #: (an ordered dict: taking the oldest is O(1), where a dict's first item is found
        #: past every entry deleted before it, which made a sweep of n quadratic)
        self._last_use: OrderedDict[int, tuple[weakref.ref[BoundedPerMessageDeflate], float]]
        self._last_use = OrderedDict()

    def __len__(self) -> int:
        return len(self._last_use)

    def used(self, extension: BoundedPerMessageDeflate) -> None:
        """Note a message compressed now; at most once a second per connection (a frame
        costs a clock read, not a dictionary move): an idle time is counted from up to
        a second before the connection's last message."""
        now = time.monotonic()
        if now - extension.noted_at < 1.0:
            return
        extension.noted_at = now
        key = id(extension)
        self._last_use[key] = (weakref.ref(extension), now)
        self._last_use.move_to_end(key)  # the most recently used last

    def release_idle(self, idle: float = DEFLATER_IDLE, most: float = math.inf) -> int:
        """Free the deflaters unused for ``idle`` seconds, at most ``most`` of them;
        returns how many."""
        released = 0
        oldest = time.monotonic() - idle
        while self._last_use and released < most:
            key, (ref, last_use) = next(iter(self._last_use.items()))
            extension = ref()
            if extension is not None and last_use > oldest:
                break
            del self._last_use[key]
            if extension is not None:
                extension.release_deflater()
                released += 1
        return released

    async def run(self) -> NoReturn:
        """Free the deflaters of connections idle for :data:`DEFLATER_IDLE` seconds, every
        half of that, and hand the memory back, until cancelled (the lifespan's end).

        Freeing alone did not lower the worker's RSS (5,000 idle browsers: 51.0 KB each
        before and after): glibc keeps a freed deflater's pages in its heap, between the
        objects that stay. ``malloc_trim`` returns the whole free pages among them: 39.6
        KB. It walks the whole heap (about 40 ms for 200 MB, the loop waiting), so it runs
        only once :data:`TRIM_AFTER` deflaters were freed since the last one.
        """
        freed = 0
        try:
            while True:
                await anyio.sleep(DEFLATER_IDLE / 2)
                freed += await self.sweep()
                if freed >= TRIM_AFTER and _malloc_trim is not None:
                    _malloc_trim(0)
                    freed = 0
        finally:
            self._last_use.clear()  # a connection still open then keeps its deflater

    async def sweep(self) -> int:
        """Free every deflater unused for :data:`DEFLATER_IDLE` seconds, letting the loop
        run after each :data:`RELEASE_PER_PASS` (10,000 connections going quiet together
        held it 20-30 ms in one pass); returns how many were freed."""
        freed = 0
        while released := self.release_idle(DEFLATER_IDLE, RELEASE_PER_PASS):
            freed += released
            await anyio.lowlevel.checkpoint()
        return freed


def _idle_deflaters_of(scope: WebsocketScope) -> IdleDeflaters | None:
    """The idle deflaters of the roomcast runtime whose lifespan state reached this
    connection's scope (Hypercorn copies the lifespan state into each connection's), or
    None: an app other than roomcast served by this Hypercorn, or no lifespan state. Then
    the connection's deflater is not freed early: it lives as long as the connection."""
    registry = getattr(_runtime_of(scope), "idle_deflaters", None)
    return registry if isinstance(registry, IdleDeflaters) else None


def _pinger_of(scope: WebsocketScope) -> Pinger | None:
    """The pinger of the roomcast runtime that serves this connection, as
    :func:`_idle_deflaters_of` finds its registry, or None: Hypercorn's ping task then."""
    pinger = getattr(_runtime_of(scope), "pinger", None)
    return pinger if isinstance(pinger, Pinger) else None


def _runtime_of(scope: WebsocketScope) -> object:
    state: Mapping[str, Any] = scope.get("state") or {}
    return state.get(RUNTIME_KEY)


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is another (musl, macOS)."""
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _glibc_malloc_trim()


def _offer_parameters(offer: str) -> dict[str, int | None]:
    """The parameters of one ``permessage-deflate`` offer: a window size's value (None
    when given without one), None for the others.

    :raises ValueError: for a window size outside 9-15 (zlib cannot inflate a raw stream
        with an 8-bit window) or a parameter RFC 7692 does not define
    """
    parameters: dict[str, int | None] = {}
    for part in offer.split(";")[1:]:
        name, _, value = (piece.strip() for piece in part.partition("="))
        if name not in _DEFLATE_PARAMETERS or name in parameters:
            raise ValueError(f"bad permessage-deflate parameter {part!r}")
        if value and name.endswith("no_context_takeover"):
            raise ValueError(f"{name} takes no value")
        bits = int(value.strip('"')) if value else None
        if bits is not None and not 9 <= bits <= 15:
            raise ValueError(f"window bits {bits} out of 9-15")
        parameters[name] = bits
    return parameters


_DEFLATE_PARAMETERS = frozenset(
    {
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    }
)


def _whole_characters(utf8: bytes) -> bytes:
    """``utf8`` less a character cut short at its end (up to 3 bytes of one)."""
    for back in range(1, min(4, len(utf8)) + 1):
        byte = utf8[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: where the last character starts
            length = 1 if byte < 0x80 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return utf8 if length <= back else utf8[:-back]
    return utf8


class ClosingWSStream(WSStream):
    """Hypercorn's WebSocket stream, which never leaves the app or its room waiting.

    - **A close is never waited on forever.** A close frame the server sends (Hypercorn's
      own 1009, or the app's close) gives the peer :data:`CLOSE_TIMEOUT` seconds to
      answer; then the stream ends itself: the app is told ``websocket.disconnect`` (1006)
      and the connection closes. The wait starts before the frame is written (over HTTP/2
      the write itself can wait on flow control) and ends when the stream does, so it never
      outlives its connection. Meanwhile what the peer sends is dropped, not buffered:
      Hypercorn would append every later message to the one it refused.
    - **A refused stream tells the app.** Data that comes before the app accepted (an
      upgrade request with bytes pipelined after it) makes Hypercorn answer 400 and mark
      the stream closed, after it has started the app; it then drops the app's accept and
      sends and never tells it the stream ended, so a chat member would stay in its room,
      holding its name and socket, forever. The stream tells the app and ends.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the stream has ended; waited on only once closing (most streams never wait)
        self._ended: anyio.Event | None = None
        self._closing = False
        self._pinging = False  # a ping task of the pinger's is writing or waiting to

    async def handle(self, event: Any) -> None:
        if self._closing and not self.closed and isinstance(event, Data):
            await self._discard_until_closed(event.data)
            return
        refused_now = isinstance(event, (Body, Data)) and not self.closed
        await super().handle(event)
        if isinstance(event, StreamClosed):
            self._ended = self._ended or anyio.Event()
            self._ended.set()
        elif refused_now and self.closed and self.app_put is not None:
            await self.app_put({"type": "websocket.disconnect", "code": 1006})
            await self.send(StreamClosed(stream_id=self.stream_id))

    async def _discard_until_closed(self, data: bytes) -> None:
        """After the server's close: read only the peer's close, drop everything else."""
        self.buffer.clear()
        self.connection.receive_data(data)
        for event in self.connection.events():
            if isinstance(event, CloseConnection):
                await self.send(StreamClosed(stream_id=self.stream_id))
                return

    async def _accept(self, message: WebsocketAcceptEvent) -> None:
        await super()._accept(message)  # builds the connection and its extensions
        for extension in self.connection._proto.extensions:  # the negotiated ones
            if isinstance(extension, BoundedPerMessageDeflate):
                extension.max_message_size = self.config.websocket_max_message_size
                extension.idle_deflaters = _idle_deflaters_of(self.scope)
        # The request's parsed handshake (its header lists) is needed no more: Hypercorn
        # asks only whether it was accepted (0.4 KB per idle connection).
        self.handshake = _ACCEPTED

    async def _send_pings(self) -> None:
        """Hypercorn's ping task, which pings, sleeps ``websocket_ping_interval`` and
        repeats for the connection's life, pings once, then hands the connection to its
        runtime's :class:`~.pinger.Pinger` and ends (4 KB less per idle connection). Where
        no runtime is found, or the task group is not the Trio worker's that can start a
        lone ping (:meth:`ping_soon`), it is Hypercorn's task."""
        pinger = _pinger_of(self.scope)
        interval = self.config.websocket_ping_interval  # (set: Hypercorn started this task)
        if pinger is None or interval is None or not hasattr(self.task_group, "try_spawn"):
            await super()._send_pings()
            return
        await self._send_wsproto_event(Ping())
        pinger.add(self, interval)

    def ping_soon(self) -> bool:
        """Start a task in this connection's task group that sends one ping, unless the
        last one is still waiting to be written: a peer that does not read blocks that
        one task (see :mod:`.pinger`), and no more pile up behind it."""
        if self._pinging:
            return True
        try_spawn: Callable[[Callable[[], Awaitable[None]]], bool] = self.task_group.try_spawn  # type: ignore[attr-defined]
        self._pinging = try_spawn(self._ping)
        return self._pinging

    async def _ping(self) -> None:
        try:
            if not self.closed:
                await self._send_wsproto_event(Ping())
        finally:
            self._pinging = False

    async def _send_wsproto_event(self, event: WSProtoEvent) -> None:
        if (
            isinstance(event, CloseConnection)
            and not self._closing
            and self.connection.state is ConnectionState.OPEN
        ):
            self._closing = True
            # (asyncio's task group refuses new tasks once it is shutting down: the
            # connection is ending then anyway, and the close frame must still go out)
            with contextlib.suppress(RuntimeError):
                self.task_group.spawn(self._drop_unless_answered)
        await super()._send_wsproto_event(event)

    async def _drop_unless_answered(self) -> None:
        self._ended = self._ended or anyio.Event()
        with anyio.move_on_after(CLOSE_TIMEOUT):
            await self._ended.wait()
            return
        await self.send(StreamClosed(stream_id=self.stream_id))


class _Accepted:
    """What an accepted stream keeps of its handshake."""

    accepted = True


_ACCEPTED: Any = _Accepted()


class FlowControlledStreamBuffer(StreamBuffer):
    """Hypercorn's HTTP/2 send buffer of one stream, whose writer waits while the peer's
    flow-control window is shut.

    Hypercorn's ``pop`` resumes a waiting writer whenever it hands out less than the low
    water mark, which a zero window always does (it hands out nothing): a WebSocket peer
    that never opens its window then made the server buffer everything its rooms said,
    without bound and without the outbox ever filling (no 4008). Here a writer resumes
    once what is buffered is below the low water mark.
    """

    async def pop(self, max_length: int) -> bytes:
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if len(self.buffer) < BUFFER_LOW_WATER:
            await self._paused.set()
        if not self.buffer:
            await self._is_empty.set()
        return data


class ClosingH2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 protocol, which releases a stream's writer when the stream ends
    (reset by the peer, or dropped by :class:`ClosingWSStream`), instead of leaving it
    waiting on a window that will never open."""

    async def _close_stream(self, stream_id: int) -> None:
        await super()._close_stream(stream_id)
        buffer = self.stream_buffers.get(stream_id)
        if buffer is not None and not buffer.complete:
            await buffer.close()


class UpgradedH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, which lets go of h11's connection once a WebSocket
    upgrade is answered.

    Hypercorn keeps the h11 ``Connection`` (its state machine, reader and receive buffer)
    inside the WebSocket pass-through for the connection's whole life, but uses it only to
    write the handshake's response: from the 101 on, every frame goes out as raw data.
    Dropping it is 0.8 KB less per idle WebSocket. So is its ``can_read`` event, which
    pauses reading between pipelined HTTP requests: a WebSocket has none (0.3 KB).
    """

    async def stream_send(self, event: StreamEvent) -> None:
        await super().stream_send(event)
        if (
            isinstance(event, Response)
            and event.status_code == 101
            and isinstance(self.connection, H11WSConnection)
        ):
            self.connection.h11_connection = _UPGRADED
            self.can_read = _UPGRADED


class _Upgraded:
    """What an upgraded connection has instead of h11's connection and its ``can_read``
    event: nothing more to write in HTTP, no request to wait for."""

    def send(self, event: object) -> bytes:
        raise RuntimeError(f"an HTTP event after the WebSocket upgrade: {event!r}")

    async def set(self) -> None:
        pass

    async def clear(self) -> None:
        pass

    async def wait(self) -> None:
        raise RuntimeError("waiting to read the next HTTP request after a WebSocket upgrade")


_UPGRADED: Any = _Upgraded()


def install(send_timeout: float, compression: str = "low-memory") -> bool:
    """Install the classes above into the Hypercorn serving this process, once, with
    ``TCP_USER_TIMEOUT`` of ``send_timeout`` seconds on each accepted socket, and
    permessage-deflate negotiated as ``compression`` (a key of :data:`COMPRESSION`) from
    then on: one setting per process (Hypercorn builds the extension knowing nothing of
    the app), the last app started deciding for tests that serve several in one process.

    Returns whether they are installed: not when the process is not served by Hypercorn
    (another ASGI server, a test's own loop) nor on an untested Hypercorn release, which
    keeps its own behaviour (with a warning). Under plain Hypercorn, which configures only
    its own loggers, roomcast's log lines (``roomcast.*``) go to stderr from here on, in
    Hypercorn's format.
    """
    if "hypercorn.protocol" not in sys.modules:
        return False
    if not logging.getLogger().handlers:  # plain Hypercorn configures only its own loggers
        configure_logging()
    if not trio_write.SUPPORTED:
        log.warning(
            "roomcast: Hypercorn %s is not one whose internals roomcast's containment is "
            "tested with (0.17, 0.18); it keeps its own behaviour",
            trio_write.hypercorn_version(),
        )
        return False
    import hypercorn.protocol.h2
    import hypercorn.protocol.h11
    import hypercorn.protocol.ws_stream

    BoundedPerMessageDeflate.compression = COMPRESSION[compression]
    if hypercorn.protocol.h11.WSStream is ClosingWSStream:  # type: ignore[attr-defined]
        return True
    hypercorn.protocol.ws_stream.PerMessageDeflate = BoundedPerMessageDeflate  # type: ignore[attr-defined]
    hypercorn.protocol.h11.WSStream = ClosingWSStream  # type: ignore[attr-defined]
    hypercorn.protocol.h2.WSStream = ClosingWSStream  # type: ignore[attr-defined]
    hypercorn.protocol.h2.StreamBuffer = FlowControlledStreamBuffer  # type: ignore[misc]
    hypercorn.protocol.H2Protocol = ClosingH2Protocol  # type: ignore[attr-defined]
    hypercorn.protocol.H11Protocol = UpgradedH11Protocol  # type: ignore[attr-defined]
    _install_connection_handlers(send_timeout)
    log.info(
        "roomcast: Hypercorn %s hardened: each connection contained, compressed messages "
        "inflated within %dx websocket_max_message_size (compression %s), unanswered "
        "closes dropped after %g s, unread data ends a connection after %g s",
        trio_write.hypercorn_version(),
        INFLATE_FACTOR,
        compression,
        CLOSE_TIMEOUT,
        send_timeout,
    )
    return True


def _install_connection_handlers(send_timeout: float) -> None:
    """The per-connection handler of whichever Hypercorn worker loop runs here: looked up
    by name when the loop starts accepting, which is after the lifespan started."""
    trio_run = sys.modules.get("hypercorn.trio.run")
    if trio_run is not None:
        from .trio_server import ServedTCPServer

        trio_run.TCPServer = partial(ServedTCPServer, send_timeout=send_timeout)  # type: ignore[attr-defined]
    trio_tcp_server = sys.modules.get("hypercorn.trio.tcp_server")
    if trio_tcp_server is not None:
        from .trio_inbox import InboxTaskGroup

        trio_tcp_server.TaskGroup = InboxTaskGroup  # type: ignore[attr-defined]
    asyncio_run = sys.modules.get("hypercorn.asyncio.run")
    if asyncio_run is not None:
        asyncio_run.TCPServer = partial(_timed_asyncio_server(), send_timeout=send_timeout)  # type: ignore[attr-defined]


def _timed_asyncio_server() -> type:
    """Hypercorn's asyncio connection handler, with ``TCP_USER_TIMEOUT`` on its socket.
    (asyncio contains a failed connection on its own: it logs the task's error.)"""
    from hypercorn.asyncio.tcp_server import TCPServer

    class TimedTCPServer(TCPServer):
        def __init__(self, *args: Any, send_timeout: float) -> None:
            super().__init__(*args)
            set_send_timeout(self.writer.get_extra_info("socket"), send_timeout)

    return TimedTCPServer
