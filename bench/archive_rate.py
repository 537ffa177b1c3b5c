"""The archive's write rate: messages/s through the keeper into a fresh SQLite file (or a
fresh PostgreSQL database), and what one commit costs (ms and messages per commit)::

    .venv/bin/python -m bench.archive_rate [--messages 100000] [--rooms 10]
    .venv/bin/python -m bench.archive_rate --postgres [URL]

``--postgres`` alone starts a throwaway cluster (tests/postgres_server.py, with fsync on)
and measures one fresh database in it per backend; with a URL (of a database it may fill
with tables), that server. Each measures one server's keeper on one connection.

The messages are put on the stored feed as fast as one task can (as a busy worker's hub
would), and the keeper commits what is queued in one transaction per batch, so the
numbers are the archive's ceiling on this disk, with synchronous=FULL (one fsync per
commit). It runs on Trio and asyncio in turn.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from roomcast.archive.keeper import Keeper, unarchived_bound
from roomcast.archive.sqlite import open_sqlite_archive
from roomcast.protocol import ChatMessage
from roomcast.stored import StoredFeed, StoredMessage

Opener = Callable[[], AbstractAsyncContextManager[Any]]


async def measure(messages: int, rooms: int, open_archive: Opener) -> dict[str, float]:
    async with open_archive() as archive:
        feed = StoredFeed()
        keeper = Keeper(archive, feed, size=messages)
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed.run)
            text = "x" * 80  # a chat line
            for n in range(messages):
                room = f"room{n % rooms}"
                seq = n // rooms + 1
                feed.put(StoredMessage.of(room, seq, "E", ChatMessage(text), "ann", None, 0))
                if n % 256 == 255:
                    await anyio.lowlevel.checkpoint()  # the hub yields between messages too
            await keeper.caught_up()
            tg.cancel_scope.cancel()
        elapsed = time.perf_counter() - started
    return {
        "messages_per_s": messages / elapsed,
        "commits": keeper.commits,
        "ms_per_commit": 1000 * keeper.commit_seconds / keeper.commits,
        "messages_per_commit": messages / keeper.commits,
    }


def sqlite_in(directory: str) -> Opener:
    url = f"sqlite:///{Path(directory) / 'rate.db'}"
    return lambda: open_sqlite_archive(url, window=100, unarchived_bound=unarchived_bound())


def postgres_at(url: str) -> Opener:
    from roomcast.archive.postgres import open_postgres_archive

    return lambda: open_postgres_archive(url, window=100, sequencer=False)


@contextmanager
def databases(url: str | None) -> Iterator[Callable[[], str]]:
    """Fresh databases: in a throwaway cluster, or ``url`` each time."""
    if url:
        yield lambda: url
        return
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from postgres_server import run_postgres

    with run_postgres(fsync=True) as server:
        yield server.database


def report(backend: str, found: dict[str, float]) -> None:
    print(
        f"{backend}: {found['messages_per_s']:,.0f} messages/s; {found['commits']:.0f} "
        f"commits, {found['ms_per_commit']:.2f} ms and {found['messages_per_commit']:.0f} "
        "messages each"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--postgres", nargs="?", const="", default=None, metavar="URL")
    args = parser.parse_args()
    if args.postgres is not None:
        with databases(args.postgres) as database:
            for backend in ("trio", "asyncio"):
                opener = postgres_at(database())
                report(
                    backend, anyio.run(measure, args.messages, args.rooms, opener, backend=backend)
                )
        return
    for backend in ("trio", "asyncio"):
        with tempfile.TemporaryDirectory() as directory:
            opener = sqlite_in(directory)
            report(backend, anyio.run(measure, args.messages, args.rooms, opener, backend=backend))


if __name__ == "__main__":
    main()
