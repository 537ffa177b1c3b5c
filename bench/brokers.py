"""The ``redis`` workload: the memory broker against the Redis broker, side by side, and
one Redis against a Redis Cluster.

One redis-server, started and stopped by the bench on a free loopback port (no
persistence: the bench measures the broker, not the disk), serves every Redis
configuration, and a local cluster of three masters (Debian's redis-server again, formed
by ``tests/redis_cluster.py``, no persistence either) serves the cluster ones; both are
flushed before each server so that no run inherits another's rooms or presence. Each
configuration is roomcast on Hypercorn's Trio worker, like ``roomcast-trio(-batch)``:

| name | broker | workers |
| --- | --- | --- |
| `memory-batch`, `memory` | in-process (the default) | 1 |
| `redis-1w-batch`, `redis-1w` | Redis | 1 |
| `redis-2w-batch`, `redis-2w` | Redis | 2 (`--workers 2`: the kernel spreads connections over them) |
| `cluster-1w-batch`, `cluster-2w-batch` | Redis Cluster, 3 masters | 1, 2 (only in `rooms`) |

Ratios are against the memory broker with the same batching, measured in the same run.

*What each Redis node handled.* The issue asks for the pub/sub messages per node from
``INFO stats``; Redis 7.0 (Debian's) counts none there, so the bench reads
``INFO commandstats``: a node's ``SPUBLISH`` and ``PUBLISH`` calls, which count the calls
scripts make, are the pub/sub messages it sent (one per room per batch: a call carries
every message of its room in that batch), and ``EVALSHA``/``EVAL``/``FCALL`` the script
runs. Counters are sampled every :data:`NodeSampler.interval` seconds and cut per round,
so a round's figures span at most one interval more than the round.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roomcast.brokers.resp import ReplyParser, encode_command

from .servers import BATCH, PY, Server

if TYPE_CHECKING:
    from redis_cluster import RedisCluster

#: the fan-out workloads the broker comparison runs (their parameters, their names)
SCENARIOS = ("fanout100", "rooms")
#: the scenarios the cluster configurations run: 200 rooms spread over the masters (one
#: room lives on one master, so fanout100 would measure one node of three)
CLUSTER_SCENARIOS = ("rooms",)
#: reference configuration for each configuration's ratio
REFERENCE = {"": "memory", "-batch": "memory-batch"}
#: the cluster configuration each is compared with: the same workers on one Redis
SINGLE_OF = {"cluster-1w-batch": "redis-1w-batch", "cluster-2w-batch": "redis-2w-batch"}
#: the share of a round's pub/sub messages each of the 3 masters must carry (a third,
#: give or take how 200 room names hash over the slots and how busy each room was)
SHARE_BOUNDS = (0.20, 0.50)
#: what a node's INFO commandstats counts as pub/sub messages and as script runs
PUBLISH_COMMANDS = ("spublish", "publish")
SCRIPT_COMMANDS = ("evalsha", "eval", "fcall", "fcall_ro", "evalsha_ro", "eval_ro")
#: where the tests' Redis helpers live (the bench starts its cluster with them)
TESTS = Path(__file__).resolve().parent.parent / "tests"


def _roomcast(workers: int) -> tuple[str, ...]:
    return (PY, "-m", "roomcast", "--bind", "127.0.0.1:{port}", "-k", "trio", "-w", str(workers))


def broker_servers(redis_url: str, cluster_url: str) -> list[Server]:
    """The eight configurations: the Redis ones pointed at ``redis_url``, the cluster ones
    (batching only: the configuration a deployment would run) at ``cluster_url``."""
    configs = [
        ("memory", None, 1, "memory broker"),
        ("redis-1w", redis_url, 1, "Redis broker"),
        ("redis-2w", redis_url, 2, "Redis broker"),
        ("cluster-1w", cluster_url, 1, "Redis Cluster broker"),
        ("cluster-2w", cluster_url, 2, "Redis Cluster broker"),
    ]
    servers = []
    for name, url, workers, broker in configs:
        base = Server(
            name,
            _roomcast(workers),
            f"roomcast, trio worker, {broker}, {workers} worker(s)",
            "roomcast",
            env={"ROOMCAST_REDIS_URL": url} if url else {},
            roomcast_env=True,
            idle=False,
            bounded=True,
        )
        servers.append(replace(base, name=f"{name}-batch", subprotocol=BATCH))
        if not is_cluster(name):
            servers.append(base)
    return servers


def is_cluster(name: str) -> bool:
    return name.startswith("cluster-")


def servers_for(scenario: str, servers: list[Server]) -> list[Server]:
    """The configurations that run ``scenario``: the cluster ones only where rooms spread."""
    return [s for s in servers if scenario in CLUSTER_SCENARIOS or not is_cluster(s.name)]


def reference_of(name: str) -> str:
    return REFERENCE["-batch" if name.endswith("-batch") else ""]


# -- what each Redis node handled --------------------------------------------------------------


def command_calls(commandstats: str) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls} (``cmdstat_spublish:calls=12,usec=...``)."""
    calls = {}
    for line in commandstats.splitlines():
        name, _, fields = line.strip().partition(":")
        if name.startswith("cmdstat_"):
            stats = dict(field.partition("=")[::2] for field in fields.split(","))
            calls[name.removeprefix("cmdstat_")] = int(stats.get("calls", 0))
    return calls


def cpu_seconds(cpu: str) -> float:
    """The main thread's CPU time in ``INFO cpu`` (``used_cpu_sys`` + ``used_cpu_user``)."""
    fields = dict(line.strip().partition(":")[::2] for line in cpu.splitlines())
    return float(fields.get("used_cpu_sys", 0)) + float(fields.get("used_cpu_user", 0))


