"""``roomcast chat``: the terminal client, on trio and trio-websocket.

One session is one trio nursery holding three tasks::

    session
    ├── printer   (server events -> stdout; counts messages, settles acks, sees the close)
    ├── typist    (stdin lines -> chat messages; at EOF waits for acks, then ends the session)
    └── signals   (Ctrl-C / SIGTERM -> end the session cleanly)

Whichever task decides the session is over records an exit code and cancels the nursery;
the WebSocket is then closed once, in one place, with a bounded close handshake. No task
and no thread outlives the session.

Two output modes share that structure. *Interactive* (stdin is a terminal, no ``--json``)
prints events for a human and sends each typed line. *Scripting* (stdin is a pipe or a
file, or ``--json``) prints the server's JSON events verbatim, one per line, and tags each
message with an ``id`` so that, at end of input, it can wait until the server has answered
all of them before it closes.

trio-websocket is imported only when a session connects (see :func:`connect`), so the
server never needs it; :func:`main` names the package if it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import trio

from .protocol import BATCH_SUBPROTOCOL, CloseCode, ErrorCode, ProtocolError, parse_chat_query

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

__all__ = ["main"]

EXIT_OK: Final = 0
#: the server ended the session with an error close code (or the connection was lost)
EXIT_CLOSED: Final = 1
#: bad arguments, or the server could not be reached
EXIT_USAGE: Final = 2

CHAT_PATH: Final = "/ws/chat"
CONNECT_TIMEOUT: Final = 10.0
#: how long our close frame may wait for the server's reply before we drop the socket
CLOSE_TIMEOUT: Final = 2.0
READ_SIZE: Final = 65536
#: error events that answer one message we sent (so it will get no ack)
ANSWERING_ERRORS: Final = frozenset(
    {ErrorCode.RATE_LIMITED, ErrorCode.TOO_LONG, ErrorCode.BAD_ID, ErrorCode.UNAVAILABLE}
)
#: close codes never sent on the wire: the library's way of saying what went missing
LOST_CODES: Final = {1005: "closed without a status code", 1006: "connection lost"}

DESCRIPTION: Final = """\
Join a roomcast chat room from the terminal.

Interactive mode (stdin is a terminal): events are shown as
"[HH:MM:SS] name: text", each typed line is sent, Ctrl-D leaves.

Scripting mode (stdin is a pipe or file, or --json): each non-empty input line
is sent as a message, every server event is printed as one JSON object per
line. At end of input the client waits (up to --linger seconds) until the
server has acknowledged every message, then closes and exits.
"""

EPILOG: Final = """\
exit status:
  0  the session ended normally (end of input, --count reached, closed with 1000)
  1  the server closed the connection with an error code (printed on stderr),
     the connection was lost, or --timeout expired before --count was reached
  2  usage error, or the server could not be reached
  130/143  interrupted by Ctrl-C / SIGTERM (the connection is closed cleanly)

examples:
  roomcast chat ws://127.0.0.1:8000 --room lobby --name alice
  printf 'hello\\nbye\\n' | roomcast chat ws://127.0.0.1:8000/ws/chat?room=lobby
  roomcast chat ws://127.0.0.1:8000 --room lobby --count 10 < /dev/null
"""


class UsageError(Exception):
    """The command line cannot be turned into a session."""


class CannotConnect(Exception):
    """The WebSocket handshake did not complete."""


class Closed(Exception):
    """The connection ended; ``code`` and ``reason`` as the server sent them."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


