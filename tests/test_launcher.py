"""The process model of ``python -m roomcast`` (``roomcast.launcher``), on real processes.

A worker that dies is replaced while the others serve on; the master's death ends its
workers; SIGTERM/SIGINT end everything with 1001 and status 0; a server that cannot start
says why in one line and exits non-zero (a bad flag or setting, or several workers without
Redis: 2); one ``/metrics`` scrape counts every worker. Several workers share rooms only
through Redis, so the tests with two run with a ``redis-server`` of their own.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from chatters import Chatter, owner_of
from redis_server import RedisServer
from servers import COMMANDS, ROOT, ServerProcess, spawn_server

GRACEFUL = "1"


@pytest.fixture
def chatters() -> Iterator[list[Chatter]]:
    opened: list[Chatter] = []
    yield opened
    for chatter in opened:
        chatter.ws.sock.close()


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` held: these are other processes, with no event of
    theirs to wait on."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def spread(server: ServerProcess, chatters: list[Chatter], room: str) -> dict[int, list[Chatter]]:
    """Join two chatters on each worker; returns them by worker pid."""
    by_worker: dict[int, list[Chatter]] = {}
    for worker in server.workers():
        with server.accepting_only(worker):
            joined = [Chatter.join(server.port, room, f"w{worker}-{i}") for i in range(2)]
        assert all(owner_of([worker], c.local_address()) == worker for c in joined)
        chatters.extend(joined)
        by_worker[worker] = joined
    return by_worker


def test_a_killed_worker_is_replaced_while_the_other_serves_on(
    chatters: list[Chatter], redis_server: RedisServer
) -> None:
    env = {"ROOMCAST_RATE_LIMIT": "0", "ROOMCAST_REDIS_URL": redis_server.url}
    with spawn_server(["--workers", "2"], env=env) as server:
        by_worker = spread(server, chatters, "r")
        victim, survivor = list(by_worker)
        for chatter in chatters:
            chatter.say()
        mark = len(server.output)
        os.kill(victim, signal.SIGKILL)
        for _ in range(20):  # the survivor's room goes on, seq by seq, during the restart
            for chatter in by_worker[survivor]:
                chatter.say()
        for chatter in by_worker[victim]:
            assert chatter.close_code() == 1006
        server.wait_for_output(
            rf"worker \d \(pid {victim}\) was killed by SIGKILL; starting a", 5, mark
        )
        ready = server.wait_for_output(r"worker \d \(pid \d+\) ready", 10, mark)
        replacement = int(ready.split("(pid ")[1].split(")")[0])
        assert sorted(server.workers()) == sorted([survivor, replacement])
        with server.accepting_only(replacement):  # the replacement answers
            chatter = Chatter.join(server.port, "r", "new")
        chatters.append(chatter)
        assert owner_of([replacement], chatter.local_address()) == replacement
        chatter.say()
        for chatter in by_worker[survivor]:
            chatter.say()
        assert server.process.poll() is None


def test_the_masters_death_ends_its_workers_and_frees_the_port(
    chatters: list[Chatter], redis_server: RedisServer
) -> None:
    env = {"ROOMCAST_REDIS_URL": redis_server.url}
    with spawn_server(["--workers", "2", "--graceful-timeout", GRACEFUL], env=env) as server:
        spread(server, chatters, "r")
        workers = server.workers()
        os.kill(server.process.pid, signal.SIGKILL)
        for chatter in chatters:
            assert chatter.close_code() == 1001  # each worker shut down gracefully
        took = wait_until(lambda: not any(psutil.pid_exists(pid) for pid in workers), 5, "exit")
        listening = [
            c
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port
        ]
        assert listening == []
        print(f"\nworkers gone {took:.2f} s after the master's SIGKILL")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_gives_every_client_1001_and_status_0(
    sig: int, chatters: list[Chatter], redis_server: RedisServer
) -> None:
    env = {"ROOMCAST_REDIS_URL": redis_server.url}
    with spawn_server(["--workers", "2", "--graceful-timeout", GRACEFUL], env=env) as server:
        spread(server, chatters, "r")
        workers = server.workers()
        server.terminate(sig)
        for chatter in chatters:
            assert chatter.close_code() == 1001
        assert server.process.wait(timeout=10) == 0
        assert not any(psutil.pid_exists(pid) for pid in workers)


def test_one_metrics_scrape_counts_every_workers_connections(
    chatters: list[Chatter], redis_server: RedisServer
) -> None:
    with spawn_server(["--workers", "2"], env={"ROOMCAST_REDIS_URL": redis_server.url}) as server:
        by_worker = spread(server, chatters, "r")
        assert all(len(group) < len(chatters) for group in by_worker.values())

        def scrape() -> dict[str, float]:
            with urllib.request.urlopen(server.http_url("/metrics"), timeout=5) as response:
                lines = response.read().decode().splitlines()
            return {
                line.split()[0]: float(line.split()[1])
                for line in lines
                if line.startswith(("roomcast_connections ", "roomcast_members "))
            }

        wait_until(
            lambda: (
                scrape()
                == {
                    "roomcast_connections": len(chatters),
                    "roomcast_members": len(chatters),
                }
            ),
            5,
            f"one scrape counting {len(chatters)} connections",
        )


# -- startup failures: exit status and one line --------------------------------------------


def run_roomcast(args: list[str], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    result = subprocess.run(
        [sys.executable, "-m", "roomcast", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, (result.stdout + result.stderr).splitlines()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_an_unreachable_redis_fails_startup_in_one_line() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    status, lines = run_roomcast(
        ["--bind", f"127.0.0.1:{free_port()}", "--workers", "2"], {"ROOMCAST_REDIS_URL": url}
    )
    assert status == 1
    assert len(lines) == 1 and lines[0].startswith(
        f"roomcast: cannot start: cannot reach Redis at {url}"
    )


def test_a_bad_setting_fails_startup_in_one_line() -> None:
    status, lines = run_roomcast(["--bind", "127.0.0.1:0"], {"ROOMCAST_RATE_LIMIT": "fast"})
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("roomcast: ROOMCAST_RATE_LIMIT='fast'")


def test_a_busy_port_fails_startup_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, lines = run_roomcast(["--bind", f"127.0.0.1:{port}"])
    assert status == 2
    assert lines == [f"roomcast: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_uvloop_missing_fails_startup_in_one_line(tmp_path: Path) -> None:
    shadow = tmp_path / "uvloop"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named uvloop')\n")
    status, lines = run_roomcast(
        ["--bind", "127.0.0.1:0", "-k", "uvloop"], {"PYTHONPATH": str(tmp_path)}
    )
    assert status == 2
    assert lines == ["roomcast: --worker-class uvloop needs uvloop: pip install 'roomcast[uvloop]'"]


def run_command(
    command: str, args: list[str], env: dict[str, str] | None = None, cwd: str = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMANDS[command], *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


SPLIT_ROOMS = (
    "needs ROOMCAST_REDIS_URL: with the in-process broker each worker would hold its own rooms"
)


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("roomcast", ["--workers", "2"]),
        ("python -m roomcast", ["-w", "3"]),
        ("roomcast", ["--app", "mounted:app", "--workers", "2"]),
        ("scripts/run", ["--workers", "2"]),
    ],
    ids=["roomcast", "python-m-roomcast", "app", "scripts-run"],
)
def test_several_workers_without_redis_are_refused_in_one_line(
    command: str, args: list[str]
) -> None:
    """Each worker would keep rooms of its own, and the kernel spreads a room's members
    over them: refused at startup, saying what to set, instead of a silently split room."""
    env = {"ROOMCAST_REDIS_URL": "", "PYTHONPATH": str(Path(__file__).parent)}
    result = run_command(command, ["--bind", f"127.0.0.1:{free_port()}", *args], env)
    workers = args[args.index("--workers" if "--workers" in args else "-w") + 1]
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"roomcast: cannot start: --workers {workers} {SPLIT_ROOMS}"
    ]


def test_several_workers_from_the_config_file_without_redis_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "hypercorn.toml"
    config.write_text('bind = ["127.0.0.1:0"]\nworkers = 2\n')
    result = run_command("roomcast", ["--config", str(config)], {"ROOMCAST_REDIS_URL": ""})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"roomcast: cannot start: workers = 2 (config file) {SPLIT_ROOMS}"
    ]


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


#: (id, arguments, the start of the one line on stderr); ``{tmp}`` is the test's tmp_path
BAD_INVOCATIONS = [
    ("port-too-big", ["--bind", "127.0.0.1:80800"], "roomcast: bind '127.0.0.1:80800': port"),
    ("port-negative", ["--bind", "127.0.0.1:-1"], "roomcast: bind '127.0.0.1:-1': expected"),
    ("no-port", ["--bind", "127.0.0.1"], "roomcast: bind '127.0.0.1': expected HOST:PORT"),
    ("bad-host", ["--bind", "256.0.0.1:8000"], "roomcast: cannot listen on 256.0.0.1:8000: "),
    ("bad-fd", ["--bind", "fd://x"], "roomcast: bind 'fd://x': expected HOST:PORT or fd://N"),
    ("closed-fd", ["--bind", "fd://987"], "roomcast: cannot listen on fd://987: "),
    ("workers-0", ["--workers", "0"], "roomcast: --workers 0: at least 1 worker is needed"),
    ("workers-x", ["--workers", "x"], "roomcast: argument -w/--workers: invalid int value"),
    ("timeout-negative", ["--graceful-timeout", "-1"], "roomcast: --graceful-timeout -1: "),
    ("timeout-nan", ["--graceful-timeout", "nan"], "roomcast: --graceful-timeout nan: "),
    ("timeout-x", ["--graceful-timeout", "x"], "roomcast: argument --graceful-timeout: "),
    ("worker-class", ["-k", "gevent"], "roomcast: argument -k/--worker-class: invalid choice"),
    ("unknown-flag", ["--frobnicate"], "roomcast: unrecognized arguments: --frobnicate"),
    ("flag-without-value", ["--bind"], "roomcast: argument -b/--bind: expected one argument"),
    ("app-module", ["--app", "nowhere:app"], "roomcast: --app nowhere:app: No module named"),
    ("app-attribute", ["--app", "roomcast.app:nope"], "roomcast: --app roomcast.app:nope: "),
    ("app-no-colon", ["--app", "roomcast.app"], "roomcast: --app roomcast.app: expected MODULE"),
    ("config-missing", ["--config", "{tmp}/nope.toml"], "roomcast: --config {tmp}/nope.toml: No"),
    ("config-not-toml", ["--config", "{tmp}/bad.toml"], "roomcast: --config {tmp}/bad.toml: not"),
    ("config-workers-text", ["--config", "{tmp}/workers.toml"], "roomcast: workers = 'two'"),
    ("config-worker-class", ["--config", "{tmp}/class.toml"], "roomcast: worker_class 'gevent'"),
    ("config-bind-number", ["--config", "{tmp}/bind.toml"], "roomcast: bind 8000: expected"),
    ("config-timeout-text", ["--config", "{tmp}/timeout.toml"], "roomcast: graceful_timeout = "),
    ("config-max-size", ["--config", "{tmp}/size.toml"], "roomcast: websocket_max_message_size"),
    ("config-ping-text", ["--config", "{tmp}/ping.toml"], "roomcast: websocket_ping_interval = "),
    ("config-keep-alive", ["--config", "{tmp}/alive.toml"], "roomcast: keep_alive_timeout = -1"),
    ("config-certfile", ["--config", "{tmp}/tls.toml"], "roomcast: certfile/keyfile: "),
    ("config-half-tls", ["--config", "{tmp}/half-tls.toml"], "roomcast: certfile and keyfile"),
    ("setting", ["--bind", "127.0.0.1:0"], "roomcast: ROOMCAST_RATE_LIMIT='fast'"),
]


@pytest.mark.parametrize(
    ("args", "line"), [case[1:] for case in BAD_INVOCATIONS], ids=[c[0] for c in BAD_INVOCATIONS]
)
def test_a_bad_flag_or_setting_is_one_line_and_status_2(
    args: list[str], line: str, tmp_path: Path
) -> None:
    (tmp_path / "bad.toml").write_text("workers = \n")
    (tmp_path / "workers.toml").write_text('workers = "two"\n')
    (tmp_path / "class.toml").write_text('worker_class = "gevent"\n')
    (tmp_path / "bind.toml").write_text("bind = 8000\n")
    (tmp_path / "timeout.toml").write_text('graceful_timeout = "soon"\n')
    # Hypercorn takes these as given: a connection, not the start, would fail on them
    (tmp_path / "size.toml").write_text('websocket_max_message_size = "64 KiB"\n')
    (tmp_path / "ping.toml").write_text('websocket_ping_interval = "20 s"\n')
    (tmp_path / "alive.toml").write_text("keep_alive_timeout = -1\n")
    (tmp_path / "tls.toml").write_text(f'certfile = "{tmp_path}/no.pem"\nkeyfile = "k.pem"\n')
    (tmp_path / "half-tls.toml").write_text(f'certfile = "{tmp_path}/no.pem"\n')
    env = {"ROOMCAST_RATE_LIMIT": "fast"} if line.startswith("roomcast: ROOMCAST_") else {}
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    if not any("bind" in arg for arg in args):  # (bind.toml's bind is the case)
        args.append("--bind=127.0.0.1:0")  # never the default port, should a case serve
    result = run_command("roomcast", args, env)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(line.replace("{tmp}", str(tmp_path))), lines[0]


# -- the Hypercorn internals roomcast.launcher builds on -------------------------------------


class TestHypercornInternals:
    """``roomcast.launcher.trio_server`` reuses Hypercorn's connection machinery. If a new
    Hypercorn changes any of this, these fail before a user finds out (pyproject.toml also
    pins Hypercorn below the next minor release)."""

    def test_tcp_server_takes_app_config_context_state_stream(self) -> None:
        from hypercorn.trio.tcp_server import TCPServer

        parameters = list(inspect.signature(TCPServer.__init__).parameters)
        assert parameters == ["self", "app", "config", "context", "state", "stream"]
        assert inspect.iscoroutinefunction(TCPServer._read_data)
        assert "self.protocol.handle(Closed())" in inspect.getsource(TCPServer._read_data)

    def test_the_ping_loop_sleeps_on_the_context_and_checks_closed_after(self) -> None:
        from hypercorn.protocol.ws_stream import WSStream

        source = inspect.getsource(WSStream._send_pings)
        assert "while not self.closed" in source
        assert "self.context.sleep(self.config.websocket_ping_interval)" in source

    def test_the_worker_context_has_what_connection_context_mirrors(self) -> None:
        from hypercorn.trio.worker_context import WorkerContext

        from roomcast.launcher.trio_server import ConnectionContext

        worker = WorkerContext(None)
        public = {name for name in dir(worker) if not name.startswith("_")}
        assert public <= set(dir(ConnectionContext(worker)))

    def test_the_lifespan_reports_startup_failure_through_asgi_send(self) -> None:
        from hypercorn.trio.lifespan import Lifespan

        assert '"lifespan.startup.failed"' in inspect.getsource(Lifespan.asgi_send)
        assert "self.startup.set()" in inspect.getsource(Lifespan.handle_lifespan)

    def test_protocol_send_is_the_write_path_trio_write_replaces(self) -> None:
        """``ContainedTCPServer.protocol_send`` replaces Hypercorn's for ``RawData`` and
        ``Closed`` and defers to it for the rest: these are the semantics it keeps."""
        from hypercorn.trio.tcp_server import TCPServer

        source = inspect.getsource(TCPServer.protocol_send)
        handled = re.findall(r"isinstance\(event, (\w+)\)", source)
        assert handled == ["RawData", "Closed", "Updated"]
        # RawData: one frame at a time, whole, shielded; a failed write closes the protocol
        assert "async with self.send_lock:" in source
        assert "cancel_scope.shield = True" in source
        assert "await self.stream.send_all(event.data)" in source
        assert "except (trio.BrokenResourceError, trio.ClosedResourceError):" in source
        # Closed: the socket closes, then the protocol is told
        closed = source[source.index("isinstance(event, Closed)") :]
        assert closed.index("await self._close()") < closed.index("self.protocol.handle(Closed())")

    def test_the_connection_task_group_is_looked_up_by_name_and_spawns_apps_so(self) -> None:
        """``trio_inbox.InboxTaskGroup`` replaces the name ``TaskGroup`` in Hypercorn's
        connection handler and spawns an app as Hypercorn's does, with another receive."""
        from hypercorn.trio.task_group import TaskGroup, _handle
        from hypercorn.trio.tcp_server import TCPServer

        assert "async with TaskGroup() as task_group:" in inspect.getsource(TCPServer.run)
        spawn_app = inspect.getsource(TaskGroup.spawn_app)
        assert "trio.open_memory_channel[ASGIReceiveEvent](" in spawn_app
        assert "config.max_app_queue_size" in spawn_app
        assert "return app_send_channel.send" in spawn_app
        assert list(inspect.signature(_handle).parameters) == [
            "app", "config", "scope", "receive", "send", "sync_spawn", "call_soon"
        ]  # fmt: skip

    def test_the_connection_task_group_exists_before_the_protocol_can_send(self) -> None:
        from hypercorn.trio.task_group import TaskGroup
        from hypercorn.trio.tcp_server import TCPServer

        source = inspect.getsource(TCPServer.run)
        assert "self._task_group = task_group" in source
        assert source.index("self._task_group = task_group") < source.index("ProtocolWrapper(")
        assert "self.protocol_send," in source  # the protocol sends through the bound method
        assert list(inspect.signature(TaskGroup.spawn).parameters) == ["self", "func", "args"]

    # -- what roomcast.launcher.hardening replaces, under plain Hypercorn too --------------

    def test_worker_serve_builds_its_handler_from_the_module_after_the_lifespan_started(
        self,
    ) -> None:
        """``install`` runs in lifespan startup and replaces ``hypercorn.trio.run.TCPServer``
        and ``hypercorn.asyncio.run.TCPServer``: each worker loop must look the name up
        after ``wait_for_startup``, and call it with the arguments the replacements take."""
        from hypercorn.asyncio.run import worker_serve as asyncio_serve
        from hypercorn.trio.run import worker_serve as trio_serve

        source = inspect.getsource(trio_serve)
        handler = re.search(r"partial\(\s*TCPServer,\s*app,\s*config,\s*context,", source)
        assert handler is not None
        assert source.index("await lifespan.wait_for_startup()") < handler.start()
        source = inspect.getsource(asyncio_serve)
        assert source.index("await lifespan.wait_for_startup()") < source.index("TCPServer(")
        assert "TCPServer(app, loop, config, context, lifespan_state, reader, writer)" in source

    def test_the_protocols_make_websocket_streams_by_module_global(self) -> None:
        from hypercorn.protocol.h2 import H2Protocol
        from hypercorn.protocol.h11 import H11Protocol
        from hypercorn.protocol.ws_stream import Handshake

        assert "self.stream = WSStream(" in inspect.getsource(H11Protocol._create_stream)
        assert "= WSStream(" in inspect.getsource(H2Protocol._create_stream)
        assert "[PerMessageDeflate()]" in inspect.getsource(Handshake.accept)

    def test_the_websocket_stream_has_what_closing_ws_stream_extends(self) -> None:
        """``ClosingWSStream`` hooks ``_send_wsproto_event`` (every frame the server sends,
        close frames included), ``_accept`` (where the negotiated extensions appear), and
        ends a stream by sending ``StreamClosed``, which tells the app and closes."""
        from hypercorn.protocol.h11 import H11Protocol
        from hypercorn.protocol.ws_stream import WSStream
        from wsproto.connection import Connection

        assert "self.connection.send(event)" in inspect.getsource(WSStream._send_wsproto_event)
        accept = inspect.getsource(WSStream._accept)
        assert "self.connection = self.handshake.accept(" in accept
        handle = inspect.getsource(WSStream.handle)
        assert '"websocket.disconnect"' in handle and "StreamClosed" in handle
        assert "_close_stream()" in inspect.getsource(H11Protocol._maybe_recycle)
        assert "self._proto = FrameProtocol(" in inspect.getsource(Connection.__init__)
        # Hypercorn's own size check, which a bounded inflation leaves to answer 1009
        handle_events = inspect.getsource(WSStream._handle_events)
        assert "self.buffer.extend(event)" in handle_events
        assert "CloseReason.MESSAGE_TOO_BIG" in handle_events

    def test_per_message_deflate_has_what_the_bounded_one_overrides(self) -> None:
        from wsproto.extensions import PerMessageDeflate

        source = inspect.getsource(PerMessageDeflate)
        for name in ("_inbound_compressed", "_inbound_is_compressible", "_decompressor"):
            assert f"self.{name}" in source
        payload = inspect.getsource(PerMessageDeflate.frame_inbound_payload_data)
        assert "self._decompressor.decompress(bytes(data))" in payload

    def test_a_stream_refused_before_the_accept_is_closed_after_the_app_started(
        self,
    ) -> None:
        """``ClosingWSStream.handle`` tells the app when Hypercorn refused the stream (400)
        for data before the accept, after it spawned the app: these are the lines."""
        from hypercorn.protocol.ws_stream import WSStream

        handle = inspect.getsource(WSStream.handle)
        assert handle.index("self.app_put = await") < handle.index(
            "elif isinstance(event, (Body, Data)) and not self.handshake.accepted:"
        )
        assert "if self.closed:\n            return" in handle

    def test_the_http2_stream_buffer_is_what_the_flow_controlled_one_corrects(self) -> None:
        from hypercorn.protocol import ProtocolWrapper

        from roomcast.launcher import hardening

        # Hypercorn's own (once installed, the modules name roomcast's subclasses)
        StreamBuffer = hardening.FlowControlledStreamBuffer.__bases__[0]
        H2Protocol = hardening.ClosingH2Protocol.__bases__[0]
        pop = inspect.getsource(StreamBuffer.pop)
        assert "if len(data) < BUFFER_LOW_WATER:" in pop  # the bug: any short pop resumes
        assert "await self._paused.wait()" in inspect.getsource(StreamBuffer.push)
        assert "StreamBuffer(self.context.event_class)" in inspect.getsource(
            H2Protocol._create_stream
        )
        assert "self.stream_buffers" in inspect.getsource(H2Protocol._send_data)
        assert "H2Protocol(" in inspect.getsource(ProtocolWrapper)

    def test_the_hardening_is_installed_for_the_installed_hypercorn(self) -> None:
        import hypercorn.protocol.h11
        import hypercorn.trio.run

        from roomcast.launcher import hardening

        assert hardening.install(30.0)
        assert hypercorn.protocol.h11.WSStream is hardening.ClosingWSStream  # type: ignore[attr-defined]
        from roomcast.launcher.trio_server import ServedTCPServer

        assert hypercorn.trio.run.TCPServer.func is ServedTCPServer  # type: ignore[attr-defined]

    def test_the_direct_write_path_is_on_for_the_installed_hypercorn(self) -> None:
        """Otherwise the worker quietly keeps Hypercorn's path (with a warning), and these
        checks no longer describe what runs."""
        from roomcast.launcher import trio_write

        assert trio_write.SUPPORTED


class TestTrioInternals:
    """``roomcast.launcher.trio_write`` writes to the socket under a Trio ``SocketStream``."""

    def test_a_socket_stream_wraps_a_nonblocking_stdlib_socket(self) -> None:
        import trio

        ours, theirs = socket.socketpair()
        with theirs:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
            raw = stream.socket._sock  # type: ignore[attr-defined]
            assert isinstance(raw, socket.socket)
            assert raw.fileno() == stream.socket.fileno()
            assert raw.getblocking() is False
            raw.close()
