"""A real Redis Cluster for the tests: Debian's ``redis-server`` with ``--cluster-enabled
yes``, three masters (and a replica for each when a test needs failover), joined by
``redis-cli --cluster create`` and ready once every node says ``cluster_state:ok``.

Ports are below 55535: a cluster node also listens on its bus port, port + 10000, so both
must be free. Each node keeps append-only persistence in a directory of its own, as
:class:`~redis_server.RedisServer` does, and can be killed on its own (a master that dies,
for its replica to take over)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from redis_server import RedisServer, redis_command

#: highest node port: its cluster bus (port + 10000) must be a valid port too
MAX_PORT = 55535
#: seconds a new cluster may take to agree it is whole (about 3.5 s on a quiet machine)
READY_WITHIN = 30.0


def free_cluster_port() -> int:
    """A port below :data:`MAX_PORT` whose bus port (port + 10000) is free as well."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port >= MAX_PORT:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNode(RedisServer):
    """One node of a test cluster (its own port, directory and ``nodes.conf``)."""

    def __init__(self, directory: Path, *, persistent: bool = True) -> None:
        super().__init__(directory, persistent=persistent)
        self.port = free_cluster_port()
        self.extra = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            # a test kills masters: the rest keep serving their own slots meanwhile
            "--cluster-require-full-coverage",
            "no",
        ]

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` (or ``CLUSTER INFO`` for ``cluster``) as a dict."""
        if section == "cluster":
            reply = self.command("CLUSTER", "INFO")
        else:
            reply = self.command("INFO", section)
        assert isinstance(reply, bytes)
        lines = reply.decode().splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    @property
    def is_master(self) -> bool:
        return self.info("replication").get("role") == "master"

    @property
    def node_id(self) -> str:
        reply = self.command("CLUSTER", "MYID")
        assert isinstance(reply, bytes)
        return reply.decode()

    def keys(self, pattern: str = "*") -> list[str]:
        """The keys this node holds (only its own slots' keys live here)."""
        reply = self.command("KEYS", pattern)
        assert isinstance(reply, list)
        return [key.decode() for key in reply if isinstance(key, bytes)]

    def published(self, command: str = "spublish") -> int:
        """How many ``command`` (``spublish`` or ``publish``) this node ran, scripts'
        included (``INFO commandstats``: Redis 7.0 counts no pub/sub messages as such)."""
        stats = self.info("commandstats").get(f"cmdstat_{command}", "calls=0")
        return int(stats.split(",")[0].partition("=")[2])


class RedisCluster:
    """A running test cluster: its nodes, the seed URL roomcast takes, what each holds."""

    def __init__(
        self, directory: Path, masters: int = 3, replicas: int = 0, *, persistent: bool = True
    ) -> None:
        self.nodes = [
            ClusterNode(directory / f"node{i}", persistent=persistent)
            for i in range(masters * (1 + replicas))
        ]
        self.masters_wanted = masters
        self.replicas = replicas

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed (``ROOMCAST_REDIS_URL``)."""
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{seeds}"

    def masters(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.process is not None and node.is_master]

    def live(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.process is not None]

    def owner_of(self, slot: int) -> ClusterNode:
        """The live master that serves ``slot`` (as that master itself says)."""
        for node in self.masters():
            reply = node.command("CLUSTER", "SLOTS")
            assert isinstance(reply, list)
            for first, last, master, *_ in reply:
                if first <= slot <= last and int(master[1]) == node.port:
                    return node
        raise LookupError(f"no live master serves slot {slot}")

    def migrate(self, slot: int, target: ClusterNode) -> int:
        """Move ``slot`` and its keys to ``target`` as ``redis-cli --cluster reshard``
        does (IMPORTING on the target, MIGRATING on the source, ``MIGRATE`` the keys,
        ``SETSLOT ... NODE`` on both and on every other master); returns how many keys
        moved."""
        source = self.owner_of(slot)
        target.command("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source.node_id)
        source.command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target.node_id)
        moved = 0
        while keys := source.command("CLUSTER", "GETKEYSINSLOT", str(slot), "1000"):
            assert isinstance(keys, list)
            names = [key.decode() for key in keys if isinstance(key, bytes)]
            reply = source.command(
                "MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *names
            )
            assert reply == b"OK", reply
            moved += len(names)
        for node in [target, source, *self.masters()]:
            node.command("CLUSTER", "SETSLOT", str(slot), "NODE", target.node_id)
        return moved

    def start(self) -> None:
        for node in self.nodes:
            os.makedirs(node.directory, exist_ok=True)
            node.start()
        executable = shutil.which("redis-cli")
        if executable is None:
            raise RuntimeError("redis-cli is not installed: run the README's test command")
        subprocess.run(
            [
                executable,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=READY_WITHIN,
        )
        self.wait_until_ok()

    def wait_until_ok(self, within: float = READY_WITHIN) -> None:
        """Wait until every live node says ``cluster_state:ok`` and knows the same masters
        (a client that asks any of them gets the whole slot map)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            states = [node.info("cluster").get("cluster_state") for node in self.live()]
            if all(state == "ok" for state in states) and self._replicas_synced():
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis cluster did not become ok in time")

    def _replicas_synced(self) -> bool:
        for node in self.live():
            replication = node.info("replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@contextmanager
def run_cluster(
    directory: Path, masters: int = 3, replicas: int = 0, *, persistent: bool = True
) -> Iterator[RedisCluster]:
    """A new cluster in ``directory``, stopped (SIGKILL) when the block exits (the bench's
    runs without ``persistent`` append-only files, as its single Redis does)."""
    cluster = RedisCluster(directory, masters, replicas, persistent=persistent)
    with ExitStack() as stack:
        stack.callback(cluster.stop)
        cluster.start()
        yield cluster


def flush(cluster: RedisCluster) -> None:
    """Empty every master (tests sharing the session's cluster start from nothing)."""
    for node in cluster.masters():
        redis_command(node.port, "FLUSHALL")
