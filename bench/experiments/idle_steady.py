"""RSS per idle connection right after connecting and once the connections have been quiet
(issue 24): idle deflaters are freed after ``hardening.DEFLATER_IDLE`` seconds, which the
bench's ``idle`` workload (measured a second after the last connect) does not wait for.

    .venv/bin/python -m bench.experiments.idle_steady 10000 --deflate --wait 20

Serves ``python -m roomcast`` (one Trio worker, ``ROOMCAST_COMPRESSION`` as set, default
low-memory) and holds N idle connections in rooms of 10 with ``bench/loadgen.py idle``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def workers_rss(server: subprocess.Popen[bytes]) -> int:
    children = psutil.Process(server.pid).children(recursive=True)
    return sum(child.memory_info().rss for child in children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("connections", type=int, nargs="?", default=10_000)
    parser.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate")
    parser.add_argument("--wait", type=float, default=20.0, help="seconds quiet before measuring")
    args = parser.parse_args()
    port = free_port()
    env = {"ROOMCAST_RATE_LIMIT": "0", "ROOMCAST_ROOM_CAPACITY": "0", **os.environ}
    argv = [sys.executable, "-m", "roomcast", "--bind", f"127.0.0.1:{port}"]
    argv += ["-k", "trio", "--workers", "1"]
    # (its access log: a line per connection)
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(4.0)  # the worker started
        before = workers_rss(server)
        loadgen = [sys.executable, str(REPO / "bench" / "loadgen.py"), "idle"]
        loadgen += ["--url", f"ws://127.0.0.1:{port}/ws/chat", "--members", "10"]
        loadgen += ["--connections", str(args.connections), "--concurrency", "50"]
        loadgen += ["--hold", str(args.wait + 60), "--subprotocol", "roomcast.batch"]
        loadgen += ["--deflate"] if args.deflate else []
        clients = subprocess.Popen(
            loadgen, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert clients.stdin is not None and clients.stdout is not None
        connected = json.loads(clients.stdout.readline())["connected"]
        time.sleep(1.0)
        at_once = workers_rss(server)
        time.sleep(args.wait)
        settled = workers_rss(server)
        per = [(rss - before) / connected / 1024 for rss in (at_once, settled)]
        print(f"{connected} idle connections: {per[0]:.1f} KB each 1 s after the last connect,")
        print(f"{per[1]:.1f} KB after {args.wait:g} s more")
        clients.stdin.write("close\n")
        clients.stdin.flush()
        clients.wait(timeout=60)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
