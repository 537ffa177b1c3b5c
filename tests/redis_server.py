"""A real ``redis-server`` for the tests: started on a free port, with append-only
persistence (fsync on every write) in a temporary directory, stoppable and restartable.
(The bench starts its cluster from here too, without persistence: it measures the broker,
not a disk.)"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from roomcast.brokers.resp import Reply, ReplyParser, encode_command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    def __init__(
        self, directory: Path, extra: Sequence[str] = (), *, persistent: bool = True
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        #: more redis-server arguments (``--requirepass``, ``--unixsocket``, ...)
        self.extra = list(extra)
        #: append-only with fsync on every write (what a test that kills Redis needs)
        self.persistent = persistent

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed: run the README's test command")
        self.process = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *(
                    ("--appendonly", "yes", "--appendfsync", "always")
                    if self.persistent
                    else ("--appendonly", "no")
                ),
                "--dir",
                str(self.directory),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up, maybe locked
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def command(self, *args: str) -> Reply:
        return redis_command(self.port, *args)

    def subscribers(self, pids: set[int]) -> list[str]:
        """Client ids of the pub/sub connections of roomcast workers with these pids."""
        clients = self.command("CLIENT", "LIST", "TYPE", "pubsub")
        assert isinstance(clients, bytes)
        ids = []
        for line in clients.decode().splitlines():
            fields = dict(item.partition("=")[::2] for item in line.split())
            name = fields.get("name", "")
            if name.startswith("roomcast-subscriber-") and int(name.rpartition("-")[2]) in pids:
                ids.append(fields["id"])
        return ids

    def kill_subscribers(self, pids: set[int]) -> int:
        """Close the pub/sub connections of roomcast workers with these pids, as Redis does
        to a subscriber that falls too far behind; returns how many were closed."""
        closed = 0
        for id in self.subscribers(pids):
            killed = self.command("CLIENT", "KILL", "ID", id)
            assert isinstance(killed, int)
            closed += killed
        return closed

    def forget(self) -> None:
        """Delete what it persisted (it must be stopped): the next start has no data, as
        after a restart without persistence."""
        assert self.process is None
        shutil.rmtree(self.directory)
        os.makedirs(self.directory)

    def pause(self) -> None:
        """Stop it (SIGSTOP): connections stay open, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Stop it the hard way (SIGKILL): only what the append-only file holds survives."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@contextmanager
def run_redis(directory: Path, extra: Sequence[str] = ()) -> Iterator[RedisServer]:
    os.makedirs(directory, exist_ok=True)
    server = RedisServer(directory, extra)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def redis_command(port: int, *args: str) -> Reply:
    """Send one command to the redis-server on ``port`` and return its reply."""
    parser = ReplyParser()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(encode_command(*args))
        while not (replies := parser.replies()):
            parser.feed(sock.recv(65536))
    return replies[0]
