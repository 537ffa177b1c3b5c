"""Where an idle connection's memory goes on the Trio worker: tracemalloc, by package and
by the roomcast or Hypercorn line whose call allocated it (issue 24).

    .venv/bin/python -m bench.experiments.idle_profile 2000           # clients offer nothing
    .venv/bin/python -m bench.experiments.idle_profile 2000 --deflate # as browsers do

The app runs in this process on roomcast's Trio serving loop (``tests/servers.py``), the
idle clients in ``bench/loadgen.py idle`` (rooms of 10). What tracemalloc sees is Python's
allocations (zlib's included), not the kernel's socket buffers: RSS per connection (the
bench's ``idle`` workload) is a few KB more.
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tests"))

from roomcast import Settings, create_app  # noqa: E402

from servers import serve_in_thread  # noqa: E402

#: the frames that name who asked for an allocation
OWNERS = ("roomcast", "hypercorn")
PACKAGES = ("trio", "hypercorn", "roomcast", "wsproto", "h11", "anyio")


def short(filename: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def package(filename: str) -> str:
    return next((p for p in PACKAGES if f"/{p}/" in filename), "other")


def owner(traceback: tracemalloc.Traceback) -> str:
    """The most recent roomcast or Hypercorn frame of an allocation's traceback."""
    for frame in reversed(traceback):
        if any(f"/{o}/" in frame.filename for o in OWNERS):
            source = linecache.getline(frame.filename, frame.lineno).strip()[:60]
            return f"{short(frame.filename)}:{frame.lineno}  {source}"
    return "(no roomcast or Hypercorn frame within the traceback)"


def report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int) -> None:
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diffs = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    by_package: dict[str, int] = {}
    by_owner: dict[str, int] = {}
    for diff in diffs:
        where = package(diff.traceback[-1].filename)
        by_package[where] = by_package.get(where, 0) + diff.size_diff
        by_owner[owner(diff.traceback)] = by_owner.get(owner(diff.traceback), 0) + diff.size_diff
    print(f"traced per connection: {sum(by_package.values()) / n / 1024:.2f} KB")
    for name, size in sorted(by_package.items(), key=lambda kv: -kv[1]):
        print(f"{size / n / 1024:7.2f} KB  {name}")
    asked: dict[str, int] = {}
    for name, size in by_owner.items():
        who = name.split("/", 1)[0] if name[0] != "(" else "neither"
        asked[who] = asked.get(who, 0) + size
    print("-- asked for by:", ", ".join(f"{w} {s / n / 1024:.2f} KB" for w, s in asked.items()))
    print("-- by the line that asked for it")
    for name, size in sorted(by_owner.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{size / n / 1024:7.2f} KB  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("connections", type=int, nargs="?", default=2000)
    parser.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate")
    args = parser.parse_args()
    tracemalloc.start(12)
    app = create_app(Settings(rate_limit=0, room_capacity=0))
    with serve_in_thread(app, worker_class="trio") as server:
        before = tracemalloc.take_snapshot()
        argv = [sys.executable, str(REPO / "bench" / "loadgen.py"), "idle"]
        argv += ["--url", server.url("/ws/chat"), "--connections", str(args.connections)]
        argv += ["--members", "10", "--concurrency", "50", "--hold", "120"]
        argv += ["--deflate"] if args.deflate else []
        clients = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert clients.stdin is not None and clients.stdout is not None
        connected = json.loads(clients.stdout.readline())["connected"]
        time.sleep(1.0)  # the last presence notices
        after = tracemalloc.take_snapshot()
        print(f"{connected} idle connections; tasks per connection: ", end="")
        print(f"{server.task_count() / connected:.2f}")
        report(before, after, connected)
        sys.stdout.flush()
        clients.stdin.write("close\n")
        clients.stdin.flush()
        clients.wait(timeout=60)
        os._exit(0)  # tracemalloc makes the graceful shutdown of thousands slow


if __name__ == "__main__":
    main()
