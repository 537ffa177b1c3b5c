"""The master process of ``python -m roomcast`` needs sockets, signals and process
management only: it never imports the app, Hypercorn or a broker's client (each worker
does), so that it stays small (issue 24: 47 MB when it imported the whole app).

Its RSS is reported (``-s``) and measured by the bench, never asserted here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from servers import ROOT

#: run as the master: serve with real workers until ``/healthz`` answers, stop with
#: SIGTERM as an operator would, then report what the master process imported
MASTER = """
import json, os, signal, socket, sys, threading, time

from roomcast.cli import main

def stop_once_serving(port):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                conn.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
                if conn.recv(16).startswith(b"HTTP/1.1 200"):
                    break
        except OSError:
            pass
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)

fd, port = sys.argv[1:3]
threading.Thread(target=stop_once_serving, args=(int(port),), daemon=True).start()
status = main(["--bind", f"fd://{fd}", *sys.argv[3:]])
status_lines = open("/proc/self/status").read().splitlines()
memory = {k: v.split()[0] for k, v in (l.split(":", 1) for l in status_lines) if k.startswith("Vm")}
print(json.dumps({"status": status, "modules": sorted(sys.modules), "rss_kb": memory["VmHWM"]}))
"""
#: what only a worker needs: the app and its parts, the server, the event loops, clients
WORKER_ONLY = (
    "roomcast.app",
    "roomcast.runtime",
    "roomcast.hub",
    "roomcast.brokers",
    "roomcast.launcher.worker",
    "roomcast.launcher.hardening",
    "roomcast.launcher.trio_server",
    "hypercorn",
    "h11",
    "h2",
    "wsproto",
    "trio",
    "anyio",
    "coredis",
    "prometheus_client",
    "ssl",
)


def run_master(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with listener:
        result = subprocess.run(
            [sys.executable, "-c", MASTER, str(listener.fileno()), str(port), *args],
            pass_fds=[listener.fileno()],
            cwd=ROOT,
            env={**os.environ, "ROOMCAST_ARCHIVE": "off", **(env or {})},
            capture_output=True,
            text=True,
            timeout=90,
        )
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout.splitlines()[-1])
    return report


def worker_only(modules: object) -> list[str]:
    assert isinstance(modules, list)
    return [m for m in modules if any(m == w or m.startswith(f"{w}.") for w in WORKER_ONLY)]


def test_the_master_serves_without_importing_what_only_workers_need() -> None:
    report = run_master("--workers", "1")
    print(f"\nmaster peak RSS: {int(str(report['rss_kb'])) / 1024:.1f} MiB")
    assert report["status"] == 0
    assert worker_only(report["modules"]) == []


def test_the_master_of_a_mounted_app_imports_none_of_it_either() -> None:
    """``--app`` names an app the workers import; the master checks only its form."""
    tests = os.path.join(ROOT, "tests")
    report = run_master("--app", "mounted:app", env={"PYTHONPATH": tests})
    assert report["status"] == 0
    assert "mounted" not in report["modules"]
    assert worker_only(report["modules"]) == []
