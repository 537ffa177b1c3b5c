"""The archive's write rate: messages/s through the keeper into a fresh SQLite file, and
what one commit costs (ms and messages per commit)::

    .venv/bin/python -m bench.archive_rate [--messages 100000] [--rooms 10]

The messages are put on the stored feed as fast as one task can (as a busy worker's hub
would), and the keeper commits what is queued in one transaction per batch, so the
numbers are the archive's ceiling on this disk, with synchronous=FULL (one fsync per
commit). It runs on Trio and asyncio in turn.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio
import anyio.lowlevel

from roomcast.archive.keeper import Keeper, unarchived_bound
from roomcast.archive.sqlite import open_sqlite_archive
from roomcast.protocol import ChatMessage
from roomcast.stored import StoredFeed, StoredMessage


async def measure(messages: int, rooms: int, directory: Path) -> dict[str, float]:
    async with open_sqlite_archive(
        f"sqlite:///{directory / 'rate.db'}", window=100, unarchived_bound=unarchived_bound()
    ) as archive:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rooms", type=int, default=10)
    args = parser.parse_args()
    for backend in ("trio", "asyncio"):
        with tempfile.TemporaryDirectory() as directory:
            found = anyio.run(measure, args.messages, args.rooms, Path(directory), backend=backend)
        print(
            f"{backend}: {found['messages_per_s']:,.0f} messages/s; {found['commits']:.0f} "
            f"commits, {found['ms_per_commit']:.2f} ms and {found['messages_per_commit']:.0f} "
            "messages each"
        )


if __name__ == "__main__":
    main()