# -- command line ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line asks for, validated."""

    url: str
    token: str | None
    interactive: bool
    batch: bool
    count: int | None
    timeout: float | None
    linger: float


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roomcast chat",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "url",
        metavar="URL",
        help="ws:// or wss:// address; without a path, /ws/chat is used",
    )
    parser.add_argument("--room", help="room to join (overrides room= in URL)")
    parser.add_argument("--name", help="display name (overrides name= in URL)")
    parser.add_argument(
        "--token",
        default=os.environ.get("ROOMCAST_TOKEN") or None,
        help="sent as 'Authorization: Bearer TOKEN' (default: $ROOMCAST_TOKEN)",
    )
    parser.add_argument(
        "--json", action="store_true", help="JSON-lines mode even when stdin is a terminal"
    )
    parser.add_argument(
        "--batch",
        action="store_true",
        help=f"offer the {BATCH_SUBPROTOCOL} subprotocol (several events per frame)",
    )
    parser.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="exit after printing N message events; in scripting mode, keep listening "
        "after end of input until then",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="end the session after SECONDS",
    )
    parser.add_argument(
        "--linger",
        type=_non_negative_float,
        default=2.0,
        metavar="SECONDS",
        help="at end of input, wait this long for acks (default: 2)",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def parse_options(argv: Sequence[str], *, stdin_is_tty: bool) -> Options:
    """Parse and validate ``argv``.

    :raises SystemExit: for ``--help`` and for malformed options (argparse's own message)
    :raises UsageError: for a URL or room/name the server would refuse
    """
    args = build_parser().parse_args(argv)
    return Options(
        url=chat_url(args.url, room=args.room, name=args.name),
        token=args.token,
        interactive=stdin_is_tty and not args.json,
        batch=args.batch,
        count=args.count,
        timeout=args.timeout,
        linger=args.linger,
    )


def chat_url(url: str, *, room: str | None = None, name: str | None = None) -> str:
    """The URL to connect to: ``/ws/chat`` when no path is given, ``room`` and ``name``
    set in the query.

    The chat query is checked with the server's own parser, so a bad room name is a usage
    error here rather than a 4400 close after connecting.

    :raises UsageError: for a URL that is not ws:// or wss:// with a host, or a bad query
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UsageError(f"expected a ws:// or wss:// URL with a host, got {url!r}")
    path = parts.path if parts.path not in ("", "/") else CHAT_PATH
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    for key, value in (("room", room), ("name", name)):
        if value is not None:
            params[key] = value
    query = urlencode(params)
    if path == CHAT_PATH:
        try:
            parse_chat_query(query.encode("ascii"))
        except ProtocolError as exc:
            raise UsageError(exc.message) from None
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


# -- standard input -------------------------------------------------------------------------


class StdinLines:
    """Lines of a file descriptor (stdin), read asynchronously with no thread.

    Why not the obvious tools: ``trio.lowlevel.FdStream`` switches the *open file
    description* to non-blocking mode, and in a terminal stdin, stdout and stderr usually
    share one, so our own ``print`` could start failing with ``BlockingIOError``.
    ``trio.wrap_file`` reads in a worker thread that cannot be interrupted, so a session
    that ends while the user is typing would leave a thread stuck in ``read()``.

    Instead: wait until the fd is readable with trio's I/O manager, then make one
    ordinary (blocking) ``read``, which returns at once for a readable pipe or terminal.
    Regular files and devices such as ``/dev/null`` cannot be polled but never block, so
    they are read directly. Unix only, like the rest of the terminal handling.
    """

    def __init__(self, fd: int = 0) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._eof = False
        self._pollable = _pollable(fd)

    async def readline(self) -> str | None:
        """The next line without its line ending, or ``None`` at end of input."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return _decode_line(line)
            if self._eof:
                if not self._buffer:
                    return None
                line = bytes(self._buffer)
                self._buffer.clear()
                return _decode_line(line)
            chunk = await self._read()
            self._eof = not chunk
            self._buffer += chunk

    async def _read(self) -> bytes:
        if self._pollable:
            await trio.lowlevel.wait_readable(self._fd)
        else:
            await trio.lowlevel.checkpoint()
        try:
            return os.read(self._fd, READ_SIZE)
        except OSError:  # EIO from a hung-up terminal, EBADF from a closed stdin
            return b""


def _pollable(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:  # stdin is closed: reads fail at once and count as end of input
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


def _decode_line(line: bytes) -> str:
    return line.removesuffix(b"\r").decode("utf-8", errors="replace")


# -- the connection -------------------------------------------------------------------------


class Link:
    """A chat connection as the session sees it: text frames in and out, and one
    :class:`Closed` exception carrying the close code, whatever library is underneath."""

    def __init__(self, ws: WebSocketConnection, closed_error: type[Exception]) -> None:
        self._ws = ws
        self._closed_error = closed_error
        self.batch = ws.subprotocol == BATCH_SUBPROTOCOL
        #: set once we have started the close handshake; see :func:`connect`
        self.closing = False

    async def receive(self) -> str:
        """The next frame; binary frames (the chat never sends them) are decoded as text.

        :raises Closed: once the connection has ended and every earlier frame was read
        """
        try:
            frame = await self._ws.get_message()
        except self._closed_error:
            raise self._closed() from None
        return frame if isinstance(frame, str) else frame.decode("utf-8", errors="replace")

    async def send(self, text: str) -> None:
        """:raises Closed: if the connection has ended"""
        try:
            await self._ws.send_message(text)
        except self._closed_error:
            raise self._closed() from None

    async def close(self) -> None:
        """Close with 1000, waiting at most :data:`CLOSE_TIMEOUT` for the server's reply
        (then the socket is dropped). Does nothing if the connection has already ended."""
        self.closing = True
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._ws.aclose(CloseCode.NORMAL)

    def _closed(self) -> Closed:
        reason = self._ws.closed
        if reason is None:
            return Closed(1006, "")
        return Closed(reason.code, reason.reason or "")


@asynccontextmanager
async def connect(options: Options) -> AsyncIterator[Link]:
    """Open the WebSocket for ``options`` and close it on exit.

    Works around trio-websocket issue #184: a ping that arrives after our close frame is
    answered with a pong that wsproto refuses (``LocalProtocolError`` in state
    ``LOCAL_CLOSING``), which kills trio-websocket's reader task. Hypercorn pings every
    connection as soon as it accepts it, so a short scripted session hits this often.
    Once we are closing, the session's outcome is already decided: the error is ignored.

    :raises CannotConnect: if the TCP connection or the handshake fails or times out
    """
    import trio_websocket as tws  # only the client needs it; `main` checks it is installed
    from wsproto.utilities import LocalProtocolError

    headers = []
    if options.token is not None:
        headers.append((b"authorization", b"Bearer " + options.token.encode()))
    connect_timeout = min(CONNECT_TIMEOUT, options.timeout or CONNECT_TIMEOUT)
    link: Link | None = None
    try:
        async with tws.open_websocket_url(
            options.url,
            subprotocols=[BATCH_SUBPROTOCOL] if options.batch else None,
            extra_headers=headers,
            connect_timeout=connect_timeout,
            disconnect_timeout=CLOSE_TIMEOUT,
        ) as ws:
            link = Link(ws, tws.ConnectionClosed)
            yield link
    except (tws.DisconnectionTimeout, LocalProtocolError):
        # A stalled close handshake, or issue #184: harmless once we are closing (the
        # socket is closed either way); anywhere else it is a bug worth a traceback.
        if link is None or not link.closing:
            raise
    except tws.HandshakeError as exc:
        raise CannotConnect(_handshake_failure(exc, connect_timeout)) from None


def _handshake_failure(exc: Exception, timeout: float) -> str:
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"the server refused the WebSocket handshake (HTTP {status})"
    if exc.__cause__ is not None:
        return str(exc.__cause__) or type(exc.__cause__).__name__
    if type(exc).__name__ == "ConnectionTimeout":
        return f"no handshake within {timeout:g}s"
    return str(exc) or type(exc).__name__


# -- the session ----------------------------------------------------------------------------


class PendingAcks:
    """Ids of messages sent but not yet answered, oldest first.

    The server answers a connection's messages in the order it received them, through
    one outbox, so an ``ack`` for id *n* also settles every older id (those were dropped:
    over the rate limit, the server warns once per burst and drops the rest silently), and
    an ``error`` answers the oldest unanswered message.
    """

    def __init__(self) -> None:
        self._ids: deque[int] = deque()
        self._settled = trio.Event()
        self._settled.set()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, message_id: int) -> None:
        self._ids.append(message_id)
        if self._settled.is_set():
            self._settled = trio.Event()

    def acked(self, message_id: int) -> None:
        while self._ids and self._ids[0] <= message_id:
            self._ids.popleft()
        self._check()

    def refused(self) -> None:
        if self._ids:
            self._ids.popleft()
        self._check()

    async def wait_settled(self) -> None:
        """Return once every message sent so far has been answered."""
        while self._ids:
            await self._settled.wait()

    def _check(self) -> None:
        if not self._ids:
            self._settled.set()


@dataclass(eq=False)
class Session:
    """State shared by the session's tasks; :meth:`finish` is the only way to end it."""

    link: Link
    options: Options
    out: TextIO
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    pending: PendingAcks = field(default_factory=PendingAcks)
    #: set by the first server event (the welcome); see :func:`_linger`
    greeted: trio.Event = field(default_factory=trio.Event)
    messages: int = 0
    exit_code: int | None = None

    @property
    def done(self) -> bool:
        return self.exit_code is not None

    def finish(self, exit_code: int, complaint: str | None = None) -> None:
        """End the session with ``exit_code`` (the first caller wins), saying why on stderr."""
        if self.exit_code is None:
            self.exit_code = exit_code
            if complaint is not None:
                _complain(complaint)
        self.scope.cancel()

    def handle(self, line: str) -> None:
        """Print one server event and update the bookkeeping it affects."""
        event = _parse_event(line)
        self.greeted.set()
        if self.options.interactive:
            human = format_event(event, line)
            if human is not None:
                self.write(human)
        else:
            self.write(line)
        kind = event.get("type")
        if kind == "message":
            self.messages += 1
            if self.options.count is not None and self.messages >= self.options.count:
                self.finish(EXIT_OK)
        elif kind == "ack" and isinstance(event.get("id"), str) and event["id"].isdigit():
            self.pending.acked(int(event["id"]))
        elif kind == "error" and event.get("error") in ANSWERING_ERRORS:
            self.pending.refused()

    def write(self, text: str) -> None:
        try:
            self.out.write(text + "\n")
        except BrokenPipeError:
            self._lost_stdout()

    def flush(self) -> None:
        try:
            self.out.flush()
        except BrokenPipeError:
            self._lost_stdout()

    def _lost_stdout(self) -> None:
        """The reader of our output went away (``| head``): end quietly, and point stdout
        at /dev/null so the interpreter's final flush does not complain either."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.out.fileno())
        os.close(devnull)
        self.finish(EXIT_OK)


async def run(options: Options, out: TextIO) -> int:
    """Connect and run one session; returns the exit code."""
    exit_code = EXIT_CLOSED
    try:
        async with connect(options) as link:
            session = Session(link, options, out)
            await _run_session(session)
            if session.exit_code is not None:
                exit_code = session.exit_code
            await link.close()  # a no-op if the server closed first
    except CannotConnect as exc:
        _complain(f"cannot connect to {options.url}: {exc}")
        return EXIT_USAGE
    return exit_code


async def _run_session(session: Session) -> None:
    """Run the session's tasks until one of them calls :meth:`Session.finish`, the
    connection ends, or ``--timeout`` expires; the nursery guarantees all three tasks are
    gone when this returns, whichever way it ended."""
    timeout = session.options.timeout
    with trio.move_on_after(math.inf if timeout is None else timeout) as deadline:
        async with trio.open_nursery() as nursery:
            session.scope = nursery.cancel_scope
            nursery.start_soon(_watch_signals, session)
            nursery.start_soon(_print_events, session)
            nursery.start_soon(_send_input, session, StdinLines())
    if deadline.cancelled_caught:
        _timed_out(session, timeout)


def _timed_out(session: Session, timeout: float | None) -> None:
    count = session.options.count
    if count is None:
        session.finish(EXIT_OK)
    else:
        session.finish(
            EXIT_CLOSED, f"timed out after {timeout:g}s with {session.messages} of {count} messages"
        )


async def _print_events(session: Session) -> None:
    """Print server events until the connection ends; a close is reported, with exit
    code 1 unless it was a normal (1000) close."""
    split = session.link.batch
    while True:
        try:
            frame = await session.link.receive()
        except Closed as closed:
            _server_closed(session, closed)
            return
        for line in frame.split("\n") if split else (frame,):
            session.handle(line)
            if session.done:
                break
        session.flush()


def _server_closed(session: Session, closed: Closed) -> None:
    if closed.code == CloseCode.NORMAL:
        session.finish(EXIT_OK)
        return
    if closed.code in LOST_CODES:
        session.finish(EXIT_CLOSED, f"{LOST_CODES[closed.code]} ({closed.code})")
    else:
        reason = f": {closed.reason}" if closed.reason else ""
        session.finish(EXIT_CLOSED, f"closed {closed.code}{reason}")


async def _send_input(session: Session, stdin: StdinLines) -> None:
    """Send each input line; at end of input, wait for the answers (scripting mode), then
    end the session, unless ``--count`` asks to keep listening.
    """
    interactive = session.options.interactive
    sent = 0
    while (line := await stdin.readline()) is not None:
        if not line.strip():
            continue  # the server ignores blank messages: they would never be answered
        sent += 1
        message: dict[str, Any] = {"text": line}
        if not interactive:
            message["id"] = str(sent)
            session.pending.add(sent)
        try:
            await session.link.send(orjson.dumps(message).decode())
        except Closed:
            return  # the printer reports the close
    if interactive:
        session.finish(EXIT_OK)
        return
    await _linger(session)
    if session.options.count is None:
        session.finish(EXIT_OK)


async def _linger(session: Session) -> None:
    """Wait, at most ``--linger`` seconds, for the first server event and for an answer to
    every message sent.

    The first event matters even with no messages: the server accepts every WebSocket
    before it checks the token and the path, so ending at once on an empty input would
    exit 0 before the 4001 or 4004 close could arrive.
    """
    with trio.move_on_after(session.options.linger):
        await session.greeted.wait()
        await session.pending.wait_settled()
    if session.pending:
        _complain(f"{len(session.pending)} message(s) not acknowledged by the server")


async def _watch_signals(session: Session) -> None:
    """Turn Ctrl-C and SIGTERM into a clean close (exit 128 + signal number).

    Signal handlers can only be installed from the main thread; elsewhere (say, a test
    calling :func:`main` in a thread) the default KeyboardInterrupt handling stays.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            session.finish(128 + signum)
            return


# -- human output ---------------------------------------------------------------------------


def format_event(event: dict[str, Any], raw: str) -> str | None:
    """One server event as a line for a person, or ``None`` for events not worth showing
    (acks: the echoed message already shows that it arrived).

    Everything that came from other users is passed through :func:`_clean`, so a chat
    message cannot move the cursor, clear the screen or retitle the terminal.
    """
    kind = event.get("type")
    if kind == "message":
        ts = _number(event.get("ts"), default=int(time.time() * 1000))
        clock = time.strftime("%H:%M:%S", time.localtime(ts / 1000))
        sender = event.get("from")
        who = _clean(sender) if isinstance(sender, str) else "(anonymous)"
        return f"[{clock}] {who}: {_clean(str(event.get('text', '')))}"
    if kind == "welcome":
        return _format_welcome(event)
    if kind == "system":
        return f"* {_clean(str(event.get('message', '')))} ({_number(event.get('count'))} here)"
    if kind == "error":
        return f"! {_clean(str(event.get('error')))}: {_clean(str(event.get('message', '')))}"
    if kind == "ack":
        return None
    return f"? {_clean(raw)}"


def _format_welcome(event: dict[str, Any]) -> str:
    members = [_clean(str(name)) for name in event.get("members") or []]
    count = _number(event.get("count"))
    here = ", ".join(members) if members else "nobody named"
    unnamed = count - len(members)
    if unnamed > 0 and members:
        here += f" and {unnamed} more"
    return f"* you joined #{_clean(str(event.get('room')))} ({count} here: {here})"


def _number(value: object, default: int = 0) -> int:
    """A numeric field of a server event, tolerating a missing or malformed one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return default


def _clean(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``), line breaks kept
    but indented so a multi-line message stays visibly one message."""
    if text.isprintable():
        return text
    pieces = []
    for char in text:
        if char == "\n":
            pieces.append("\n    ")
        elif char.isprintable() or char == "\t":
            pieces.append(char)
        else:
            pieces.append(repr(char)[1:-1])
    return "".join(pieces)


def _parse_event(line: str) -> dict[str, Any]:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    return event if isinstance(event, dict) else {}


# -- entry point ----------------------------------------------------------------------------


def _complain(message: str) -> None:
    print(f"roomcast: {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    """``roomcast chat``: run one session; returns the process exit code."""
    try:
        options = parse_options(argv, stdin_is_tty=_isatty(0))
    except SystemExit as exc:  # argparse: --help (0) or a malformed option (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except UsageError as exc:
        _complain(str(exc))
        return EXIT_USAGE
    if importlib.util.find_spec("trio_websocket") is None:
        _complain("the chat client needs trio-websocket: pip install trio-websocket")
        return EXIT_USAGE
    try:
        return trio.run(run, options, sys.stdout)
    except KeyboardInterrupt:  # Ctrl-C before or after the signal watcher ran
        return 128 + signal.SIGINT


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
