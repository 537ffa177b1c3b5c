"""``roomcast chat``: the terminal client, built on :mod:`roomcast.client`.

One session is one task group holding three tasks around an open room::

    session
    ├── printer   (room events -> stdout; counts messages, sees the room close)
    ├── typist    (input lines -> room.send; at end of input, waits for the echoes)
    └── signals   (Ctrl-C / SIGTERM -> end the session cleanly)

Whichever task decides the session is over records an exit code and cancels the group;
leaving the room closes the WebSocket. No task and no thread outlives the session.

Two modes share that structure. *Interactive* (stdin is a terminal, no ``--json``) edits
the line being typed with prompt_toolkit: messages that arrive meanwhile are printed
above it and the half-typed line stays intact below them. It runs over one protocol v2
connection (``/ws``, :func:`~roomcast.client.open_connection`), so ``/join``, ``/leave``,
``/switch`` and ``/dm`` add and drop rooms on it; the printer then reads every room's
events, and lines name their room once more than one is joined. A line you send is shown once,
when the server's echo arrives; until then it waits in the status line under the prompt
("sending: ..."). *Scripting* (stdin is a pipe or a file, or ``--json``) prints the
server's events verbatim, one JSON object per line (plus an ``ack`` line for each message
sent), and at end of input waits until the server has answered every message and its
echo has been printed, then leaves.

The session runs on asyncio (prompt_toolkit's loop); the library under it is anyio and
runs on trio as well.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final, TextIO
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream

from .client import (
    Connection,
    Error,
    Event,
    HistoryGap,
    JoinRefused,
    Left,
    Message,
    MessageRefused,
    Notice,
    Presence,
    Reconnecting,
    Room,
    RoomClosed,
    RoomUnavailable,
    TokenSource,
    Typing,
    Unknown,
    Welcome,
    dm_room,
    open_connection,
    open_room,
)
from .protocol import ProtocolError, parse_chat_query

__all__ = ["main"]

EXIT_OK: Final = 0
#: the server ended the session with an error close code (or the connection was lost)
EXIT_CLOSED: Final = 1
#: bad arguments, or the server could not be reached
EXIT_USAGE: Final = 2
#: scripting mode: the session ended normally, but the server refused some input lines
EXIT_REFUSED: Final = 3
READ_SIZE: Final = 65536
#: how long "X typing" stays in the status line after X's last typing event
TYPING_SHOWN: Final = 3.0
#: close codes never sent on the wire: how a lost connection is reported
LOST_CODES: Final = {1005: "closed without a status code", 1006: "connection lost"}

DESCRIPTION: Final = """\
Join a roomcast chat room from the terminal.

Interactive mode (stdin is a terminal): events are shown as
"[HH:MM:SS] name: text", each typed line is sent, Ctrl-D leaves. Messages
that arrive while you type are printed above your line; a line you send
shows once, when the server has it. A dropped connection is resumed, every
room joined with it. Commands:
  /join ROOM     join ROOM too, and type into it
  /leave [ROOM]  leave ROOM (default: the one you type into)
  /switch ROOM   type into ROOM (one you joined)
  /dm USER       the direct room with USER (needs a signed token)
With more than one room joined, lines show their room: "[12:00:01] #lobby ann: hi".

Scripting mode (stdin is a pipe or file, or --json): each non-empty input line
is sent as a message, every server event is printed as one JSON object per
line (and an "ack" line per message sent). At end of input the client waits
(up to --linger seconds) until every message was acknowledged and its echo
printed, then closes and exits.
"""

EPILOG: Final = """\
exit status:
  0  the session ended normally (end of input, --count reached, closed with 1000)
  1  the server closed the connection with an error code (printed on stderr),
     the connection was lost, or --timeout expired before the server welcomed
     us or before --count was reached
  2  usage error, or the server could not be reached
  3  scripting mode: the session ended normally but the server refused some
     lines (too long, rate limited ...; each refusal is printed as an error event)
  130/143  interrupted by Ctrl-C / SIGTERM (the connection is closed cleanly)

examples:
  roomcast chat ws://127.0.0.1:8000 --room lobby --name alice
  printf 'hello\\nbye\\n' | roomcast chat ws://127.0.0.1:8000/ws/chat?room=lobby
  roomcast chat ws://127.0.0.1:8000 --room lobby --count 10 < /dev/null
