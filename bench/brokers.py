"""The ``redis`` workload: the memory broker against the Redis broker, side by side.

One redis-server, started and stopped by the bench on a free loopback port (no
persistence: the bench measures the broker, not the disk), serves every Redis
configuration; it is flushed before each server so that no run inherits another's rooms
or presence. Each configuration is roomcast on Hypercorn's Trio worker, like
``roomcast-trio(-batch)``:

| name | broker | workers |
| --- | --- | --- |
| `memory-batch`, `memory` | in-process (the default) | 1 |
| `redis-1w-batch`, `redis-1w` | Redis | 1 |
| `redis-2w-batch`, `redis-2w` | Redis | 2 (`--workers 2`: the kernel spreads connections over them) |

Ratios are against the memory broker with the same batching, measured in the same run.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from .servers import BATCH, PY, Server

#: the fan-out workloads the broker comparison runs (their parameters, their names)
SCENARIOS = ("fanout100", "rooms")
#: reference configuration for each configuration's ratio
REFERENCE = {"": "memory", "-batch": "memory-batch"}


def _roomcast(workers: int) -> tuple[str, ...]:
    return (PY, "-m", "roomcast", "--bind", "127.0.0.1:{port}", "-k", "trio", "-w", str(workers))


def broker_servers(redis_url: str) -> list[Server]:
    """The six configurations, the Redis ones pointed at ``redis_url``."""
    configs = [("memory", None, 1), ("redis-1w", redis_url, 1), ("redis-2w", redis_url, 2)]
    servers = []
    for name, url, workers in configs:
        base = Server(
            name,
            _roomcast(workers),
            f"roomcast, trio worker, {'memory broker' if url is None else 'Redis broker'}, "
            f"{workers} worker(s)",
            "roomcast",
            env={"ROOMCAST_REDIS_URL": url} if url else {},
            roomcast_env=True,
            idle=False,
            bounded=True,
        )
        servers.append(replace(base, name=f"{name}-batch", subprotocol=BATCH))
        servers.append(base)
    return servers


def reference_of(name: str) -> str:
    return REFERENCE["-batch" if name.endswith("-batch") else ""]


@dataclass
class RedisProcess:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> bytes:
        """Send one inline command, return the first reply line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(" ".join(args).encode() + b"\r\n")
            return sock.recv(4096).split(b"\r\n", 1)[0]


@contextlib.contextmanager
def open_redis() -> Iterator[RedisProcess]:
    """A redis-server on a free loopback port, in a temporary directory, for the block.

    :raises RuntimeError: if redis-server is not installed or does not start
    """
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        process = subprocess.Popen(
            [
                *(executable, "--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        redis = RedisProcess(process, port)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError):
                    if redis.command("PING") == b"+PONG":
                        break
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            yield redis
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
