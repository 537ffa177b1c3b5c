"""The archive beside an event loop that never idles.

One process, one room of 100 members whose outboxes are drained, one sender publishing
as fast as the hub takes it (a checkpoint every 10 messages): messages/s and CPU per
message without an archive, with the SQLite archive at CPython's default switch interval
(5 ms), and with it at the one roomcast's runtime sets while an archive is open
(``runtime.SWITCH_INTERVAL``), in alternating rounds, with what the archive's keeper
managed (committed, commits, seconds committing, lag, dropped). It shows whether the
archive keeps up with a saturated worker::

    .venv/bin/python -m bench.experiments.archive.saturated_loop [seconds] [rounds]
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import anyio.lowlevel

from roomcast.archive.keeper import Keeper, unarchived_bound
from roomcast.archive.sqlite import open_sqlite_archive
from roomcast.hub import Client, Hub
from roomcast.protocol import ChatMessage
from roomcast.runtime import SWITCH_INTERVAL
from roomcast.stored import StoredFeed

MEMBERS = 100


async def drain(client: Client) -> None:
    while True:
        try:
            client.outbox.receive_nowait()
        except anyio.WouldBlock:
            await client.wait_for_events()


async def one_round(archived: bool, seconds: float, directory: Path) -> str:
    hub, feed = Hub(outbox_size=100_000), StoredFeed()
    async with AsyncExitStack() as stack:
        keeper = None
        if archived:
            url = f"sqlite:///{directory / f'{time.monotonic_ns()}.db'}"
            archive = await stack.enter_async_context(
                open_sqlite_archive(url, window=100, unarchived_bound=unarchived_bound())
            )
            keeper = Keeper(archive, feed)
        hub.stored = feed if feed.wanted else None
        async with anyio.create_task_group() as tg:
            if feed.wanted:
                tg.start_soon(feed.run)
            members = [hub.join("r", f"m{i}") for i in range(MEMBERS)]
            for member in members:
                member.client.greeting.clear()
                tg.start_soon(drain, member.client)
            sent, started, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - started < seconds:
                for _ in range(10):
                    hub.publish(members[0], ChatMessage("hello world " * 5))
                sent += 10
                await anyio.lowlevel.checkpoint()
            rate = sent / (time.perf_counter() - started)
            line = f"{rate:9,.0f} messages/s, {(time.process_time() - cpu) / sent * 1e6:5.1f} µs CPU each"
            if keeper is not None:
                line += (
                    f"; archive: {keeper.written:,} committed in {keeper.commits} commits"
                    f" ({keeper.commit_seconds:.2f} s), lag {keeper.lag:,}, dropped {keeper.missed:,}"
                )
            tg.cancel_scope.cancel()
    return line


async def main(seconds: float, rounds: int) -> None:
    default = sys.getswitchinterval()
    variants = [("no archive", False, default), ("archive, 5 ms", True, default)]
    variants.append((f"archive, {SWITCH_INTERVAL * 1000:g} ms", True, SWITCH_INTERVAL))
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(rounds):
            for label, archived, interval in variants:
                sys.setswitchinterval(interval)
                result = await one_round(archived, seconds, Path(directory))
                print(f"{label:>16}: {result}", flush=True)
        sys.setswitchinterval(default)


if __name__ == "__main__":
    anyio.run(
        main,
        float(sys.argv[1]) if len(sys.argv) > 1 else 3.0,
        int(sys.argv[2]) if len(sys.argv) > 2 else 3,
        backend="trio",
    )