"""


class UsageError(Exception):
    """The command line cannot be turned into a session."""


# -- command line ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """What the command line asks for, validated."""

    url: str  # the server (or mount prefix), without the chat query
    room: str
    name: str | None
    since: int | None
    epoch: str | None
    token: str | None
    token_command: str | None
    interactive: bool
    reconnect: bool
    batch: bool
    count: int | None
    timeout: float | None
    linger: float

    @property
    def display_url(self) -> str:
        return self.url if self.url.endswith("/ws/chat") else self.url.rstrip("/") + "/ws/chat"


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
        help="the server, ws:// or wss:// (a path is a mount prefix; /ws/chat is added); "
        "room=, name=, since=, epoch= may be given in its query",
    )
    parser.add_argument("--room", help="room to join (overrides room= in URL)")
    parser.add_argument("--name", help="display name (overrides name= in URL)")
    parser.add_argument(
        "--token",
        default=os.environ.get("ROOMCAST_TOKEN") or None,
        help="sent as 'Authorization: Bearer TOKEN' (default: $ROOMCAST_TOKEN)",
    )
    parser.add_argument(
        "--token-command",
        metavar="CMD",
        help="a shell command that prints a fresh token: run before each connection and "
        "again before the token expires (the session then outlives short-lived tokens)",
    )
    parser.add_argument(
        "--json", action="store_true", help="JSON-lines mode even when stdin is a terminal"
    )
    parser.add_argument(
        "--batch",
        action="store_true",
        help="offer the roomcast.batch subprotocol (several events per frame)",
    )
    parser.add_argument(
        "--reconnect",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="resume after a lost connection (default: on when interactive, off when "
        "scripting, where a lost connection ends the session with status 1)",
    )
    parser.add_argument(
        "--count",
        type=_positive_int,
        metavar="N",
        help="exit after printing N message events; in scripting mode, keep listening "
        "after end of input until then",
    )
    parser.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS", help="end the session after SECONDS"
    )
    parser.add_argument(
        "--linger",
        type=_non_negative_float,
        default=2.0,
        metavar="SECONDS",
        help="at end of input, wait this long for acks and echoes (default: 2)",
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

    The chat query (room, name, since, epoch, from the URL or the flags) is checked with
    the server's own parser, so a bad room name is a usage error here rather than a 4400
    close after connecting.

    :raises SystemExit: for ``--help`` and for malformed options (argparse's own message)
    :raises UsageError: for a URL or room/name the server would refuse
    """
    args = build_parser().parse_args(argv)
    parts = urlsplit(args.url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UsageError(f"expected a ws:// or wss:// URL with a host, got {args.url!r}")
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    for key, value in (("room", args.room), ("name", args.name)):
        if value is not None:
            params[key] = value
    try:
        query = parse_chat_query("&".join(f"{k}={v}" for k, v in params.items()).encode())
    except (ProtocolError, UnicodeEncodeError) as exc:
        raise UsageError(getattr(exc, "message", str(exc))) from None
    interactive = stdin_is_tty and not args.json
    return Options(
        url=urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")),
        room=query.room,
        name=query.name,
        since=query.since,
        epoch=query.epoch,
        token=args.token or query.token,
        token_command=args.token_command,
        interactive=interactive,
        reconnect=interactive if args.reconnect is None else args.reconnect,
        batch=args.batch,
        count=args.count,
        timeout=args.timeout,
        linger=args.linger,
    )


# -- standard input -------------------------------------------------------------------------


class StdinLines:
    """Lines of a file descriptor (stdin), read asynchronously with no thread.

    Why not the obvious tools: making the fd non-blocking would change the *open file
    description*, which in a terminal stdin, stdout and stderr usually share, so our own
    ``print`` could start failing with ``BlockingIOError``; reading in a worker thread
    cannot be interrupted, so a session ending while input is pending would leave a thread
    stuck in ``read()``. Instead: wait until the fd is readable, then make one ordinary
    ``read``, which returns at once for a readable pipe. Regular files and devices such
    as ``/dev/null`` cannot be polled but never block, so they are read directly.
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
            await anyio.wait_readable(self._fd)
        else:
            await anyio.lowlevel.checkpoint()
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


# -- the session ----------------------------------------------------------------------------


@dataclass(eq=False)
class Session:
    """State shared by the session's tasks; :meth:`finish` is the only way to end it."""

    #: where typed lines go (interactive: ``None`` once every room was left)
    room: Room | None
    options: Options
    out: TextIO
    #: interactive: the v2 connection every room is joined over
    conn: Connection | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    #: own messages sent and not yet echoed, oldest first (interactive: the status line)
    unechoed: deque[str] = field(default_factory=deque)
    #: the seq of the last message printed, and of the last own message acknowledged
    printed_seq: int = 0
    sent_seq: int = 0
    messages: int = 0
    #: lines the server refused (scripting mode then exits 3)
    refused: int = 0
    exit_code: int | None = None
    caught_up: anyio.Event = field(default_factory=anyio.Event)
    #: the attempt of the last "connection lost" line (each room reports the same drop)
    reconnect_shown: int = 0
    #: "name in #room" -> when they last typed (interactive: shown in the status line)
    typists: dict[str, float] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.exit_code is not None

    @property
    def rooms(self) -> dict[str, Room]:
        """The rooms joined, by name."""
        if self.conn is not None:
            return self.conn.rooms
        return {} if self.room is None else {self.room.name: self.room}

    def is_own(self, message: Message) -> bool:
        room = self.rooms.get(message.room)
        return room is not None and room.is_own(message)

    def finish(self, exit_code: int, complaint: str | None = None) -> None:
        """End the session with ``exit_code`` (the first caller wins), saying why on stderr."""
        if self.exit_code is None:
            self.exit_code = exit_code
            if complaint is not None:
                _complain(complaint)
        self.scope.cancel()

    def show(self, event: Event) -> None:
        """Print one room event and update the bookkeeping it affects."""
        if isinstance(event, Message):
            if self.is_own(event) and self.unechoed:
                self.unechoed.popleft()
            self.printed_seq = event.seq
        if self.options.interactive:
            human = self._human(event)
            if human is not None:
                self.write(human)
        elif not isinstance(event, Reconnecting):
            self.write(event.raw if not isinstance(event, Unknown) else _json(event.raw))
        if isinstance(event, Message):
            self.messages += 1
            if self.options.count is not None and self.messages >= self.options.count:
                self.finish(EXIT_OK)
        if self.printed_seq >= self.sent_seq:
            self.caught_up.set()

    def _human(self, event: Event) -> str | None:
        """Interactive: the line for ``event``, naming its room when more than one is
        joined; a drop every room reports is told once."""
        if isinstance(event, Reconnecting):
            if event.room is not None and event.attempt == self.reconnect_shown:
                return None
            self.reconnect_shown = event.attempt
        if isinstance(event, Left):
            self.forget(event.room)
        elif isinstance(event, Typing):
            who = _clean(event.name or event.user or "someone")
            self.typists[f"{who} in #{_clean(event.room)}"] = time.monotonic()
            return None  # shown in the status line
        return format_event(event, room_tag=len(self.rooms) > 1)

    def forget(self, room: str) -> None:
        """``room`` is left: type into another joined room, if any."""
        if self.room is not None and self.room.name == room:
            others = list(self.rooms.values())
            self.room = others[-1] if others else None

    def write(self, text: str) -> None:
        try:
            self.out.write(text + "\n")
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
    """Join the room and run one session; returns the exit code.

    ``--timeout`` counts from the start, joining included: a server that accepts the
    connection and never welcomes us cannot hold the session past it."""
    started: list[Session] = []
    timeout = options.timeout
    try:
        with anyio.move_on_after(math.inf if timeout is None else timeout) as deadline:
            if options.interactive:
                await _run_connection(options, out, started)
            else:
                await _run_room(options, out, started)
    except RoomUnavailable as exc:
        if exc.code < 1000 or exc.code in LOST_CODES:  # an HTTP status, or no connection
            _complain(f"cannot connect to {options.display_url}: {_unreachable(exc)}")
            return EXIT_USAGE
        _complain(f"closed {exc.code}" + (f": {exc.reason}" if exc.reason else ""))
        return EXIT_CLOSED
    except RoomClosed as exc:  # interactive: the first room's join was refused
        _complain(f"closed {exc.code}" + (f": {exc.reason}" if exc.reason else ""))
        return EXIT_CLOSED
    if not started:  # the deadline passed while joining
        _complain(f"timed out after {timeout:g}s waiting for the server to welcome us")
        return EXIT_CLOSED
    session = started[0]
    if deadline.cancelled_caught:
        _timed_out(session, timeout)
    return _exit_code(session)


async def _run_room(options: Options, out: TextIO, started: list[Session]) -> None:
    """Scripting: one room of its own (v1, ``/ws/chat``), whose server events are printed
    verbatim. The session goes into ``started`` once the room welcomed us."""
    async with open_room(
        options.url,
        options.room,
        name=options.name,
        token=_token_source(options) or options.token,
        batch=options.batch,
        since=options.since,
        epoch=options.epoch,
        reconnect=options.reconnect,
    ) as room:
        started.append(Session(room, options, out))
        await _run_session(started[0])


async def _run_connection(options: Options, out: TextIO, started: list[Session]) -> None:
    """Interactive: one v2 connection (``/ws``), the first room joined over it (the
    session goes into ``started`` once it welcomed us), more with ``/join`` and ``/dm``."""
    async with open_connection(
        options.url,
        name=options.name,
        token=_token_source(options) or options.token,
        batch=options.batch,
        reconnect=options.reconnect,
    ) as conn:
        room = await conn.join(options.room, since=options.since, epoch=options.epoch)
        started.append(Session(room, options, out, conn=conn))
        await _run_session(started[0])


def _exit_code(session: Session) -> int:
    """How an ended session exits: its own code (1 if it ended without one), and in
    scripting mode 3 instead of 0 when a line was refused, so a script can tell."""
    if session.exit_code is None:
        return EXIT_CLOSED
    if session.exit_code == EXIT_OK and session.refused and not session.options.interactive:
        return EXIT_REFUSED
    return session.exit_code


def _token_source(options: Options) -> TokenSource | None:
    """``--token-command`` as the library's token source: the command's output, or, if
    it fails, the last token it gave (the server then says whether that still works)."""
    command = options.token_command
    if command is None:
        return None
    last = options.token or ""

    async def fetch() -> str:
        nonlocal last
        result = await anyio.run_process(command, check=False)
        token = result.stdout.decode(errors="replace").strip()
        if result.returncode == 0 and token:
            last = token
        else:
            _complain(f"--token-command exited {result.returncode}; keeping the last token")
        return last

    return fetch


def _unreachable(exc: RoomUnavailable) -> str:
    if exc.code < 1000:
        return f"the server refused the WebSocket handshake (HTTP {exc.code})"
    return exc.reason or "connection failed"


async def _run_session(session: Session) -> None:
    """Run the session's tasks until one of them calls :meth:`Session.finish`, the room
    closes, or ``--timeout`` (in :func:`run`) expires; the task group guarantees all three
    are gone when this returns, whichever way it ended."""
    with _below_the_prompt(session):
        async with anyio.create_task_group() as tg:
            session.scope = tg.cancel_scope
            tg.start_soon(_watch_signals, session)
            tg.start_soon(_print_events, session)
            if session.options.interactive:
                tg.start_soon(_prompt, session)
            else:
                tg.start_soon(_send_input, session, StdinLines())


@contextmanager
def _below_the_prompt(session: Session) -> Iterator[None]:
    """Interactive: everything the session prints goes above the line being typed
    (prompt_toolkit's ``patch_stdout`` redraws the prompt under it)."""
    if not session.options.interactive:
        yield
        return
    from prompt_toolkit.patch_stdout import patch_stdout

    with patch_stdout(raw=True):
        session.out = sys.stdout
        yield


def _timed_out(session: Session, timeout: float | None) -> None:
    count = session.options.count
    if count is None:
        session.finish(EXIT_OK)
    else:
        session.finish(
            EXIT_CLOSED, f"timed out after {timeout:g}s with {session.messages} of {count} messages"
        )


async def _print_events(session: Session) -> None:
    """Print room events until the room closes; a close is reported, with exit code 1
    unless it was a normal (1000) close."""
    events: Connection | Room | None = session.conn or session.room
    assert events is not None
    try:
        async for event in events:
            session.show(event)
            if session.done:
                return
    except RoomClosed as closed:
        if closed.code in LOST_CODES:
            session.finish(EXIT_CLOSED, f"{LOST_CODES[closed.code]} ({closed.code})")
        else:
            reason = f": {closed.reason}" if closed.reason else ""
            session.finish(EXIT_CLOSED, f"closed {closed.code}{reason}")
        return
    session.finish(EXIT_OK)  # closed with 1000


async def _send_input(session: Session, stdin: StdinLines) -> None:
    """Send each input line, printing its ack; at end of input wait (``--linger``) for
    every echo, then end the session unless ``--count`` asks to keep listening."""
    while (line := await stdin.readline()) is not None:
        if not line.strip():
            continue  # the server ignores blank messages: they would never be answered
        await _send(session, line)
    with anyio.move_on_after(session.options.linger):
        session.caught_up = anyio.Event()
        if session.printed_seq < session.sent_seq:
            await session.caught_up.wait()
    if session.printed_seq < session.sent_seq:
        _complain("some messages sent were not echoed by the server in time")
    if session.options.count is None:
        session.finish(EXIT_OK)


async def _send(session: Session, text: str) -> None:
    room = session.room
    if room is None:
        session.write("! you are in no room: /join ROOM")
        return
    session.unechoed.append(text)
    try:
        seq = await room.send(text)
    except MessageRefused as refused:
        session.unechoed.remove(text)
        session.refused += 1
        if session.options.interactive:
            session.write(f"! {refused.code}: {_clean(refused.message)} ({_clean(text)[:40]})")
        else:  # the server's event, as every other one is printed
            event = {"type": "error", "error": refused.code, "message": refused.message}
            session.write(refused.raw or _json(event))
        return
    except RoomClosed:
        session.unechoed.remove(text)
        if session.conn is not None:  # a room of the connection left meanwhile
            session.write(f"! not sent: #{_clean(room.name)} was left ({_clean(text)[:40]})")
        return  # a room of its own: the printer reports the close
    session.sent_seq = max(session.sent_seq, seq)
    if not session.options.interactive:
        session.write(_json({"type": "ack", "seq": seq}))


async def _prompt(session: Session) -> None:
    """Interactive input: prompt_toolkit keeps the typed line below whatever is printed
    meanwhile; a sent line waits in the status line until its echo is printed."""
    from prompt_toolkit import PromptSession

    def status() -> str:
        now = time.monotonic()
        typing = [who for who, since in session.typists.items() if now - since < TYPING_SHOWN]
        parts = [", ".join(typing) + " typing"] if typing else []
        if session.unechoed:
            pending = " | ".join(_clean(text)[:40] for text in session.unechoed)
            parts.append("sending: " + pending)
        return "  ".join(parts)

    def message() -> str:
        room = session.room
        if len(session.rooms) > 1 and room is not None:
            return f"#{_clean(room.name)}> "
        return "> "

    prompt: PromptSession[str] = PromptSession(
        message, bottom_toolbar=status, erase_when_done=True, refresh_interval=0.5
    )
    lines_in, lines_out = anyio.create_memory_object_stream[str](64)
    async with anyio.create_task_group() as sender:
        sender.start_soon(_send_in_order, session, lines_out)
        async with lines_in:
            while True:
                try:
                    line = await prompt.prompt_async()
                except EOFError:  # Ctrl-D
                    break
                except KeyboardInterrupt:  # Ctrl-C while editing
                    session.finish(128 + signal.SIGINT)
                    return
                if line.strip():
                    await lines_in.send(line)
        sender.cancel_scope.cancel()
    session.finish(EXIT_OK)


async def _send_in_order(session: Session, lines: MemoryObjectReceiveStream[str]) -> None:
    """Send each line, or carry out the command it is, in the order typed (a line after
    ``/join x`` goes to ``x``)."""
    async with lines:
        async for line in lines:
            if line.startswith("/") and not line.startswith("//"):
                await _command(session, line)
            else:
                await _send(session, line.removeprefix("/"))


COMMANDS: Final = "/join ROOM, /leave [ROOM], /switch ROOM, /dm USER (//text sends /text)"


async def _command(session: Session, line: str) -> None:
    """``/join ROOM``, ``/leave [ROOM]``, ``/switch ROOM``, ``/dm USER``."""
    command, *args = line.split()
    conn = session.conn
    if command not in ("/join", "/leave", "/switch", "/dm") or conn is None:
        session.write(f"! unknown command {_clean(command)}; commands: {COMMANDS}")
        return
    if len(args) > 1 or (command != "/leave" and len(args) != 1):
        session.write(f"! usage: {COMMANDS}")
        return
    if command == "/join":
        await _join(session, conn, args[0])
    elif command == "/dm":
        user = conn.user
        if user is None:
            session.write(
                "! /dm needs a signed token (--token): direct rooms are for verified users"
            )
            return
        await _join(session, conn, dm_room(user, args[0]))
    elif command == "/switch":
        room = conn.rooms.get(args[0].removeprefix("#"))
        if room is None:
            session.write(f"! not in #{_clean(args[0])}: /join it first")
            return
        session.room = room
        session.write(f"* typing into #{_clean(room.name)}")
    else:
        await _leave(session, conn, args)


async def _leave(session: Session, conn: Connection, args: list[str]) -> None:
    """``/leave ROOM``, or the room typed into; its ``left`` line follows."""
    room = conn.rooms.get(args[0].removeprefix("#")) if args else session.room
    if room is None:
        session.write(f"! not in #{_clean(args[0]) if args else 'any room'}")
        return
    await conn.leave(room)
    session.forget(room.name)


async def _join(session: Session, conn: Connection, name: str) -> None:
    """Join ``name`` (or switch to it if joined) and type into it."""
    name = name.removeprefix("#")
    room = conn.rooms.get(name)
    if room is not None:
        session.room = room
        session.write(f"* typing into #{_clean(room.name)}")
        return
    try:
        session.room = await conn.join(name)  # its welcome line says so; the prompt too
    except JoinRefused as refused:
        session.write(f"! cannot join #{_clean(name)}: {_clean(refused.reason)}")
    except RoomClosed:
        pass  # the connection ended: the printer says so


async def _watch_signals(session: Session) -> None:
    """Turn Ctrl-C and SIGTERM into a clean close (exit 128 + signal number).

    Signal handlers can only be installed from the main thread; elsewhere (say, a test
    calling :func:`main` in a thread) the default KeyboardInterrupt handling stays.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            session.finish(128 + signum)
            return


# -- human output ---------------------------------------------------------------------------


def format_event(event: Event, *, room_tag: bool = False) -> str | None:
    """One room event as a line for a person (``None`` for nothing to show); with
    ``room_tag`` (more than one room joined) a line names its room.

    Everything that came from other users is passed through :func:`_clean`, so a chat
    message cannot move the cursor, clear the screen or retitle the terminal.
    """
    room = getattr(event, "room", None)
    tag = f"#{_clean(room)} " if room_tag and isinstance(room, str) else ""
    if isinstance(event, Message):
        clock = time.strftime("%H:%M:%S", time.localtime(event.ts / 1000))
        who = _clean(event.sender) if event.sender is not None else "(anonymous)"
        return f"[{clock}] {tag}{who}: {_clean(event.text)}"
    if isinstance(event, Welcome):
        return _format_welcome(event)
    if isinstance(event, Presence):  # the server's notice names the room
        return f"* {_clean(event.message)} ({event.count} here)"
    if isinstance(event, HistoryGap):
        return "* " + tag + _format_gap(event).removeprefix("* ")
    if isinstance(event, Reconnecting):
        return f"* connection lost ({event.code}); reconnecting in {event.delay:.1f}s"
    if isinstance(event, Left):
        return _format_left(event)
    if isinstance(event, Error):
        return f"! {tag}{_clean(event.code)}: {_clean(event.message)}"
    if isinstance(event, Notice):
        return f"* notice: {_clean(_json(event.data))}"
    if isinstance(event, Typing):
        return None
    return f"? {_clean(_json(event.raw))}"


def _format_left(left: Left) -> str:
    room = _clean(left.room)
    if left.code == 1000:
        return f"* you left #{room}"
    reason = f": {_clean(left.reason)}" if left.reason else ""
    return f"! the server ended your membership of #{room} ({left.code}{reason})"


def _format_gap(gap: HistoryGap) -> str:
    """A gap within the room's history names what was missed; a gap across a restart of
    its sequence (``since`` counts in the old run) says so and names only what is gone
    from the new run."""
    if not gap.restarted:
        missed = _seqs(gap.since + 1, gap.first)
        return f"* some messages are no longer available (missed {missed})"
    line = "* the room's history started over (the server restarted or lost it)"
    line += "; earlier messages are gone"
    if gap.first > 1:
        line += f", and so are messages {_seqs(1, gap.first)} of the new history"
    return line


def _seqs(first: int, end: int) -> str:
    """``first`` up to, not including, ``end``: ``4-9``, or ``4`` alone."""
    return str(first) if end - first == 1 else f"{first}-{end - 1}"


def _format_welcome(event: Welcome) -> str:
    members = [_clean(name) for name in event.members]
    here = ", ".join(members) if members else "nobody named"
    unnamed = event.count - len(members)
    if unnamed > 0 and members:
        here += f" and {unnamed} more"
    return f"* you joined #{_clean(event.room)} ({event.count} here: {here})"


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


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


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
    try:
        return anyio.run(run, options, sys.stdout, backend="asyncio")
    except KeyboardInterrupt:  # Ctrl-C before or after the signal watcher ran
        return 128 + signal.SIGINT


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
