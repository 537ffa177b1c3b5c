"""A real PostgreSQL for the tests: a throwaway cluster (``initdb``) in a temporary
directory, served on a free loopback port by Debian's binaries, stoppable and restartable.

PostgreSQL refuses to run as root, and the tests run as root on CI: then the cluster is
the ``postgres`` system user's (or ``nobody``'s), in a directory it owns, and every
PostgreSQL command runs as that user through ``runuser``. Clients connect over TCP with
``trust`` authentication as the superuser ``roomcast``.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from redis_server import free_port

__all__ = ["PostgresServer", "run_postgres"]

SUPERUSER = "roomcast"
_databases = itertools.count(1)


def binaries() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` (Debian's layout; not on ``PATH``)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parent.parent.name),
    )
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run the README's test command")
    return Path(found[-1]).parent


def unprivileged_user() -> str | None:
    """The user PostgreSQL runs as when the tests run as root (``None``: as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and neither a postgres nor a nobody user exists")


class PostgresServer:
    """One cluster: :meth:`start`, :meth:`stop` (``pg_ctl stop -m fast``), :meth:`start`
    again on the same port, and :meth:`database` for a fresh database's URL."""

    def __init__(self, directory: Path, *, fsync: bool = False) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        self.bin = binaries()
        self.user = unprivileged_user()
        #: fsync off unless a test measures durability's cost: the cluster is thrown away
        self.fsync = fsync
        self.running = False

    def _run(self, *argv: str) -> None:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        if self.user is not None:
            os.chmod(self.directory, 0o755)
            entry = pwd.getpwnam(self.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
        )
        log = self.directory / "postgres.log"
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(log), "-o", options
        )
        self.running = True

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: every connection is closed at once."""
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))
        self.running = False

    @property
    def url(self) -> str:
        """The cluster's ``postgres`` database (for administration)."""
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database's URL."""
        name = f"roomcast_{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url_of(name)


@contextmanager
def run_postgres(*, fsync: bool = False) -> Iterator[PostgresServer]:
    """A started cluster in a new temporary directory, stopped and deleted on exit.

    The directory is under the system's temporary directory rather than pytest's
    ``tmp_path``: that one is private to the user running the tests, and the cluster's
    user must reach its own files.
    """
    directory = Path(tempfile.mkdtemp(prefix="roomcast-pg-"))
    os.chmod(directory, 0o755)  # mkdtemp's is 0700: the cluster's user must get in
    server = PostgresServer(directory / "cluster", fsync=fsync)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)
