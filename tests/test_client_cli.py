"""``roomcast chat``, the terminal client, end to end against a real server.

The server is ``python -m roomcast`` in a subprocess (:func:`servers.spawn_server`) and the
client runs as ``python -m roomcast chat ...`` in another, exactly as a user runs it: with
stdin piped (scripting mode: JSON lines out), or inside a pseudo-terminal (interactive
mode: human-readable lines, Ctrl-D to leave). Every wait has a deadline, so a hung client
fails its test instead of hanging the run.
"""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from typing import Any

import anyio
import pyte
import pytest
import trio

from roomcast.chat import format_event
from roomcast.client import (
    HistoryGap,
    Message,
    Presence,
    Reconnecting,
    Welcome,
    chat_url,
    connection_url,
)

from redis_server import RedisServer
from servers import ServerProcess, spawn_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = [sys.executable, "-m", "roomcast", "chat"]
#: the longest any single wait in these tests may take
DEADLINE = 20.0


# -- helpers --------------------------------------------------------------------------------


@contextmanager
def roomcast_server(env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    """A server with the rate limit off, stopped with SIGTERM so that Hypercorn's worker
    process exits too (``spawn_server`` kills only the parent, which orphans the worker).

    The graceful timeout is short because Hypercorn's ping task outlives each closed
    WebSocket by up to ``websocket_ping_interval`` (20 s), and a stop waits for it.
    """
    args = ["--graceful-timeout", "1"]
    with spawn_server(args, env={"ROOMCAST_RATE_LIMIT": "0", **(env or {})}) as server:
        try:
            yield server
        finally:
            server.terminate()
            server.process.wait(timeout=DEADLINE)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with roomcast_server() as server:
        yield server


def fresh_room() -> str:
    """A room no other test has used, so its seq starts at 1."""
    return f"t{uuid.uuid4().hex[:12]}"


def room_url(server: ServerProcess, room: str) -> str:
    return server.url(f"/ws/chat?room={room}")


def run_client(
    url: str, *args: str, input: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the client to completion with ``input`` piped to it."""
    return subprocess.run(
        [*CLIENT, url, *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(event, dict) for event in events)
    return events


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [event for event in events if event["type"] == kind]


class Output:
    """What a child process writes to one fd (a pipe or a pty master), read with deadlines."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.text = ""
        self.ended = False
        self._position = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def expect(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        """Wait for ``pattern`` past the previous match; fail with everything seen so far."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self._position)
            if match:
                self._position = match.end()
                return match
            remaining = deadline - time.monotonic()
            if self.ended or remaining <= 0:
                raise AssertionError(f"{pattern!r} not seen; output so far: {self.text!r}")
            self._read(remaining)

    def read_to_end(self, timeout: float = DEADLINE) -> str:
        deadline = time.monotonic() + timeout
        while not self.ended:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"output did not end: {self.text!r}"
            self._read(remaining)
        return self.text

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every holder of the pty's other side has gone
            data = b""
        self.ended = not data
        self.text += self._decoder.decode(data, final=self.ended)


class Client:
    """A client process running in the background, its stdout read through :class:`Output`."""

    def __init__(self, url: str, *args: str, terminal: bool = False) -> None:
        if terminal:
            master, child_side = pty.openpty()
            stdin: int = child_side
            stdout: int = child_side
            stderr: int = child_side
        else:
            stdin, stdout, stderr = subprocess.PIPE, subprocess.PIPE, subprocess.PIPE
        self.process = subprocess.Popen(
            [*CLIENT, url, *args],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=ROOT,
            start_new_session=True,  # a signal sent to the test run does not reach it
        )
        if terminal:
            os.close(child_side)
            self._input_fd = master
            self.out = Output(master)
        else:
            assert self.process.stdin is not None and self.process.stdout is not None
            self._input_fd = self.process.stdin.fileno()
            self.out = Output(self.process.stdout.fileno())

    def type(self, data: bytes) -> None:
        os.write(self._input_fd, data)

    def end_input(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def wait(self) -> int:
        return self.process.wait(timeout=DEADLINE)

    def stderr(self) -> str:
        assert self.process.stderr is not None
        return self.process.stderr.read().decode()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=DEADLINE)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        if self.process.stdin is None:  # a terminal: the master side is ours to close
            os.close(self._input_fd)


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Collects background clients and kills whatever is left when the test ends."""
    started: list[Client] = []
    yield started
    for client in started:
        client.kill()


def welcome_of(client: Client) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(client.out.expect(r"(.*)\n").group(1))
    assert event["type"] == "welcome"
    return event


# -- command line ---------------------------------------------------------------------------


def test_help_lists_every_option() -> None:
    result = run_client("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: roomcast chat")
    for option in ("--room", "--name", "--token", "--json", "--batch", "--count", "--timeout"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ([], "the following arguments are required: URL"),
        (["http://127.0.0.1:1/ws/chat"], "expected a ws:// or wss:// URL"),
        (["ws://127.0.0.1:1", "--room", "no spaces"], "room must be 1-64 characters"),
        (["ws://127.0.0.1:1", "--count", "0"], "expected a positive integer"),
        (["ws://127.0.0.1:1", "--timeout", "soon"], "expected a positive number of seconds"),
    ],
)
def test_usage_errors_exit_2(args: list[str], complaint: str) -> None:
    result = subprocess.run(
        [*CLIENT, *args], capture_output=True, text=True, timeout=DEADLINE, cwd=ROOT
    )
    assert result.returncode == 2
    assert complaint in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_exits_2() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_client(f"ws://127.0.0.1:{port}", "--room", "x")
    assert result.returncode == 2
    assert result.stderr.startswith(f"roomcast: cannot connect to ws://127.0.0.1:{port}/ws/chat")


def test_chat_url_adds_the_chat_path_under_any_mount_prefix() -> None:
    assert chat_url("ws://h:1", "r") == "ws://h:1/ws/chat?room=r"
    assert chat_url("ws://h:1/", "r", name="bob") == "ws://h:1/ws/chat?room=r&name=bob"
    assert chat_url("wss://h/ws/chat", "b", since=3) == "wss://h/ws/chat?room=b&since=3"
    assert chat_url("ws://h/chat/", "r") == "ws://h/chat/ws/chat?room=r"
    assert chat_url("http://h:1", "r") == "ws://h:1/ws/chat?room=r"


def test_connection_url_adds_the_v2_path_under_any_mount_prefix() -> None:
    assert connection_url("ws://h:1") == "ws://h:1/ws"
    assert connection_url("ws://h:1/", name="bo") == "ws://h:1/ws?name=bo"
    assert connection_url("wss://h/ws") == "wss://h/ws"
    assert connection_url("ws://h/ws/chat") == "ws://h/ws"  # v1's endpoint
    assert connection_url("ws://h/chat/ws/chat") == "ws://h/chat/ws"
    # the README's mount prefix: "/chat" was taken for v1's ending and dropped (to /ws)
    assert connection_url("ws://h/chat") == "ws://h/chat/ws"
    assert connection_url("ws://h/chat/") == "ws://h/chat/ws"
    assert connection_url("http://h:1/news") == "ws://h:1/news/ws"


# -- human output ---------------------------------------------------------------------------


def test_events_in_human_form() -> None:
    ts = int(time.mktime((2024, 5, 6, 7, 8, 9, 0, 0, -1)) * 1000)
    message = Message(room="r", seq=1, text="hi", sender="bob", user=None, ts=ts)
    assert format_event(message) == "[07:08:09] bob: hi"
    anonymous = Message(room="r", seq=1, text="hi", sender=None, user=None, ts=ts)
    assert format_event(anonymous) == "[07:08:09] (anonymous): hi"
    system = Presence(event="join", names=("alice",), count=3, message="alice joined #r")
    assert format_event(system) == "* alice joined #r (3 here)"
    welcome = Welcome(room="r", epoch="e", seq=0, members=("a", "b"), count=3)
    assert format_event(welcome) == "* you joined #r (3 here: a, b and 1 more)"
    gap = HistoryGap(epoch="e", since=3, first=10)
    assert format_event(gap) == "* some messages are no longer available (missed 4-9)"
    assert str(format_event(HistoryGap(epoch="e", since=3, first=5))).endswith("(missed 4)")
    restarted = HistoryGap(epoch="e2", since=11, first=1, restarted=True)
    assert format_event(restarted) == (
        "* the room's history started over (the server restarted or lost it); "
        "earlier messages are gone"
    )
    trimmed = HistoryGap(epoch="e2", since=11, first=40, restarted=True)
    assert str(format_event(trimmed)).endswith(", and so are messages 1-39 of the new history")
    lost = Reconnecting(code=1006, reason="", attempt=1, delay=0.25)
    assert format_event(lost) == "* connection lost (1006); reconnecting in 0.2s"


def test_terminal_control_characters_are_shown_not_obeyed() -> None:
    event = Message(
        room="r", seq=1, text="\x1b[2Jgone\x07\nline 2", sender="m\x1b]0;x", user=None, ts=0
    )
    line = format_event(event)
    assert line is not None
    assert "\x1b" not in line and "\x07" not in line
    assert line.endswith("m\\x1b]0;x: \\x1b[2Jgone\\x07\n    line 2")


# -- scripting mode -------------------------------------------------------------------------


def test_piped_lines_become_messages_and_events_come_out_as_json(
    server: ServerProcess, clients: list[Client]
) -> None:
    url = room_url(server, fresh_room())
    alice = Client(url, "--name", "alice", "--count", "3", "--timeout", str(DEADLINE))
    clients.append(alice)
    assert welcome_of(alice)["members"] == ["alice"]

    bob = run_client(url, "--name", "bob", input="hello\n\n   \nworld\nno newline at the end")

    assert (bob.returncode, bob.stderr) == (0, "")
    events = json_lines(bob.stdout)
    assert events[0]["type"] == "welcome"
    assert (events[0]["members"], events[0]["count"], events[0]["seq"]) == (["alice", "bob"], 2, 0)
    messages = of_type(events, "message")
    assert [m["text"] for m in messages] == ["hello", "world", "no newline at the end"]
    assert [(m["seq"], m["from"]) for m in messages] == [(1, "bob"), (2, "bob"), (3, "bob")]
    assert [a["seq"] for a in of_type(events, "ack")] == [1, 2, 3]

    assert alice.wait() == 0
    seen = json_lines(alice.out.read_to_end())
    assert seen[1]["type"] == "system" and seen[1]["event"] == "join" and seen[1]["name"] == "bob"
    assert [(m["seq"], m["text"]) for m in of_type(seen, "message")] == [
        (1, "hello"),
        (2, "world"),
        (3, "no newline at the end"),
    ]


def test_batch_frames_are_split_into_events(server: ServerProcess, clients: list[Client]) -> None:
    url = room_url(server, fresh_room())
    total = 300
    alice = Client(url, "--batch", "--count", str(total), "--timeout", str(DEADLINE))
    clients.append(alice)
    welcome_of(alice)

    # With --linger 10, a single ack lost inside a multi-event frame would show up as a
    # complaint on stderr and a 10 s wait.
    lines = "".join(f"line {n}\n" for n in range(1, total + 1))
    bob = run_client(url, "--name", "bob", "--batch", "--linger", "10", input=lines)

    assert (bob.returncode, bob.stderr) == (0, "")
    events = json_lines(bob.stdout)
    assert [m["seq"] for m in of_type(events, "message")] == list(range(1, total + 1))
    assert [a["seq"] for a in of_type(events, "ack")] == list(range(1, total + 1))
    assert alice.wait() == 0
    seen = of_type(json_lines(alice.out.read_to_end()), "message")
    assert [m["text"] for m in seen] == [f"line {n}" for n in range(1, total + 1)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_printed_events_are_the_servers_json_verbatim(server: ServerProcess) -> None:
    from trio_websocket import open_websocket_url

    room = fresh_room()
    with anyio.fail_after(DEADLINE):
        async with open_websocket_url(server.url(f"/ws/chat?room={room}&name=carol")) as ws:
            assert json.loads(await ws.get_message())["type"] == "welcome"
            result = await trio.run_process(
                [*CLIENT, room_url(server, room), "--name", "bob"],
                stdin=b"one\ntwo\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=ROOT,
            )
            assert (result.returncode, result.stderr) == (0, b"")
            frames = [await ws.get_message() for _ in range(4)]

    printed = [line for line in result.stdout.decode().splitlines() if '"type":"message"' in line]
    kinds = [json.loads(frame)["type"] for frame in frames]
    assert kinds == ["system", "message", "message", "system"]
    assert frames[1:3] == printed  # byte for byte: one serialisation, printed as received
    assert json.loads(frames[3])["event"] == "leave"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.parametrize("batch", [True, False])
async def test_end_closes_with_1000_and_batch_frames_are_split(batch: bool) -> None:
    """Against a stand-in server that sees what the client does on the wire: the
    subprotocol it offers, and the close code it ends with. The stand-in sends two
    messages in one frame; with ``--count 1`` exactly one of them may be printed."""
    from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

    events = [
        {"type": "welcome", "room": "r", "epoch": "e", "seq": 0, "members": [], "count": 1},
        {"type": "message", "text": "a", "room": "r", "seq": 1, "from": None, "ts": 0},
        {"type": "message", "text": "b", "room": "r", "seq": 2, "from": None, "ts": 0},
    ]
    encoded = [json.dumps(event, separators=(",", ":")) for event in events]
    offered: list[tuple[str, ...]] = []
    close_codes: list[int] = []
    closed = trio.Event()

    async def handler(request: WebSocketRequest) -> None:
        offered.append(request.proposed_subprotocols)
        ws = await request.accept(subprotocol="roomcast.batch" if batch else None)
        frames = ["\n".join(encoded)] if batch else encoded
        try:
            for frame in frames:
                await ws.send_message(frame)
            await ws.get_message()
        except ConnectionClosed as exc:
            assert exc.reason is not None
            close_codes.append(exc.reason.code)
            closed.set()

    with anyio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            flags = ["--batch"] if batch else []
            result = await trio.run_process(
                [*CLIENT, f"ws://127.0.0.1:{server.port}", "--count", "1", *flags],
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=ROOT,
            )
            await closed.wait()
            nursery.cancel_scope.cancel()

    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode().splitlines() == encoded[:2]
    assert offered == [("roomcast.batch",) if batch else ()]
    assert close_codes == [1000]


def fill(server: ServerProcess, room: str, count: int) -> str:
    """Send ``count`` messages (``m1``...) into a new ``room``; returns its epoch."""
    lines = "".join(f"m{n}\n" for n in range(1, count + 1))
    result = run_client(room_url(server, room), "--name", "filler", input=lines)
    assert result.returncode == 0, result.stderr
    epoch: str = json_lines(result.stdout)[0]["epoch"]
    return epoch


def test_since_in_the_url_replays_and_count_ends_it(server: ServerProcess) -> None:
    """The issue's command: ``?since=0 --count 2 --timeout 5 </dev/null`` printed nothing
    and never returned."""
    room = fresh_room()
    epoch = fill(server, room, 3)
    for query, expected in (("since=0", ["m1", "m2"]), (f"since=1&epoch={epoch}", ["m2", "m3"])):
        url = server.url(f"/ws/chat?{query}")
        result = run_client(url, "--room", room, "--count", "2", "--timeout", "5")
        assert (result.returncode, result.stderr) == (0, ""), query
        events = json_lines(result.stdout)
        assert events[0]["type"] == "welcome"
        assert [m["text"] for m in of_type(events, "message")] == expected


def test_a_wrong_epoch_prints_the_gap_then_the_replay(server: ServerProcess) -> None:
    room = fresh_room()
    epoch = fill(server, room, 2)
    url = server.url(f"/ws/chat?since=7&epoch=old-{epoch}")
    result = run_client(url, "--room", room, "--count", "2", "--timeout", "5")
    assert (result.returncode, result.stderr) == (0, "")
    events = json_lines(result.stdout)
    assert [e["type"] for e in events] == ["welcome", "error", "message", "message"]
    assert (events[1]["error"], events[1]["since"], events[1]["first"]) == ("history_gap", 7, 1)


@pytest.mark.parametrize("terminal", [False, True])
def test_timeout_holds_while_the_server_never_welcomes(terminal: bool) -> None:
    """A server that accepts the WebSocket and then says nothing (as a resume used to
    hang): ``--timeout`` still ends the session, with status 1 and a line saying why."""
    with never_welcoming_server() as port:
        url = f"ws://127.0.0.1:{port}?since=0"
        started = time.monotonic()
        if terminal:
            client = Terminal(url, "--room", "r", "--timeout", "1")
            try:
                output = client.read_to_end()
                code = client.wait()
            finally:
                client.close()
        else:
            result = run_client(url, "--room", "r", "--count", "2", "--timeout", "1")
            code, output = result.returncode, result.stderr
        assert time.monotonic() - started < DEADLINE / 2
        assert code == 1
        assert "timed out after 1s waiting for the server to welcome us" in output


@contextmanager
def never_welcoming_server() -> Iterator[int]:
    """The port of a WebSocket server (trio, in a thread) that completes handshakes and
    then never sends anything."""
    from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

    started: Future[tuple[int, trio.lowlevel.TrioToken, trio.CancelScope]] = Future()

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        with suppress(ConnectionClosed):
            while True:  # until the client goes (a v2 client says "join" first)
                await ws.get_message()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
            token = trio.lowlevel.current_trio_token()
            started.set_result((server.port, token, nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    port, token, scope = started.result(timeout=DEADLINE)
    try:
        yield port
    finally:
        token.run_sync_soon(scope.cancel)
        thread.join(DEADLINE)


def test_a_refused_line_prints_the_servers_reason_and_exits_3(server: ServerProcess) -> None:
    url = room_url(server, fresh_room())
    result = run_client(url, "--name", "bob", input="x" * 5000 + "\nfine\n")
    assert (result.returncode, result.stderr) == (3, "")
    events = json_lines(result.stdout)
    [error] = of_type(events, "error")
    assert error["error"] == "too_long"
    assert error["message"] == "message is 5000 characters; the limit is 4000"
    assert "xxxx" not in result.stdout
    assert [m["text"] for m in of_type(events, "message")] == ["fine"]


def test_count_with_timeout_fails_when_too_few_messages_arrive(server: ServerProcess) -> None:
    url = room_url(server, fresh_room())
    started = time.monotonic()
    result = run_client(url, "--count", "2", "--timeout", "0.5")
    assert result.returncode == 1
    assert result.stderr == "roomcast: timed out after 0.5s with 0 of 2 messages\n"
    assert [e["type"] for e in json_lines(result.stdout)] == ["welcome"]
    assert time.monotonic() - started < DEADLINE / 2


def test_timeout_alone_ends_a_listening_session_normally(
    server: ServerProcess, clients: list[Client]
) -> None:
    listener = Client(room_url(server, fresh_room()), "--timeout", "0.5")  # stdin stays open
    clients.append(listener)
    welcome_of(listener)
    assert listener.wait() == 0
    assert listener.stderr() == ""


def test_unknown_path_close_is_reported(server: ServerProcess) -> None:
    result = run_client(server.url("/nowhere"))  # a mount prefix with no roomcast under it
    assert result.returncode == 1
    assert result.stderr == "roomcast: closed 4004: no WebSocket endpoint at /nowhere/ws/chat\n"


def test_ctrl_c_leaves_the_room_quietly(server: ServerProcess, clients: list[Client]) -> None:
    url = room_url(server, fresh_room())
    alice = Client(url, "--name", "alice")
    clients.append(alice)
    welcome_of(alice)
    bob = Client(url, "--name", "bob")
    clients.append(bob)
    welcome_of(bob)
    alice.out.expect(r'"event":"join","name":"bob"')

    bob.process.send_signal(signal.SIGINT)

    assert bob.wait() == 128 + signal.SIGINT
    assert bob.stderr() == ""
    alice.out.expect(r'"event":"leave","name":"bob"')
    alice.end_input()
    assert alice.wait() == 0


def test_a_closed_stdout_ends_the_session_quietly(
    server: ServerProcess, clients: list[Client]
) -> None:
    url = room_url(server, fresh_room())
    bob = Client(url, "--name", "bob")  # like `roomcast chat ... | head -1`
    clients.append(bob)
    welcome_of(bob)
    assert bob.process.stdout is not None
    bob.process.stdout.close()

    assert run_client(url, "--name", "alice", input="anyone?\n").returncode == 0

    assert bob.wait() == 0
    assert bob.stderr() == ""


# -- interactive mode -----------------------------------------------------------------------


class AnsweringScreen(pyte.Screen):
    """A pyte screen that answers the terminal's queries (cursor position reports), as a
    real terminal does."""

    answer: Any = None

    def write_process_input(self, data: str) -> None:
        if self.answer is not None:
            self.answer(data)


class Terminal:
    """A client in a pseudo-terminal of a fixed size, its output rendered by pyte (a
    terminal emulator), so tests assert what a person would see on the screen."""

    ROWS, COLUMNS = 24, 100

    def __init__(self, url: str, *args: str) -> None:
        master, child_side = pty.openpty()
        size = struct.pack("HHHH", self.ROWS, self.COLUMNS, 0, 0)
        fcntl.ioctl(child_side, termios.TIOCSWINSZ, size)
        self.process = subprocess.Popen(
            [*CLIENT, url, *args],
            stdin=child_side,
            stdout=child_side,
            stderr=child_side,
            cwd=ROOT,
            env={**os.environ, "TERM": "xterm"},
            start_new_session=True,
        )
        os.close(child_side)
        self.fd = master
        self.screen = AnsweringScreen(self.COLUMNS, self.ROWS)
        self.screen.answer = lambda text: os.write(master, text.encode())
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    @property
    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def wait_for(self, condition: Any, what: str, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.lines):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not on screen: {what}\n" + "\n".join(self.lines))
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"the client ended before {what}: {self.raw[-500:]!r}")
                self.raw += data
                self.stream.feed(data)

    def read_to_end(self) -> str:
        """Everything the client writes until it exits, as text."""
        output = Output(self.fd)
        output.read_to_end()
        self.raw += output.text.encode()
        return output.text

    def wait(self) -> int:
        return self.process.wait(timeout=DEADLINE)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=DEADLINE)
        os.close(self.fd)


def showing(pattern: str, times: int = 1) -> Any:
    regex = re.compile(pattern)
    return lambda lines: sum(bool(regex.search(line)) for line in lines) == times


def test_interactive_session_keeps_the_typed_line_and_shows_own_lines_once(
    server: ServerProcess,
) -> None:
    room = fresh_room()
    url = room_url(server, room)
    bob = Terminal(url, "--name", "bob")
    try:
        bob.wait_for(showing(rf"^\* you joined #{room} \(1 here: bob\)$"), "the welcome")
        bob.type(b"hello there\r")
        bob.wait_for(showing(r"^\[\d\d:\d\d:\d\d\] bob: hello there$"), "bob's line, once")

        bob.type(b"half-typed")
        bob.wait_for(showing(r"^> half-typed$"), "the half-typed line")
        alice = run_client(url, "--name", "alice", input="hi from alice \x1b[2J\n")
        assert alice.returncode == 0
        bob.wait_for(
            showing(r"^\[\d\d:\d\d:\d\d\] alice: hi from alice \\x1b\[2J$"), "alice's line"
        )
        bob.wait_for(showing(rf"^\* alice left #{room} \(1 here\)$"), "alice leaving")
        bob.wait_for(showing(r"^> half-typed$"), "the half-typed line, intact below")

        bob.type(b" and done\r")
        bob.wait_for(showing(r"bob: half-typed and done$"), "the finished line, once")
        bob.wait_for(showing(r"bob: hello there$"), "the first line, still once")
        bob.wait_for(lambda lines: not any("sending:" in line for line in lines), "no line pending")

        bob.type(b"\x04")  # Ctrl-D on an empty line: leave
        assert bob.wait() == 0
        assert b"Traceback" not in bob.raw and b"roomcast:" not in bob.raw
    finally:
        bob.close()


def test_a_server_restart_says_the_history_started_over() -> None:
    """After a restart of a server without shared history, the room's sequence starts
    again from 1 under a new epoch: the gap is told as that, never as "missed 12-0"."""
    room = fresh_room()
    with roomcast_server() as first:
        port = first.port
        bob = Terminal(room_url(first, room), "--name", "bob")
        try:
            bob.wait_for(showing(rf"^\* you joined #{room}"), "the welcome")
            fill(first, room, 11)
            bob.wait_for(showing(r"filler: m11$"), "the eleventh message")
            first.terminate()
            first.process.wait(timeout=DEADLINE)
            bob.wait_for(showing(r"^\* connection lost \(1001\); reconnecting"), "the drop")
            with spawn_server(["--graceful-timeout", "1"], port=port) as second:
                bob.wait_for(showing(r"the room's history started over"), "the restart")
                assert not any("missed" in line for line in bob.lines), bob.lines
                fill(second, room, 1)
                bob.wait_for(showing(r"filler: m1$", times=2), "the new run's first message")
                second.terminate()
                second.process.wait(timeout=DEADLINE)
        finally:
            bob.close()


def test_json_flag_in_a_terminal(server: ServerProcess, clients: list[Client]) -> None:
    bob = Client(room_url(server, fresh_room()), "--json", "--name", "bob", terminal=True)
    clients.append(bob)
    bob.out.expect(r'\{"type":"welcome",.*\}\r\n')
    bob.type(b"hi\n")
    bob.out.expect(r'\{"type":"ack","seq":1\}\r\n')
    bob.out.expect(r'\{"type":"message","text":"hi",.*"seq":1,"from":"bob",.*\}\r\n')
    bob.type(b"\x04")
    assert bob.wait() == 0


# -- closes chosen by the server ------------------------------------------------------------


def test_missing_or_wrong_token_exits_1_with_4001() -> None:
    with roomcast_server(env={"ROOMCAST_TOKENS": "secret"}) as server:
        url = room_url(server, fresh_room())
        expected = "roomcast: closed 4001: missing or invalid token\n"
        for args, lines in (([], ""), ([], "hello\n"), (["--token", "wrong"], "")):
            result = run_client(url, *args, input=lines)
            assert (result.returncode, result.stderr, result.stdout) == (1, expected, "")

        by_flag = run_client(url, "--token", "secret")
        by_env = run_client(url, env={"ROOMCAST_TOKEN": "secret"})
        for result in (by_flag, by_env):
            assert (result.returncode, result.stderr) == (0, "")
            assert json_lines(result.stdout)[0]["type"] == "welcome"


def test_server_shutdown_exits_1_with_1001(clients: list[Client]) -> None:
    with roomcast_server() as server:
        listener = Client(room_url(server, fresh_room()))
        clients.append(listener)
        welcome_of(listener)
        server.terminate()
        assert listener.wait() == 1
        assert listener.stderr() == "roomcast: closed 1001: server shutting down\n"


def test_piped_mode_on_redis_prints_every_echo_even_when_acks_come_first(
    redis_server: RedisServer,
) -> None:
    """With Redis an ack can overtake the message's own echo; the client must still wait
    for (and print) every echo before it leaves."""
    with roomcast_server(env={"ROOMCAST_REDIS_URL": redis_server.url}) as server:
        for _ in range(5):
            lines = "".join(f"line {n}\n" for n in range(20))
            result = run_client(room_url(server, fresh_room()), "--name", "bob", input=lines)
            assert (result.returncode, result.stderr) == (0, "")
            events = json_lines(result.stdout)
            assert [m["text"] for m in of_type(events, "message")] == [
                f"line {n}" for n in range(20)
            ]
            assert len(of_type(events, "ack")) == 20


# -- the companion commands: publish, history, token ----------------------------------------

TOOL = [sys.executable, "-m", "roomcast"]


def run_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOOL, *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_publish_to_a_server_without_the_api_says_how_to_turn_it_on(
    server: ServerProcess,
) -> None:
    result = run_tool("publish", server.http_url(), "--room", "r", "--key", "k", "hello")
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"roomcast: 404 api_off: no server API at {server.http_url('/api/rooms/r/messages')}: "
    )
    assert "only when it was started with ROOMCAST_API_KEY set" in result.stderr


def test_history_prints_message_events_as_the_wire_has_them() -> None:
    room, key = fresh_room(), {"ROOMCAST_API_KEY": "k"}
    with roomcast_server(env=key) as server:
        published = run_tool(
            "publish", server.http_url(), "--room", room, "--from", "ci", "built", env=key
        )
        assert (published.returncode, published.stdout) == (0, "1\n")
        reader = run_client(server.url(f"/ws/chat?room={room}&since=0"), "--count", "1")
        [on_the_wire] = of_type(json_lines(reader.stdout), "message")

        history = run_tool("history", server.http_url(), "--room", room, env=key)

    assert (history.returncode, history.stderr) == (0, "")
    [event] = json_lines(history.stdout)
    assert event == on_the_wire
    assert event["from"] == "ci" and "sender" not in event and "raw" not in event


def test_token_with_a_negative_ttl_is_already_expired() -> None:
    import jwt

    env = {"ROOMCAST_JWT_SECRET": "s" * 32}
    for ttl in (["--ttl", "-5m"], ["--ttl=-5m"]):
        result = run_tool("token", "--sub", "ann", *ttl, env=env)
        assert (result.returncode, result.stderr) == (0, ""), ttl
        claims = jwt.decode(result.stdout.strip(), options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == -300
        assert claims["exp"] < time.time() - 250
    bad = run_tool("token", "--sub", "ann", "--ttl", "soon", env=env)
    assert bad.returncode == 2
    assert "expected a duration such as 90s, 30m, 1h or -5m, got 'soon'" in bad.stderr


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--sub", "ann", "--name", "a\nb"], "the name claim is not a usable display name"),
        (["--sub", "x" * 257], "the sub claim must be a string of 1-256 characters"),
    ],
)
def test_token_refuses_to_mint_what_the_server_would_refuse(args: list[str], reason: str) -> None:
    result = run_tool("token", *args, env={"ROOMCAST_JWT_SECRET": "s" * 32})
    assert (result.returncode, result.stdout) == (2, "")
    assert f"the server would refuse this token: {reason}" in result.stderr


def test_token_refuses_a_secret_shorter_than_32_bytes() -> None:
    result = run_tool("token", "--sub", "ann", env={"ROOMCAST_JWT_SECRET": "s" * 31})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("roomcast: ROOMCAST_JWT_SECRET: expected 32 bytes or more")


# -- interactive mode: many rooms over one connection (protocol v2) -------------------------

SECRET = "chat-v2-secret-for-the-tests-only"


def test_join_switch_leave_and_dm_in_a_terminal() -> None:
    """One terminal session, one connection: ``/join`` adds a room and types into it,
    lines name their room once two are joined, ``/switch`` moves where lines go,
    ``/leave`` drops a room, ``/dm`` opens the direct room with a user."""
    from roomcast.identity import mint_token

    lobby, other = fresh_room(), fresh_room()
    with roomcast_server(env={"ROOMCAST_JWT_SECRET": SECRET}) as server:
        bob_token = mint_token(SECRET, sub="bob", name="bob", ttl=600)
        alice_token = mint_token(SECRET, sub="alice", name="alice", ttl=600)
        bob = Terminal(room_url(server, lobby), "--token", bob_token)
        try:
            bob.wait_for(showing(rf"^\* you joined #{lobby} \(1 here: bob\)$"), "the welcome")
            bob.type(f"/join {other}\r".encode())
            bob.wait_for(showing(rf"^\* you joined #{other} "), "the second welcome")
            bob.wait_for(showing(rf"^#{other}>$"), "the prompt naming the room")
            bob.type(b"hello other\r")
            bob.wait_for(showing(rf"^\[\d\d:\d\d:\d\d\] #{other} bob: hello other$"), "the line")

            alice = run_client(room_url(server, lobby), "--token", alice_token, input="hi lobby\n")
            assert alice.returncode == 0, alice.stderr
            bob.wait_for(showing(rf"^\[\d\d:\d\d:\d\d\] #{lobby} alice: hi lobby$"), "alice")

            bob.type(f"/switch {lobby}\r".encode())
            bob.wait_for(showing(rf"^\* typing into #{lobby}$"), "the switch back")
            bob.type(b"back in the lobby\r")
            bob.wait_for(showing(rf"#{lobby} bob: back in the lobby$"), "the lobby line")

            bob.type(f"/leave {other}\r".encode())
            bob.wait_for(showing(rf"^\* you left #{other}$"), "the leave")
            bob.type(b"only one room now\r")
            bob.wait_for(showing(r"^\[\d\d:\d\d:\d\d\] bob: only one room now$"), "no tag")

            bob.type(b"/dm alice\r")
            bob.wait_for(showing(r"^\* you joined #dm:alice:bob "), "the direct room")
            bob.wait_for(showing(r"^#dm:alice:bob>$"), "typing into it")
            bob.type(b"psst\r")
            bob.wait_for(showing(r"#dm:alice:bob bob: psst$"), "the direct line")

            bob.type(b"/leave\r")  # the room typed into: the direct one
            bob.wait_for(showing(r"^\* you left #dm:alice:bob$"), "leaving the direct room")
            bob.type(b"still in the lobby\r")
            bob.wait_for(showing(r"bob: still in the lobby$"), "the lobby, still joined")

            bob.type(b"\x04")
            assert bob.wait() == 0
            assert b"Traceback" not in bob.raw
        finally:
            bob.close()


def test_dm_without_a_signed_token_says_so_and_bad_commands_explain(
    server: ServerProcess,
) -> None:
    ann = Terminal(room_url(server, fresh_room()), "--name", "ann")
    try:
        ann.wait_for(showing(r"^\* you joined #"), "the welcome")
        ann.type(b"/dm bob\r")
        ann.wait_for(showing(r"^! /dm needs a signed token"), "the refusal")
        ann.type(b"/switch nowhere\r")
        ann.wait_for(showing(r"^! not in #nowhere: /join it first$"), "the switch refused")
        ann.type(b"/join bad!room\r")
        ann.wait_for(showing(r"^! cannot join #bad!room: "), "the join refused")
        ann.type(b"/frobnicate\r")
        ann.wait_for(showing(r"^! unknown command /frobnicate; commands: /join ROOM"), "help")
        ann.type(b"\x04")
        assert ann.wait() == 0
    finally:
        ann.close()