def node_counters(commandstats: str, cpu: str) -> dict[str, float]:
    """What the bench keeps of one node's INFO: its pub/sub messages by command, its script
    runs and its CPU seconds."""
    calls = command_calls(commandstats)
    counters: dict[str, float] = {command: calls.get(command, 0) for command in PUBLISH_COMMANDS}
    counters["scripts"] = sum(calls.get(command, 0) for command in SCRIPT_COMMANDS)
    counters["cpu_s"] = cpu_seconds(cpu)
    return counters


def node_shares(delta: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each node's counters over a round with ``pubsub`` (its ``SPUBLISH`` + ``PUBLISH``)
    and ``share`` (its part of every node's ``pubsub``; None if nothing was published)."""
    total = sum(c.get("spublish", 0) + c.get("publish", 0) for c in delta.values())
    out: dict[str, dict[str, Any]] = {}
    for node, c in delta.items():
        pubsub = c.get("spublish", 0) + c.get("publish", 0)
        out[node] = {
            **{k: round(v, 3) if k == "cpu_s" else int(v) for k, v in c.items()},
            "pubsub": int(pubsub),
            "share": round(pubsub / total, 3) if total else None,
        }
    return out


def sharded(nodes: dict[str, dict[str, Any]], bounds: tuple[float, float] = SHARE_BOUNDS) -> bool:
    """Whether the publishes were spread as sharded pub/sub spreads them: every node's share
    within ``bounds`` (a third each, for three masters) and no classic ``PUBLISH``, which a
    cluster would have sent to every node."""
    low, high = bounds
    return (
        len(nodes) > 1
        and all(n.get("share") is not None and low <= n["share"] <= high for n in nodes.values())
        and not any(n.get("publish") for n in nodes.values())
    )


def info(port: int, section: str) -> str:
    """``INFO section`` of the redis-server on ``port``."""
    parser = ReplyParser()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(encode_command("INFO", section))
        while not (replies := parser.replies()):
            parser.feed(sock.recv(65536))
    reply = replies[0]
    if not isinstance(reply, bytes):
        raise RuntimeError(f"INFO {section} on port {port}: {reply!r}")
    return reply.decode()


def read_nodes(ports: dict[str, int]) -> dict[str, dict[str, float]]:
    """Every node's counters now (:func:`node_counters`), by node name."""
    return {
        node: node_counters(info(port, "commandstats"), info(port, "cpu"))
        for node, port in ports.items()
    }


class NodeSampler(threading.Thread):
    """Reads every node's counters each :attr:`interval` seconds (wall clock) while a load
    generator runs, so that each round's share can be cut out afterwards: the load
    generator is another process, and it reports its rounds' times only at the end."""

    interval = 0.25

    def __init__(self, read: Callable[[], dict[str, dict[str, float]]]) -> None:
        super().__init__(daemon=True)
        self.read = read
        self.series: list[tuple[float, dict[str, dict[str, float]]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> None:
        now = time.time()
        with contextlib.suppress(OSError):  # a missed sample widens a window, no more
            self.series.append((now, self.read()))

    def window(self, t0: float, t1: float) -> dict[str, dict[str, Any]]:
        """Each node's counters between the last sample before ``t0`` and the first after
        ``t1``, with its share (:func:`node_shares`); empty if the samples do not span it."""
        before = [s for s in self.series if s[0] <= t0][-1:]
        after = [s for s in self.series if s[0] >= t1][:1]
        if not (before and after):
            return {}
        first, last = before[0][1], after[0][1]
        delta = {
            node: {k: last[node][k] - first[node].get(k, 0) for k in last[node]}
            for node in last
            if node in first
        }
        return node_shares(delta)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


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


@contextlib.contextmanager
def open_cluster() -> Iterator[RedisCluster]:
    """A local Redis Cluster of three masters without replicas or persistence, formed as
    the tests form theirs (``tests/redis_cluster.py``), for the block.

    :raises RuntimeError: if redis-server or redis-cli is missing, or the cluster does not
        form
    """
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))
    import redis_cluster

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as directory:
        cluster = redis_cluster.RedisCluster(Path(directory), persistent=False)
        try:
            try:
                cluster.start()
            except subprocess.CalledProcessError as exc:  # redis-cli --cluster create
                raise RuntimeError(f"the Redis cluster did not form: {exc.stderr!r}") from exc
            yield cluster
        finally:
            cluster.stop()


@dataclass
class Backends:
    """The single Redis and the cluster the Redis configurations run against."""

    redis: RedisProcess
    cluster: RedisCluster

    def servers(self) -> list[Server]:
        return broker_servers(self.redis.url, self.cluster.url)

    def flush(self) -> None:
        """Empty the single Redis and every master: each server starts from nothing."""
        self.redis.command("FLUSHALL")
        for node in self.cluster.masters():
            node.command("FLUSHALL")

    def nodes(self, name: str) -> dict[str, int]:
        """The Redis nodes configuration ``name`` publishes on (name -> port)."""
        if is_cluster(name):
            return {f"127.0.0.1:{node.port}": node.port for node in self.cluster.masters()}
        if name.startswith("redis-"):
            return {f"127.0.0.1:{self.redis.port}": self.redis.port}
        return {}


@contextlib.contextmanager
def open_backends() -> Iterator[Backends]:
    """A single redis-server and a 3-master cluster, both stopped when the block exits."""
    with open_redis() as redis, open_cluster() as cluster:
        yield Backends(redis, cluster)
