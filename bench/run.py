"""Benchmark runner: start each server, drive it with bench/loadgen.py, tabulate.

    .venv/bin/python -m bench                     # full run (~15 min on 2 cores)
    .venv/bin/python -m bench --quick             # ~3 min
    .venv/bin/python -m bench --servers roomcast-trio-batch,chapter-trio --workloads fanout100

See bench/README.md for what each workload means and how to read the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from . import brokers
from .servers import DEFAULT_SERVERS, REFERENCE, SERVERS, Server

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
LOADGEN = BENCH / "loadgen.py"
PY = sys.executable


# -- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    mode: str  # "fanout", "stalled" (a control run and a stalled run), "idle", "crowd" or "brokers"
    title: str
    full: dict[str, Any]
    quick: dict[str, Any]
    #: the servers it runs by default (None: every server asked for)
    servers: tuple[str, ...] | None = None

    def params(self, quick: bool) -> dict[str, Any]:
        return dict(self.quick if quick else self.full)


STALLED = dict(rooms=1, members=100, senders=4, window=4, pad=2048, stalled=10, rounds=1)
MULTIROOM = dict(rooms_per_person=20, senders=2, window=2, pad=64, concurrency=50)
#: the rooms-v2 workload's configurations, each on a fresh server: the same people (and
#: rooms) over v1 and over v2, then v2 with one room per connection (memory only)
LAYOUTS: dict[str, dict[str, Any]] = {
    "v1": dict(layout="v1"),
    "v2": dict(layout="v2"),
    "v2-1room": dict(layout="v2", rooms_per_person=1, rounds=0),
}

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "fanout100",
            "fanout",
            "one room of 100 members, 4 of them sending (4 messages in flight each), 64-byte pad",
            full=dict(rooms=1, members=100, senders=4, window=4, pad=64, duration=4, rounds=2),
            quick=dict(rooms=1, members=100, senders=4, window=4, pad=64, duration=2, rounds=1),
        ),
        Workload(
            "fanout1000",
            "fanout",
            "one room of 1,000 members, 4 of them sending (4 messages in flight each), 64-byte pad",
            full=dict(rooms=1, members=1000, senders=4, window=4, pad=64, duration=4, rounds=2),
            quick=dict(rooms=1, members=1000, senders=4, window=4, pad=64, duration=2, rounds=1),
        ),
        Workload(
            "rooms",
            "fanout",
            "200 rooms x 5 members, every member sending (2 messages in flight each), 64-byte pad",
            full=dict(rooms=200, members=5, senders=5, window=2, pad=64, duration=4, rounds=2),
            quick=dict(rooms=200, members=5, senders=5, window=2, pad=64, duration=2, rounds=1),
        ),
        Workload(
            "stalled",
            "stalled",
            "one room of 100 healthy members (4 sending) + 10 that never read (SO_RCVBUF 4 KiB), "
            "2 KiB pad",
            full=dict(STALLED, duration=4),
            quick=dict(STALLED, duration=3),
        ),
        Workload(
            "redis",
            "brokers",
            "the memory broker vs the Redis broker (1 and 2 workers), with and without "
            "roomcast.batch, at fanout100 and rooms, and one Redis vs a 3-master Redis Cluster "
            "at rooms (bench/brokers.py; its own redis-server and cluster)",
            full=dict(duration=4, rounds=2),
            quick=dict(duration=2, rounds=1),
        ),
        Workload(
            "rooms-v2",
            "multiroom",
            "people each in 20 of 100 rooms of 100: one v1 connection per room against one v2 "
            "connection each (and one v2 connection in one room each, to split a connection's "
            "memory from a subscription's); server RSS once joined, then 2 senders per room "
            "(2 messages in flight each), 64-byte pad",
            full=dict(MULTIROOM, people=500, rooms=100, duration=4, rounds=2),
            quick=dict(MULTIROOM, people=200, rooms=40, duration=2, rounds=1),
            servers=("roomcast-trio-batch", "roomcast-trio"),
        ),
        Workload(
            "idle",
            "idle",
            "idle connections in rooms of 10: connect rate and memory per connection",
            full=dict(connections=10_000, members=10, concurrency=50),
            quick=dict(connections=2_000, members=10, concurrency=50),
        ),
        Workload(
            "crowd",
            "crowd",
            "one room of N filled with 50 handshakes in flight, against N/10 rooms of 10: "
            "fill time and server CPU (a fresh server each)",
            full=dict(sizes=[2000, 5000], concurrency=50, rooms_of=10, limit=120, quiet=1.5),
            quick=dict(sizes=[1000, 2000], concurrency=50, rooms_of=10, limit=60, quiet=1.5),
            servers=("roomcast-trio-batch", "roomcast-trio", REFERENCE),
        ),
    ]
}


# -- process plumbing ------------------------------------------------------------------------


def raise_nofile(want: int = 1 << 17) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE (we are root: hard too); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(want, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def settled_rss(pid: int) -> float:
    """The tree's RSS once it has settled: a second after the load generator reported,
    the median of five samples 0.2 s apart."""
    time.sleep(1.0)
    samples = []
    for _ in range(5):
        samples.append(tree_rss(pid))
        time.sleep(0.2)
    return statistics.median(samples)


def vm_hwm(pid: int) -> dict[int, int]:
    """Peak RSS (VmHWM, bytes) of every process in the tree, from /proc."""
    out = {}
    for p in tree(pid):
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        out[p.pid] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return out


class Sampler(threading.Thread):
    """Samples, every ``interval`` seconds: the summed RSS and CPU time of the server's
    process tree, the load generator's CPU time, this runner's, and the machine's busy CPU
    time. Keeps the series (wall clock) so that peaks and CPU can be cut per round."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.series: list[tuple[float, int, float, float, float, float]] = []
        self.loadgen: psutil.Process | None = None
        self.hwm: dict[int, int] = {}
        self._halt = threading.Event()
        self._procs: list[psutil.Process] = []
        self._procs_at = 0.0
        self._self = psutil.Process()
        self._lg_cpu = 0.0

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> int:
        now = time.time()
        if now - self._procs_at > 1.0:
            self._procs = tree(self.pid)
            self._procs_at = now
        rss = 0
        cpu = 0.0
        for p in self._procs:
            try:
                rss += p.memory_info().rss
                t = p.cpu_times()
                cpu += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        if self.loadgen is not None:
            try:
                t = self.loadgen.cpu_times()
                self._lg_cpu = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        st = self._self.cpu_times()
        sc = psutil.cpu_times()
        busy = (
            sc.user + sc.nice + sc.system
        )  # irq/softirq time (loopback TCP) is nobody's process time
        if rss:
            self.series.append((now, rss, cpu, self._lg_cpu, st.user + st.system, busy))
        return rss

    @property
    def peak(self) -> int:
        return max((s[1] for s in self.series), default=0)

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Peak RSS and CPU use between two wall-clock times (widened to the samples around them)."""
        inside = [s for s in self.series if t0 <= s[0] <= t1]
        before = [s for s in self.series if s[0] < t0][-1:]
        after = [s for s in self.series if s[0] > t1][:1]
        span = before + inside + after
        if len(span) < 2:
            return {}
        first, last = span[0], span[-1]
        secs = last[0] - first[0]
        server = last[2] - first[2]
        loadgen = last[3] - first[3]
        runner = last[4] - first[4]
        busy = last[5] - first[5]
        cores = os.cpu_count() or 1
        return {
            "peak_rss_mb": _mb(max(s[1] for s in span)),
            "server_cpu_s": round(server, 3),
            "server_cpu_pct": round(100 * server / secs, 1) if secs else None,
            "loadgen_cpu_pct": round(100 * loadgen / secs, 1) if secs else None,
            # busy CPU on the machine that was neither the server, the load generator nor
            # this runner: other work competing for the 2 cores (noise)
            "other_cpu_pct": round(100 * max(0.0, busy - server - loadgen - runner) / secs, 1)
            if secs
            else None,
            "cores": cores,
        }

    def stop(self) -> None:
        self.hwm = vm_hwm(self.pid)  # before the server exits
        self._halt.set()
        self.join()
        self.sample()


class ServerProcess:
    def __init__(self, server: Server, args: argparse.Namespace, log_path: Path) -> None:
        self.server = server
        self.port = free_port()
        env = dict(os.environ)
        if server.roomcast_env:
            env["ROOMCAST_ARCHIVE"] = "off"  # unless the server says otherwise (below)
        scratch = tempfile.mkdtemp(prefix="roomcast-bench-")  # {tmpdir}: fresh per start
        env.update({k: v.replace("{tmpdir}", scratch) for k, v in server.env.items()})
        env["PYTHONUNBUFFERED"] = "1"
        if server.roomcast_env:
            env.update(
                ROOMCAST_RATE_LIMIT="0",
                ROOMCAST_ROOM_CAPACITY="0",
                ROOMCAST_OUTBOX_SIZE=str(args.outbox_size),
            )
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            server.command(self.port),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop it and its workers together
        )

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat"

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until an HTTP request gets any HTTP response (the worker, not just the socket)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.server.name} exited with {self.proc.returncode}; see {self.log_path}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(
                        b"GET /bench-ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                    )
                    if s.recv(16).startswith(b"HTTP/"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.server.name} not ready after {timeout}s; see {self.log_path}")

    def worker_pids(self) -> list[int]:
        procs = tree(self.proc.pid)
        return [p.pid for p in procs[1:]] or [self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=4)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # any worker left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.log.close()

    def log_errors(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count(
                "Traceback (most recent call last)"
            )
        except OSError:
            return 0


def loadgen_args(mode: str, url: str, params: dict[str, Any], server: Server) -> list[str]:
    argv = [PY, str(LOADGEN), mode, "--url", url]
    for key, value in params.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    if server.subprotocol:
        argv += ["--subprotocol", server.subprotocol]
    if server.deflate:
        argv.append("--deflate")
    return argv


# -- one measurement -------------------------------------------------------------------------


class Runner:
    def __init__(self, args: argparse.Namespace, stamp: str) -> None:
        self.args = args
        self.stamp = stamp
        self.logs = RESULTS / "logs" / stamp
        self.logs.mkdir(parents=True, exist_ok=True)
        self.py_spy = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")

    def wait_for_quiet_machine(self) -> float | None:
        """Other work on the machine skews every number: wait (bounded) until the rest of the
        machine uses under ``--quiet-cpu`` percent of a core. Returns what was last seen."""
        deadline = time.monotonic() + self.args.max_wait
        me = psutil.Process()
        other = None
        while True:
            c0, s0 = psutil.cpu_times(), me.cpu_times()
            time.sleep(0.5)
            c1, s1 = psutil.cpu_times(), me.cpu_times()
            busy = (c1.user + c1.nice + c1.system) - (c0.user + c0.nice + c0.system)
            mine = (s1.user + s1.system) - (s0.user + s0.system)
            other = round(100 * max(0.0, busy - mine) / 0.5, 1)
            if other <= self.args.quiet_cpu or time.monotonic() >= deadline:
                return other
            time.sleep(0.5)

    def start(self, server: Server, tag: str) -> ServerProcess:
        self.other_cpu_before = self.wait_for_quiet_machine()
        sp = ServerProcess(server, self.args, self.logs / f"{server.name}-{tag}.log")
        try:
            sp.wait_ready()
        except BaseException:
            sp.stop()
            raise
        time.sleep(0.3)
        return sp

    def _profile(self, sp: ServerProcess, tag: str) -> subprocess.Popen | None:
        if not (self.args.py_spy and sp.server.kind == "roomcast"):
            return None
        if not self.py_spy:
            log("bench: --py-spy given but py-spy is not installed (.venv/bin/pip install py-spy)")
            return None
        out = self.logs / f"{sp.server.name}-{tag}.py-spy.svg"
        pid = max(sp.worker_pids(), key=lambda p: psutil.Process(p).memory_info().rss)
        return subprocess.Popen(
            [
                self.py_spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "200",
                "--nonblocking",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def fanout(
        self,
        server: Server,
        params: dict[str, Any],
        tag: str,
        redis_nodes: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """One server process, one load generator run (its rounds, and its stalled rounds).
        With ``redis_nodes`` (name -> port), each round also gets ``redis_nodes``: what each
        of those Redis nodes handled during it (:class:`brokers.NodeSampler`)."""
        params = dict(params)
        params.setdefault("concurrency", server.join_concurrency)
        sp = self.start(server, tag)
        result: dict[str, Any] = {}
        sampler = Sampler(sp.proc.pid)
        nodes = brokers.NodeSampler(lambda: brokers.read_nodes(redis_nodes or {}))
        prof = None
        try:
            rss_start = sampler.sample()
            sampler.start()
            if redis_nodes:
                nodes.start()
            prof = self._profile(sp, tag)
            budget = 180 + params.get("rounds", 1) * 2 * (params.get("duration", 5) + 15)
            lg = subprocess.Popen(
                loadgen_args("fanout", sp.url, params, server),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            with contextlib.suppress(psutil.NoSuchProcess):
                sampler.loadgen = psutil.Process(lg.pid)
            try:
                out, err = lg.communicate(timeout=budget)
                result = _last_json(out) or {
                    "error": f"loadgen exit {lg.returncode}: {err[-2000:]}"
                }
            except subprocess.TimeoutExpired:
                lg.kill()
                lg.communicate()
                result = {"error": f"loadgen timed out after {budget}s"}
        finally:
            if prof is not None:
                prof.send_signal(signal.SIGINT)
                try:
                    prof.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    prof.kill()
            sampler.stop()
            if nodes.is_alive():
                nodes.stop()
            sp.stop()
        for r in result.get("rounds", []):
            r.update(sampler.window(*r["wall"]))
            if redis_nodes:
                r["redis_nodes"] = nodes.window(*r["wall"])
            if r.get("server_cpu_s") and r.get("delivered"):
                r["server_cpu_us_per_delivery"] = round(1e6 * r["server_cpu_s"] / r["delivered"], 1)
        stalled_at = result.get("stalled_connected_wall")
        series = sampler.series
        result.update(
            other_cpu_pct_before=self.other_cpu_before,
            rss_start_mb=_mb(rss_start),
            peak_rss_mb=_mb(sampler.peak),
            vm_hwm_mb={str(k): _mb(v) for k, v in sampler.hwm.items()},
            server_tracebacks=sp.log_errors(),
            log=str(sp.log_path.relative_to(REPO)),
        )
        if stalled_at:
            result["peak_rss_before_stalled_mb"] = _mb(
                max((x[1] for x in series if x[0] < stalled_at), default=0)
            )
            result["peak_rss_with_stalled_mb"] = _mb(
                max((x[1] for x in series if x[0] >= stalled_at), default=0)
            )
        return result

    def idle(
        self, server: Server, params: dict[str, Any], tag: str, workers: int = 1
    ) -> dict[str, Any]:
        """N idle connections on a fresh server (of ``workers`` workers), from as many
        load generator processes as the fd limit needs (:func:`idle_plan`): the server's
        RSS before and once they are connected (its master's apart), then a chat round
        trip while they are held."""
        plan = idle_plan(params["connections"], params["members"], open_file_limit(), workers)
        sp = self.start(server, tag)
        sampler = Sampler(sp.proc.pid)
        result: dict[str, Any] = {}
        loadgens: list[subprocess.Popen[str]] = []
        try:
            time.sleep(0.5)
            before = statistics.median(sampler.sample() or 0 for _ in range(3))
            sampler.start()
            connect_budget = 240 + plan["connections"] / 100
            for first, count in plan["processes"]:
                argv = loadgen_args(
                    "idle", sp.url, idle_loadgen_params(params, plan, first, count), server
                )
                loadgens.append(
                    subprocess.Popen(
                        [*argv, "--hold", str(connect_budget + 600)],
                        cwd=REPO,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
            deadline = time.monotonic() + connect_budget
            lines = [
                _readline(lg, timeout=max(1.0, deadline - time.monotonic())) for lg in loadgens
            ]
            result = merge_connected([json.loads(line) for line in lines if line], plan)
            if not all(lines):
                result["error"] = f"{lines.count('')} idle loadgen(s) printed nothing"
            connected_rss = settled_rss(sp.proc.pid)
            n = result.get("alive") or 0  # what the server holds, not what it closed
            result.update(
                rss_before_mb=_mb(before),
                rss_connected_mb=_mb(connected_rss),
                kb_per_connection=round((connected_rss - before) / n / 1024, 1) if n else None,
            )
            if sp.server.kind == "roomcast":  # python -m roomcast: the process is its master
                result["master_rss_mb"] = _mb(psutil.Process(sp.proc.pid).memory_info().rss)
            result["roundtrip"] = _probe(loadgens[0], params)
            for lg in loadgens:
                assert lg.stdin is not None
                with contextlib.suppress(BrokenPipeError):  # exited: its error is kept below
                    lg.stdin.write("close\n")
                    lg.stdin.flush()
            closed = [json.loads(line) for line in (_readline(lg, 60) for lg in loadgens) if line]
            result["alive_before_close"] = sum(c.get("alive_before_close", 0) for c in closed)
            codes: dict[str, int] = {}
            for c in closed:
                for code, count in c.get("close_codes_before", {}).items():
                    codes[code] = codes.get(code, 0) + count
            result["closed_by_server"] = codes
        except Exception as exc:  # keep the rest of the run going
            result["error"] = repr(exc)
        finally:
            for lg in loadgens:
                try:
                    lg.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    lg.kill()
                    lg.wait()
            sampler.stop()
            sp.stop()
        failed = [lg for lg in loadgens if lg.returncode]
        if failed and "error" not in result:
            err = failed[0].stderr.read() if failed[0].stderr else ""
            result["error"] = f"loadgen exit {failed[0].returncode}: {err[-2000:]}"
        result.update(
            peak_rss_mb=_mb(sampler.peak),
            server_tracebacks=sp.log_errors(),
            log=str(sp.log_path.relative_to(REPO)),
        )
        return result

    def multiroom(self, server: Server, params: dict[str, Any], tag: str) -> dict[str, Any]:
        """One layout of ``rooms-v2`` on a fresh server: the server's RSS before and once
        every connection has joined (median of 5 samples, like ``idle``), then the
        rounds, with their CPU windows (like ``fanout``)."""
        sp = self.start(server, tag)
        path = "/ws" if params.get("layout") == "v2" else "/ws/chat"
        url = f"ws://127.0.0.1:{sp.port}{path}"
        sampler = Sampler(sp.proc.pid)
        result: dict[str, Any] = {}
        joined: dict[str, Any] = {}
        lg = None
        try:
            time.sleep(0.5)
            before = statistics.median(sampler.sample() or 0 for _ in range(3))
            sampler.start()
            lg = subprocess.Popen(
                loadgen_args("multiroom", url, params, server),
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            with contextlib.suppress(psutil.NoSuchProcess):
                sampler.loadgen = psutil.Process(lg.pid)
            line = _readline(lg, timeout=300)
            joined = json.loads(line) if line else {"error": "multiroom loadgen printed nothing"}
            joined_rss = settled_rss(sp.proc.pid)
            assert lg.stdin is not None
            lg.stdin.write("go\n")
            lg.stdin.flush()
            budget = 120 + params.get("rounds", 1) * 2 * (params.get("duration", 5) + 15)
            out, err = lg.communicate(timeout=budget)
            result = _last_json(out) or {"error": f"loadgen exit {lg.returncode}: {err[-2000:]}"}
            if result.get("phase") == "joined":  # it printed nothing after the first line
                result = {"error": f"loadgen exit {lg.returncode}: {err[-2000:]}"}
            result.update(_memory(before, joined_rss, joined))
        except Exception as exc:  # keep the rest of the run going
            result["error"] = repr(exc)
            if lg is not None and lg.poll() is None:
                lg.kill()
                lg.communicate()
        finally:
            sampler.stop()
            sp.stop()
        for r in result.get("rounds", []):
            r.update(sampler.window(*r["wall"]))
            if r.get("server_cpu_s") and r.get("delivered"):
                r["server_cpu_us_per_delivery"] = round(1e6 * r["server_cpu_s"] / r["delivered"], 1)
        if "wall" in joined:  # connecting and joining, until presence settled
            window = sampler.window(*joined["wall"])
            result.update(
                join_server_cpu_s=window.get("server_cpu_s"),
                join_other_cpu_pct=window.get("other_cpu_pct"),
            )
        result.update(
            joined=joined,
            peak_rss_mb=_mb(sampler.peak),
            server_tracebacks=sp.log_errors(),
            log=str(sp.log_path.relative_to(REPO)),
        )
        return result


def _memory(before: float, joined_rss: float, joined: dict[str, Any]) -> dict[str, Any]:
    """What the server holds once everyone has joined, in all and per connection and
    per membership (subscription)."""
    growth = joined_rss - before
    n, m = joined.get("connected") or 0, joined.get("memberships") or 0
    return {
        "connected": n,
        "memberships": m,
        "connect_failures": joined.get("connect_failures"),
        "connect_s": joined.get("connect_s"),
        "rss_before_mb": _mb(before),
        "rss_joined_mb": _mb(joined_rss),
        "rss_growth_mb": _mb(growth),
        "kb_per_connection": round(growth / n / 1024, 1) if n else None,
        "kb_per_membership": round(growth / m / 1024, 2) if m else None,
    }


def _crowd_phase(
    runner: Runner, server: Server, params: dict[str, Any], tag: str
) -> dict[str, Any]:
    """One crowd fill against a fresh server process: the loadgen's result, with the
    server's CPU during the fill and until the presence traffic settled."""
    sp = runner.start(server, tag)
    sampler = Sampler(sp.proc.pid)
    result: dict[str, Any] = {}
    try:
        sampler.start()
        argv = loadgen_args("crowd", sp.url, params, server)
        lg = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=params["limit"] + 120
        )
        result = _last_json(lg.stdout) or {
            "error": f"loadgen exit {lg.returncode}: {lg.stderr[-2000:]}"
        }
    except subprocess.TimeoutExpired:
        result = {"error": "loadgen did not finish"}
    finally:
        sampler.stop()
        sp.stop()
    if "wall" in result:
        fill = sampler.window(*result["wall"])
        settled = sampler.window(*result["wall_settled"])
        result.update(
            server_cpu_s=fill.get("server_cpu_s"),
            server_cpu_pct=fill.get("server_cpu_pct"),
            settled_server_cpu_s=settled.get("server_cpu_s"),
            peak_rss_mb=settled.get("peak_rss_mb"),
            other_cpu_pct=fill.get("other_cpu_pct"),
        )
    result.update(server_tracebacks=sp.log_errors(), log=str(sp.log_path.relative_to(REPO)))
    return result


def crowd(runner: Runner, server: Server, params: dict[str, Any], tag: str) -> dict[str, Any]:
    """For each size N: one room of N, then N/10 rooms of ``rooms_of`` (10), each on a
    fresh server (the chapter app is still broadcasting a crowd's leaves long after)."""
    sizes: dict[str, Any] = {}
    for size in params["sizes"]:
        phases = {}
        for layout, rooms_of in (("one", 0), ("tens", params["rooms_of"])):
            phase = dict(
                members=size,
                rooms_of=rooms_of,
                concurrency=params["concurrency"],
                limit=params["limit"],
                quiet=params["quiet"],
                room_prefix=f"crowd-{layout}-",
            )
            phases[layout] = _crowd_phase(runner, server, phase, f"{tag}-{size}-{layout}")
        one, tens = phases["one"], phases["tens"]
        ratio = None
        if one.get("complete") and tens.get("complete") and tens.get("fill_s"):
            ratio = round(one["fill_s"] / tens["fill_s"], 2)
        sizes[str(size)] = {"one": one, "tens": tens, "fill_ratio": ratio}
    return {"sizes": sizes}


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout)
    return box[0].strip() if box else ""


#: descriptors a server worker keeps besides its WebSockets, or a tenth of its limit if
#: more: roomcast's default ``ROOMCAST_MAX_CONNECTIONS`` (``admission.default_max_connections``),
#: beyond which it answers handshakes with 503
FD_RESERVE = 500


def open_file_limit() -> int:
    """The hard RLIMIT_NOFILE this runner (and so every server and load generator it
    starts) has: the launcher raises a worker's soft limit to it, and only a process with
    CAP_SYS_RESOURCE could raise it further (:func:`raise_nofile` tried)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


#: the most connections one idle load generator process opens (one Python process, one
#: core: a big count is shared between several)
LOADGEN_SHARE = 50_000


#: the round trip's room (``bench/loadgen.py --probe-members``): it joins on top of the
#: idle connections, so they leave room for it
PROBE_MEMBERS = 10


def idle_plan(connections: int, members: int, fd_limit: int, workers: int = 1) -> dict[str, Any]:
    """How the idle workload opens ``connections``: at most as many as the server's
    ``workers`` can hold under ``fd_limit`` each (a connection is a descriptor; a worker at
    its limit leaves the next ones to the others) with the round trip's room on top, and
    in load generator processes of whole rooms that each stay within the same limit and
    :data:`LOADGEN_SHARE`. ``processes`` lists each one's (first connection, count)."""
    capacity = max(members, fd_limit - max(FD_RESERVE, fd_limit // 10))
    count = min(connections, workers * capacity - PROBE_MEMBERS)
    share = max(members, min(capacity, LOADGEN_SHARE) // members * members)
    return {
        "requested": connections,
        "connections": count,
        "fd_limit": fd_limit,
        "workers": workers,
        "capped_by_fd_limit": count < connections,
        "processes": [(first, min(share, count - first)) for first in range(0, count, share)],
    }


def idle_loadgen_params(
    params: dict[str, Any], plan: dict[str, Any], first: int, count: int
) -> dict[str, Any]:
    """One idle load generator process's share: its connections, numbered from
    ``first``, with the workload's handshakes in flight split between the processes."""
    share = dict(params, connections=count, first=first)
    share["concurrency"] = max(1, params.get("concurrency", 50) // len(plan["processes"]))
    return share


def merge_connected(reports: list[dict[str, Any]], plan: dict[str, Any]) -> dict[str, Any]:
    """The idle load generators' ``connected`` lines as one: they connected at once, so
    the time is the slowest one's."""
    connected = sum(r.get("connected", 0) for r in reports)
    seconds = max((r.get("connect_s", 0.0) for r in reports), default=0.0)
    sources = sorted(
        {a for r in reports for a in r.get("source_addresses", [])}, key=ipaddress.ip_address
    )
    return {
        "mode": "idle",
        "requested": plan["requested"],
        "connections": plan["connections"],
        "fd_limit": plan["fd_limit"],
        "workers": plan["workers"],
        "capped_by_fd_limit": plan["capped_by_fd_limit"],
        "processes": len(reports),
        "connected": connected,
        "alive": sum(r.get("alive", r.get("connected", 0)) for r in reports),
        "connect_failures": sum(r.get("connect_failures", 0) for r in reports),
        "first_failures": [f for r in reports for f in r.get("first_failures", [])][:3],
        "connect_s": seconds,
        "connects_per_s": round(connected / seconds) if seconds else 0,
        "settle_s": max((r.get("settle_s", 0.0) for r in reports), default=0.0),
        "per_address": reports[0].get("per_address") if reports else None,
        "source_addresses": [sources[0], sources[-1]] if sources else [],
    }


def _probe(loadgen: subprocess.Popen[str], params: dict[str, Any]) -> dict[str, Any]:
    """The chat round trip one idle load generator measures while every connection is held."""
    assert loadgen.stdin is not None
    try:
        loadgen.stdin.write("probe\n")
        loadgen.stdin.flush()
    except BrokenPipeError:
        return {"error": "the load generator exited"}
    line = _readline(loadgen, timeout=params.get("probe_seconds", 10) + 120)
    return json.loads(line) if line else {"error": "no probe result"}


def _last_json(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def _mb(n: float) -> float:
    return round(n / (1 << 20), 1)


# -- the suite -------------------------------------------------------------------------------


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median deliveries/s (the upper one of an even count), with the
    others' deliveries/s listed."""
    if not rounds:
        return {"error": "no round"}
    ordered = sorted(rounds, key=lambda r: r.get("deliveries_per_s") or 0)
    chosen = dict(ordered[len(ordered) // 2])
    chosen["rounds_deliveries_per_s"] = [r.get("deliveries_per_s") for r in rounds]
    return chosen


def pool_passes(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's runs from several passes as one run: every round counts toward the
    median; peaks are the highest seen; a failed pass is dropped (if all failed, the first
    error stands)."""
    ok = [r for r in raws if "error" not in r]
    if not ok:
        return raws[0]
    pooled = dict(ok[0])
    pooled["rounds"] = [
        dict(r, server_pass=n) for n, raw in enumerate(ok, 1) for r in raw.get("rounds", [])
    ]
    for key in ("peak_rss_mb", "peak_rss_before_stalled_mb", "peak_rss_with_stalled_mb"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            pooled[key] = max(values)
    pooled["server_tracebacks"] = sum(r.get("server_tracebacks") or 0 for r in ok)
    if all("order" in r for r in ok):
        pooled["order"] = {k: sum(r["order"][k] for r in ok) for k in ok[0]["order"]}
    pooled["passes"] = len(ok)
    return pooled


def summarize(mode: str, run: dict[str, Any]) -> dict[str, Any]:
    """The row a table shows for one server: its median round, and run-wide facts."""
    if "error" in run:
        return {"error": run["error"]}
    keep = (
        "connected",
        "connect_failures",
        "connect_s",
        "settle_s",
        "server_tracebacks",
        "peak_rss_mb",
        "rss_start_mb",
        "negotiated",
        "log",
        "order",
    )
    common = {k: run.get(k) for k in keep}
    rounds = run.get("rounds", [])
    if mode == "fanout":
        return {**common, **median_round([r for r in rounds if r["phase"] == "run"])}
    control = median_round([r for r in rounds if r["phase"] == "control"])
    stalled = median_round([r for r in rounds if r["phase"] == "stalled"])
    return {
        **common,
        "control": control,
        "stalled": stalled,
        "peak_rss_before_stalled_mb": run.get("peak_rss_before_stalled_mb"),
        "peak_rss_with_stalled_mb": run.get("peak_rss_with_stalled_mb"),
        "rss_growth_mb": round(
            (run.get("peak_rss_with_stalled_mb") or 0)
            - (run.get("peak_rss_before_stalled_mb") or 0),
            1,
        ),
        "stalled_end_state": run.get("stalled_end_state"),
        "healthy_ratio": round(stalled["deliveries_per_s"] / control["deliveries_per_s"], 3)
        if control.get("deliveries_per_s") and "deliveries_per_s" in stalled
        else None,
    }


def run_brokers(
    runner: Runner, args: argparse.Namespace, params: dict[str, Any], entry: dict[str, Any]
) -> None:
    """The ``redis`` workload: every broker configuration at its scenarios, ``--passes``
    times, against one redis-server and one 3-master cluster of its own (both flushed
    before each server), with what each Redis node handled in each round."""
    runs: dict[str, list[dict[str, Any]]] = {}
    with brokers.open_backends() as backends:
        servers = backends.servers()
        entry["params"] = {
            scenario: dict(WORKLOADS[scenario].params(args.quick), **params)
            for scenario in brokers.SCENARIOS
        }
        for n in range(args.passes):
            for scenario, scenario_params in entry["params"].items():
                for server in brokers.servers_for(scenario, servers):
                    backends.flush()
                    t0 = time.monotonic()
                    tag = f"redis-{scenario}" + (f"-pass{n + 1}" if args.passes > 1 else "")
                    try:
                        raw = runner.fanout(
                            server, scenario_params, tag, backends.nodes(server.name)
                        )
                    except Exception as exc:
                        raw = {"error": repr(exc)}
                    key = f"{server.name}@{scenario}"
                    runs.setdefault(key, []).append(raw)
                    row = summarize("fanout", raw)
                    log(
                        f"redis/{scenario:<10} {server.name:<16} {time.monotonic() - t0:5.1f}s  "
                        f"{brief('fanout', row)} order {raw.get('order')}"
                        + _node_brief(row.get("redis_nodes"))
                    )
    for key, raws in runs.items():
        raw = raws[0] if len(raws) == 1 else pool_passes(raws)
        entry["raw"][key] = raws if len(raws) > 1 else raw
        entry["servers"][key] = summarize("fanout", raw)


def _node_brief(nodes: dict[str, Any] | None) -> str:
    """``; pub/sub per node 34%/31%/35%`` for a log line (nothing without nodes)."""
    if not nodes:
        return ""
    shares = "/".join(
        f"{100 * n['share']:.0f}%" if n.get("share") is not None else "-" for n in nodes.values()
    )
    return f"; pub/sub per node {shares}"


def run_multiroom(
    runner: Runner,
    args: argparse.Namespace,
    params: dict[str, Any],
    entry: dict[str, Any],
    servers: list[Server],
) -> None:
    """The ``rooms-v2`` workload: every layout on every server, ``--passes`` times, each
    on a fresh server process. Rows are keyed ``server@layout``."""
    runs: dict[str, list[dict[str, Any]]] = {}
    entry["layouts"] = {name: dict(params, **layout) for name, layout in LAYOUTS.items()}
    for n in range(args.passes):
        for server in servers:
            for layout, layout_params in entry["layouts"].items():
                t0 = time.monotonic()
                tag = f"rooms-v2-{layout}" + (f"-pass{n + 1}" if args.passes > 1 else "")
                try:
                    raw = runner.multiroom(server, layout_params, tag)
                except Exception as exc:
                    raw = {"error": repr(exc)}
                key = f"{server.name}@{layout}"
                runs.setdefault(key, []).append(raw)
                row = summarize_multiroom(raw)
                log(
                    f"rooms-v2/{layout:<9} {server.name:<20} {time.monotonic() - t0:5.1f}s  "
                    f"{row.get('connected')} conns, {row.get('memberships')} memberships, "
                    f"RSS {row.get('rss_joined_mb')} MB ({row.get('kb_per_connection')} KB/conn); "
                    + (brief("fanout", row) if row.get("deliveries_per_s") is not None else "")
                    + f" order {raw.get('order')}"
                )
    for key, raws in runs.items():
        raw = raws[0] if len(raws) == 1 else pool_multiroom(raws)
        entry["raw"][key] = raws if len(raws) > 1 else raw
        entry["servers"][key] = summarize_multiroom(raw)


def pool_multiroom(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """Several passes of one layout as one: the rounds pooled (as :func:`pool_passes`),
    the memory figures the median of the passes'."""
    pooled = pool_passes(raws)
    ok = [r for r in raws if "error" not in r]
    for key in (
        "connect_s",
        "join_server_cpu_s",
        "rss_before_mb",
        "rss_joined_mb",
        "rss_growth_mb",
        "kb_per_connection",
        "kb_per_membership",
    ):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            pooled[key] = round(statistics.median(values), 2)
            pooled[f"{key}_passes"] = values
    return pooled


def summarize_multiroom(run: dict[str, Any]) -> dict[str, Any]:
    """A layout's row: its memory, its median round (if it had rounds), run-wide facts."""
    if "error" in run:
        return {"error": run["error"]}
    keep = (
        "connected",
        "memberships",
        "connect_failures",
        "connect_s",
        "join_server_cpu_s",
        "join_other_cpu_pct",
        "rss_before_mb",
        "rss_joined_mb",
        "rss_growth_mb",
        "kb_per_connection",
        "kb_per_membership",
        "peak_rss_mb",
        "negotiated",
        "close_codes",
        "alive_at_end",
        "order",
        "server_tracebacks",
        "log",
    )
    row = {k: run.get(k) for k in keep}
    rounds = run.get("rounds") or []
    if rounds:
        row.update(median_round(rounds))
    return row


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    runner = Runner(args, stamp)
    servers = [SERVERS[name] for name in args.servers]
    report: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_state(),
        "args": {k: v for k, v in vars(args).items()},
        "reference": REFERENCE,
        "workloads": {},
    }
    t_suite = time.monotonic()
    for wname in args.workloads:
        w = WORKLOADS[wname]
        params = w.params(args.quick)
        if args.rounds and w.mode != "idle":
            params["rounds"] = args.rounds
        if args.duration and w.mode != "idle":
            params["duration"] = args.duration
        if args.idle_concurrency and w.mode == "idle":
            params["concurrency"] = args.idle_concurrency
        if args.connections and w.mode == "idle":
            params["connections"] = (
                args.connections[0] if len(args.connections) == 1 else args.connections
            )
        entry: dict[str, Any] = {
            "title": w.title,
            "mode": w.mode,
            "params": params,
            "servers": {},
            "raw": {},
        }
        report["workloads"][wname] = entry
        if w.mode == "brokers":
            try:
                run_brokers(runner, args, params, entry)
            except RuntimeError as exc:  # no redis-server here: the rest of the run goes on
                entry["error"] = str(exc)
                log(f"{wname}: {exc}")
            continue
        if w.mode == "multiroom":
            chosen = [s for s in servers if w.servers is None or s.name in w.servers]
            run_multiroom(runner, args, params, entry, chosen)
            continue
        if w.mode == "idle":
            run_idle(runner, args, params, entry, [s for s in servers if s.idle])
            continue
        passes = 1 if w.mode == "crowd" else args.passes
        runs: dict[str, list[dict[str, Any]]] = {}
        for n in range(passes):
            for server in servers:
                if w.servers is not None and server.name not in w.servers:
                    continue
                t0 = time.monotonic()
                tag = wname if passes == 1 else f"{wname}-pass{n + 1}"
                try:
                    if w.mode == "crowd":
                        raw = crowd(runner, server, params, tag)
                    else:
                        raw = runner.fanout(server, params, tag)
                except Exception as exc:
                    raw = {"error": repr(exc)}
                runs.setdefault(server.name, []).append(raw)
                row = raw if w.mode == "crowd" else summarize(w.mode, raw)
                label = wname if passes == 1 else f"{wname}/{n + 1}"
                log(
                    f"{label:<12} {server.name:<24} {time.monotonic() - t0:5.1f}s  {brief(w.mode, row)}"
                )
        for name, raws in runs.items():
            raw = raws[0] if len(raws) == 1 else pool_passes(raws)
            entry["raw"][name] = raws if len(raws) > 1 else raw
            entry["servers"][name] = raw if w.mode == "crowd" else summarize(w.mode, raw)
    report["seconds"] = round(time.monotonic() - t_suite, 1)
    report["targets"] = targets(report)
    return report


def run_idle(
    runner: Runner,
    args: argparse.Namespace,
    params: dict[str, Any],
    entry: dict[str, Any],
    servers: list[Server],
) -> None:
    """The ``idle`` workload: every server at every count asked for (``--connections``,
    comma-separated), each on a fresh server. Rows are keyed by the server's name, or
    ``server@count`` when there are several counts. With ``--idle-workers W`` (more than
    one), roomcast runs W workers and a Redis broker of its own (the launcher refuses
    several workers without one): a way past one process's fd limit."""
    counts = params["connections"]
    counts = counts if isinstance(counts, list) else [counts]
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(brokers.open_redis()) if args.idle_workers > 1 else None
        for count in counts:
            for server in servers:
                key = server.name if len(counts) == 1 else f"{server.name}@{count}"
                workers = args.idle_workers if redis and server.kind == "roomcast" else 1
                t0 = time.monotonic()
                try:
                    if redis is not None and workers > 1:
                        redis.command("FLUSHALL")
                        server = with_workers(server, workers, redis.url)
                    raw = runner.idle(
                        server, dict(params, connections=count), f"idle-{count}", workers
                    )
                except Exception as exc:
                    raw = {"error": repr(exc)}
                entry["raw"][key] = entry["servers"][key] = raw
                log(f"{'idle':<12} {key:<24} {time.monotonic() - t0:5.1f}s  {brief('idle', raw)}")


def with_workers(server: Server, workers: int, redis_url: str) -> Server:
    """``server`` (``python -m roomcast``) with ``workers`` workers on a Redis broker."""
    argv = list(server.argv)
    argv[argv.index("--workers") + 1] = str(workers)
    env = dict(server.env, ROOMCAST_REDIS_URL=redis_url)
    return replace(server, argv=tuple(argv), env=env)


def brief(mode: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + str(r["error"])[:300]
    if mode == "idle":
        master = f", master {r['master_rss_mb']} MB" if r.get("master_rss_mb") else ""
        trip = r.get("roundtrip") or {}
        return (
            f"{r.get('connected')} connected in {r.get('connect_s')} s "
            f"({r.get('connects_per_s')} conn/s), {r.get('kb_per_connection')} KB/conn{master}, "
            f"round trip p50 {trip.get('p50_ms')} / p99 {trip.get('p99_ms')} ms"
        )
    if mode == "crowd":
        return "; ".join(
            f"{n}: one room {_fill(x['one'])}, rooms of 10 {_fill(x['tens'])}, "
            f"ratio {x['fill_ratio']}"
            for n, x in r["sizes"].items()
        )

    def one(x: dict[str, Any]) -> str:
        if "error" in x:
            return "ERROR " + str(x["error"])[:200]
        flag = "" if x.get("complete") else " INCOMPLETE"
        return (
            f"{x.get('deliveries_per_s')}/s p50 {x.get('p50_ms')} p99 {x.get('p99_ms')} ms "
            f"cpu {x.get('server_cpu_us_per_delivery')} us/deliv other {x.get('other_cpu_pct')}%{flag}"
        )

    if mode == "stalled":
        return (
            f"control {one(r['control'])} | stalled {one(r['stalled'])} | rss "
            f"{r.get('peak_rss_before_stalled_mb')} -> {r.get('peak_rss_with_stalled_mb')} MB, "
            f"stalled clients: {r.get('stalled_end_state')}"
        )
    return f"{one(r)} rss {r.get('peak_rss_mb')} MB connect {r.get('connect_s')}s"


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except Exception:
            return ""

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "dirty_src": bool(git("status", "--porcelain", "--", "src")),
    }


def machine() -> dict[str, Any]:
    versions = {}
    for pkg in [
        "roomcast",
        "hypercorn",
        "trio",
        "anyio",
        "uvicorn",
        "starlette",
        "broadcaster",
        "websockets",
        "picows",
        "uvloop",
        "orjson",
        "wsproto",
        "h11",
    ]:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / (1 << 30), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "rlimit_nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "versions": versions,
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- verdicts on the targets -----------------------------------------------------------


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    W = report["workloads"]

    def get(w: str, s: str) -> dict[str, Any] | None:
        r = W.get(w, {}).get("servers", {}).get(s)
        return r if r and "error" not in r else None

    for w in ("fanout100", "fanout1000"):
        if w not in W:
            continue
        batch = get(w, "roomcast-trio-batch")
        plain = get(w, "roomcast-trio")
        ref = get(w, REFERENCE)
        baselines = {
            n: r
            for n, r in W[w]["servers"].items()
            if SERVERS[n].kind == "baseline" and "error" not in r
        }
        if batch and baselines:
            best = max(baselines, key=lambda n: baselines[n].get("deliveries_per_s", 0))
            b = baselines[best]["deliveries_per_s"]
            out.append(
                dict(
                    target=f"{w}: roomcast-trio-batch deliveries/s >= 1.5x every baseline (goal 2x)",
                    met=batch["deliveries_per_s"] >= 1.5 * b,
                    detail=f"{batch['deliveries_per_s']:,}/s vs best baseline {best} {b:,}/s "
                    f"({batch['deliveries_per_s'] / b:.2f}x)"
                    if b
                    else "",
                )
            )
        if batch and ref:
            out.append(
                dict(
                    target=f"{w}: roomcast-trio-batch p99 < {REFERENCE} p99",
                    met=(batch.get("p99_ms") or 1e9) < (ref.get("p99_ms") or 0),
                    detail=f"{batch.get('p99_ms')} ms vs {ref.get('p99_ms')} ms",
                )
            )
        if plain and ref and ref.get("deliveries_per_s"):
            ratio = plain["deliveries_per_s"] / ref["deliveries_per_s"]
            out.append(
                dict(
                    target=f"{w}: roomcast-trio (no batching) >= 2x {REFERENCE}",
                    met=ratio >= 2,
                    detail=f"{plain['deliveries_per_s']:,}/s vs {ref['deliveries_per_s']:,}/s ({ratio:.2f}x)",
                )
            )
    if "crowd" in W:
        for name, r in W["crowd"]["servers"].items():
            if SERVERS[name].kind != "roomcast" or "error" in r:
                continue
            for size, x in r["sizes"].items():
                one, tens = x["one"], x["tens"]
                out.append(
                    dict(
                        target=f"crowd: {name} fills one room of {int(size):,} in at most 2x "
                        f"the time of {int(size) // 10:,} rooms of 10",
                        met=x.get("fill_ratio") is not None and x["fill_ratio"] <= 2.0,
                        detail=f"{_fill(one)} vs {_fill(tens)}"
                        + (f" ({x['fill_ratio']:.2f}x)" if x.get("fill_ratio") else ""),
                    )
                )
    if "idle" in W:
        out.extend(idle_targets(W["idle"]["servers"]))
    if "redis" in W:
        out.extend(broker_targets(W["redis"]["servers"]))
    if "rooms-v2" in W:
        out.extend(multiroom_targets(W["rooms-v2"]["servers"]))
    if "stalled" in W:
        S = {n: r for n, r in W["stalled"]["servers"].items() if "error" not in r}
        for name in ("roomcast-trio-batch", "roomcast-trio"):
            r = S.get(name)
            if not r or r.get("healthy_ratio") is None:
                continue
            out.append(
                dict(
                    target=f"stalled: {name} healthy throughput >= 0.9x its rounds without stalled readers",
                    met=r["healthy_ratio"] >= 0.9 and bool(r["stalled"].get("complete")),
                    detail=f"{r['stalled']['deliveries_per_s']:,}/s vs {r['control']['deliveries_per_s']:,}/s "
                    f"({r['healthy_ratio']:.2f}x); stalled clients: {r.get('stalled_end_state')}",
                )
            )
        rc = {n: r["rss_growth_mb"] for n, r in S.items() if SERVERS[n].kind == "roomcast"}
        unb = {n: r["rss_growth_mb"] for n, r in S.items() if SERVERS[n].bounded is False}
        if rc and unb:
            # What the outboxes can hold: every stalled member's outbox full of events of
            # this size (pad + ~200 bytes of JSON); evicted members free theirs.
            p = W["stalled"]["params"]
            event_bytes = p.get("pad", 0) + 200
            bound = p.get("stalled", 0) * report["args"]["outbox_size"] * event_bytes / 1e6
            out.append(
                dict(
                    target="stalled: roomcast peak RSS stays bounded by its outbox settings "
                    "while unbounded baselines grow",
                    met=max(rc.values()) <= bound < max(unb.values()),
                    detail=f"outbox bound {bound:.1f} MB ({p.get('stalled')} stalled x "
                    f"{report['args']['outbox_size']} events x {event_bytes} B); "
                    "peak RSS growth with the stalled readers, MB: "
                    + ", ".join(f"{n} {r['rss_growth_mb']:+}" for n, r in S.items()),
                )
            )
    return out


#: issue 24: server RSS per idle connection on the Trio worker, KB, by whether the
#: clients offer permessage-deflate; and the master's RSS, MB
IDLE_KB_LIMIT = {False: 20.0, True: 40.0}
MASTER_MB_LIMIT = 20.0


def idle_targets(S: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 24's targets for every roomcast server on the Trio worker at every count
    measured: KB per idle connection, the master's RSS, and a chat round trip answered in
    full while the connections are held (its p50 and p99 beside each)."""
    out: list[dict[str, Any]] = []
    for key, r in S.items():
        server = SERVERS.get(key.partition("@")[0])
        if server is None or server.kind != "roomcast" or "trio" not in server.argv:
            continue
        if "error" in r or r.get("kb_per_connection") is None:
            continue
        at = f"idle: {server.name} at {r.get('connected'):,} connections{_idle_setup(r)}"
        trip = r.get("roundtrip") or {}
        held = f"round trip p50 {trip.get('p50_ms')} / p99 {trip.get('p99_ms')} ms while held"
        limit = IDLE_KB_LIMIT[server.deflate]
        clients = "offering permessage-deflate" if server.deflate else "without compression"
        out.append(
            dict(
                target=f"{at}: <= {limit:g} KB per idle connection (clients {clients})",
                met=r["kb_per_connection"] <= limit,
                detail=f"{r['kb_per_connection']} KB ({r.get('rss_before_mb')} -> "
                f"{r.get('rss_connected_mb')} MB); {held}",
            )
        )
        if r.get("master_rss_mb") is not None:
            out.append(
                dict(
                    target=f"{at}: master RSS <= {MASTER_MB_LIMIT:g} MB",
                    met=r["master_rss_mb"] <= MASTER_MB_LIMIT,
                    detail=f"{r['master_rss_mb']} MB",
                )
            )
        out.append(
            dict(
                target=f"{at}: a chat round trip answered in full while they are held",
                met=bool(trip.get("expected")) and trip.get("received") == trip.get("expected"),
                detail=trip.get("error")
                or f"{trip.get('received')}/{trip.get('expected')} deliveries; {held} "
                f"(max {trip.get('max_ms')} ms){_idle_losses(r)}",
            )
        )
    return out


def _best_round(r: dict[str, Any]) -> float | None:
    """The fastest round: the one other work on the machine disturbed least (the reason
    ``timeit`` reports its best repetition)."""
    return max((x for x in r.get("rounds_deliveries_per_s") or [] if x), default=None)


def broker_targets(S: dict[str, Any]) -> list[dict[str, Any]]:
    """The Redis issue's targets, from one run's ``redis`` workload: met or not on the
    median rounds; the best rounds' ratio is given beside it."""
    out: list[dict[str, Any]] = []

    def rates(name: str, scenario: str) -> tuple[float, float | None] | None:
        r = S.get(f"{name}@{scenario}")
        if not r or "error" in r or not r.get("deliveries_per_s"):
            return None
        return r["deliveries_per_s"], _best_round(r)

    def compare(target: str, a: str, b: str, sc: str, threshold: float) -> None:
        x, y = rates(a, sc), rates(b, sc)
        if x and y:
            best = f"; best rounds {x[1] / y[1]:.2f}x" if x[1] and y[1] else ""
            out.append(
                dict(
                    target=target,
                    met=x[0] / y[0] >= threshold,
                    detail=f"{x[0]:,}/s vs {y[0]:,}/s ({x[0] / y[0]:.2f}x{best})",
                )
            )

    for sc in brokers.SCENARIOS:
        compare(
            f"redis/{sc}: Redis broker, 1 worker, batching >= 0.5x memory broker",
            "redis-1w-batch",
            "memory-batch",
            sc,
            0.5,
        )
        for batch in ("-batch", ""):
            compare(
                f"redis/{sc}: redis-2w{batch} faster than redis-1w{batch}",
                f"redis-2w{batch}",
                f"redis-1w{batch}",
                sc,
                1.0 + 1e-9,
            )
    out.extend(cluster_targets(S))
    faults = {
        key: r["order"]
        for key, r in S.items()
        if r.get("order") and (r["order"].get("duplicates") or r["order"].get("gaps"))
    }
    out.append(
        dict(
            target="redis: no duplicate, out-of-order or missing delivery in any run",
            met=not faults,
            detail=", ".join(f"{k}: {v}" for k, v in faults.items()) or "0 duplicates, 0 gaps",
        )
    )
    return out


def cluster_targets(S: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 25's bench targets, from the median round of each cluster configuration: the
    publishes spread over the masters, and (reported, not judged: ``met`` None) its
    deliveries/s against the same workers on one Redis."""
    out: list[dict[str, Any]] = []
    low, high = brokers.SHARE_BOUNDS
    for sc in brokers.CLUSTER_SCENARIOS:
        for name, single in brokers.SINGLE_OF.items():
            r = S.get(f"{name}@{sc}")
            if not r or "error" in r:
                continue
            nodes = r.get("redis_nodes") or {}
            out.append(
                dict(
                    target=f"redis/{sc}: {name}: each master carries between {low:.0%} and "
                    f"{high:.0%} of the publishes (about a third), and no classic PUBLISH",
                    met=brokers.sharded(nodes),
                    detail=_shares(nodes),
                )
            )
            one = S.get(f"{single}@{sc}") or {}
            x, y = r.get("deliveries_per_s"), one.get("deliveries_per_s")
            if x and y:
                out.append(
                    dict(
                        target=f"redis/{sc}: {name} deliveries/s vs {single} (reported: on "
                        "one machine the cluster adds processes and script calls, no cores)",
                        met=None,
                        detail=f"{x:,}/s vs {y:,}/s ({x / y:.2f}x); {_costs(r)} vs {_costs(one)}",
                    )
                )
    return out


def _costs(r: dict[str, Any]) -> str:
    """What a configuration's messages cost it: how many a script call carried (a batch is
    one call per hash slot on a cluster) and the roomcast workers' CPU per delivery."""
    scripts = sum(n.get("scripts", 0) for n in (r.get("redis_nodes") or {}).values())
    per_call = f"{r['sent'] / scripts:.1f}" if scripts and r.get("sent") else "-"
    return f"{per_call} messages per script run, {fmt(r.get('server_cpu_us_per_delivery'), 1)} µs CPU/delivery"


def _shares(nodes: dict[str, Any]) -> str:
    """``SPUBLISH per master: 34.1% (1,234), ...; PUBLISH 0`` for a target's detail."""
    if not nodes:
        return "no node counters"
    parts = ", ".join(f"{_pct(n.get('share'))} ({n.get('spublish', 0):,})" for n in nodes.values())
    publish = sum(n.get("publish", 0) for n in nodes.values())
    return f"SPUBLISH per master: {parts}; PUBLISH {publish:,}"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _layouts(S: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``server@layout`` rows as {server: {layout: row}}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, row in S.items():
        server, _, layout = key.partition("@")
        out.setdefault(server, {})[layout] = row
    return out


def multiroom_memory(rows: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Memory per connection and per extra subscription, from one server's layouts: a v2
    connection in one room is a connection and its first subscription; the 19 more rooms
    each of the same connections joins in the ``v2`` layout cost the difference."""
    v1, v2, one = rows.get("v1", {}), rows.get("v2", {}), rows.get("v2-1room", {})
    out: dict[str, float | None] = {
        "kb_per_v1_connection": v1.get("kb_per_connection"),
        "kb_per_v2_connection_one_room": one.get("kb_per_connection"),
        "kb_per_extra_subscription": None,
        "rss_ratio": None,
        "growth_ratio": None,
    }
    extra = (v2.get("memberships") or 0) - (one.get("memberships") or 0)
    if extra > 0 and v2.get("rss_growth_mb") is not None and one.get("rss_growth_mb") is not None:
        out["kb_per_extra_subscription"] = round(
            (v2["rss_growth_mb"] - one["rss_growth_mb"]) * 1024 / extra, 2
        )
    if v1.get("rss_joined_mb") and v2.get("rss_joined_mb") is not None:
        out["rss_ratio"] = round(v2["rss_joined_mb"] / v1["rss_joined_mb"], 3)
    if v1.get("rss_growth_mb") and v2.get("rss_growth_mb") is not None:
        out["growth_ratio"] = round(v2["rss_growth_mb"] / v1["rss_growth_mb"], 3)
    return out


def multiroom_targets(S: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for protocol v2, per server (batching or not): RSS at most
    1/5 of v1's for the same people, deliveries/s at least v1's, nothing twice or lost."""
    out: list[dict[str, Any]] = []
    for server, rows in _layouts(S).items():
        v1, v2 = rows.get("v1", {}), rows.get("v2", {})
        if "error" in v1 or "error" in v2 or not v1 or not v2:
            continue
        mem = multiroom_memory(rows)
        if mem["growth_ratio"] is not None and mem["rss_ratio"] is not None:
            # What the people cost the server: its RSS over the same server with nobody
            # connected (a fixed ~100 MB for the launcher's two interpreters)
            out.append(
                dict(
                    target=f"rooms-v2: {server}: server memory for the same people with v2 "
                    "at most 1/5 of v1's (RSS growth over the empty server)",
                    met=mem["growth_ratio"] <= 0.2,
                    detail=f"{v2['rss_growth_mb']} MB vs {v1['rss_growth_mb']} MB "
                    f"({mem['growth_ratio']:.3f}x); whole server RSS {v2['rss_joined_mb']} vs "
                    f"{v1['rss_joined_mb']} MB ({mem['rss_ratio']:.2f}x), empty "
                    f"{v2['rss_before_mb']} / {v1['rss_before_mb']} MB",
                )
            )
        d1, d2 = v1.get("deliveries_per_s"), v2.get("deliveries_per_s")
        if d1 and d2:
            b1, b2 = _best_round(v1), _best_round(v2)
            best = f"; best rounds {b2 / b1:.2f}x" if b1 and b2 else ""
            out.append(
                dict(
                    target=f"rooms-v2: {server}: deliveries/s with v2 at least v1's",
                    met=d2 >= d1,
                    detail=f"{d2:,}/s vs {d1:,}/s ({d2 / d1:.2f}x{best})",
                )
            )
    faults = {
        key: r["order"]
        for key, r in S.items()
        if r.get("order") and (r["order"].get("duplicates") or r["order"].get("gaps"))
    }
    incomplete = [key for key, r in S.items() if r.get("complete") is False]
    failures = {key: r["connect_failures"] for key, r in S.items() if r.get("connect_failures")}
    out.append(
        dict(
            target="rooms-v2: every receiver got each of its rooms' messages once, in order",
            met=not faults and not incomplete and not failures,
            detail=(", ".join(f"{k}: {v}" for k, v in faults.items()) or "0 duplicates, 0 gaps")
            + (f"; incomplete rounds: {', '.join(incomplete)}" if incomplete else "")
            + (f"; connect failures: {failures}" if failures else ""),
        )
    )
    return out


def multiroom_table(report: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    """One row per server and layout (ratios against v1 on the same server in this
    run), then what a connection and a subscription cost."""
    S = entry["servers"]
    p = entry["params"]
    k = p.get("rooms_per_person")
    lines = [
        f"{p.get('people'):,} people, each in {k} of {p.get('rooms')} rooms "
        f"({p.get('people', 0) * k // max(1, p.get('rooms', 1))} members per room): `v1` one "
        f"connection per (person, room), `v2` one connection per person joining its {k} "
        "rooms, `v2-1room` one connection per person in one room (memory only). Each on a "
        "fresh server; no permessage-deflate (picows offers none). join s: from the first "
        f"handshake until every welcome arrived ({p.get('concurrency')} connections in flight, "
        "a v2 one sending its joins at once), with the server's CPU in that time. RSS: the "
        "server's (launcher and worker), "
        "median of 5 samples 1 s after every welcome arrived and presence settled; growth: "
        f"over the same server before any connection. Then {p.get('senders')} members of "
        f"each room send into it ({p.get('window')} messages in flight each): "
        f"{_passes(report)}{p.get('rounds', 1)} round(s) of {p.get('duration')} s; median "
        "round shown. dup / gaps: per receiver and room, over the whole run.",
        "",
        "| server | layout | connections | subscriptions | join s | server CPU s | RSS MB "
        "| vs v1 | growth MB | vs v1 | KB/connection | KB/subscription | deliveries/s | vs v1 "
        "| best round/s | server CPU µs/delivery | p99 ms | events/frame | dup / gaps | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    by_server = _layouts(S)
    for server, rows in by_server.items():
        v1 = rows.get("v1", {})
        for layout, r in rows.items():
            if "error" in r:
                lines.append(f"| {server} | {layout} |" + " - |" * 17 + f" {notes(r)} |")
                continue
            d = r.get("deliveries_per_s")
            order = r.get("order") or {}
            faults = f"{order.get('duplicates', '-')} / {order.get('gaps', '-')}" if d else "-"
            lines.append(
                f"| {server} | {layout} | {fmt(r.get('connected'))} | {fmt(r.get('memberships'))} "
                f"| {fmt(r.get('connect_s'), 1)} | {fmt(r.get('join_server_cpu_s'), 1)} "
                f"| {fmt(r.get('rss_joined_mb'), 1)} "
                f"| {ratio(r.get('rss_joined_mb'), v1.get('rss_joined_mb'))} "
                f"| {fmt(r.get('rss_growth_mb'), 1)} "
                f"| {ratio(r.get('rss_growth_mb'), v1.get('rss_growth_mb'))} "
                f"| {fmt(r.get('kb_per_connection'), 1)} | {fmt(r.get('kb_per_membership'), 2)} "
                f"| {fmt(d)} | {ratio(d, v1.get('deliveries_per_s'))} | {fmt(_best_round(r))} "
                f"| {fmt(r.get('server_cpu_us_per_delivery'), 1)} | {fmt(r.get('p99_ms'), 1)} "
                f"| {fmt(r.get('events_per_frame'), 1)} | {faults} | {notes(r)} |"
            )
    lines += [
        "",
        "| server | KB per v1 connection (1 room) | KB per v2 connection (1 room) "
        "| KB per extra subscription (v2) | v2 RSS / v1 RSS | v2 growth / v1 growth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for server, rows in by_server.items():
        mem = multiroom_memory(rows)
        lines.append(
            f"| {server} | {fmt(mem['kb_per_v1_connection'], 1)} "
            f"| {fmt(mem['kb_per_v2_connection_one_room'], 1)} "
            f"| {fmt(mem['kb_per_extra_subscription'], 2)} | {fmt(mem['rss_ratio'], 3)} "
            f"| {fmt(mem['growth_ratio'], 3)} |"
        )
    return lines


# -- tables ----------------------------------------------------------------------------------


def _fill(x: dict[str, Any]) -> str:
    if "error" in x:
        return "ERROR " + str(x["error"])[:200]
    if not x.get("complete"):
        return f"{x.get('connected'):,} of {x.get('members'):,} in {x.get('fill_s')} s"
    return f"{x.get('fill_s')} s (cpu {x.get('server_cpu_s')} s)"


def verdict(met: bool | None) -> str:
    """A target's cell: met, not met, or a figure reported rather than judged (None)."""
    return "reported" if met is None else "yes" if met else "NO"


def fmt(v: Any, nd: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, float)):
        if nd and abs(v) < 100:
            return f"{v:.{nd}f}"
        return f"{v:,.0f}"
    return str(v)


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def notes(r: dict[str, Any], *, noise: bool = True) -> str:
    if "error" in r:
        return "ERROR: " + str(r["error"])[:120]
    n = []
    if r.get("complete") is False:
        n.append(f"incomplete ({r.get('delivered'):,}/{r.get('expected'):,})")
    if r.get("short_receivers"):
        n.append(f"{r['short_receivers']} receivers short")
    if r.get("unexpected_closes"):
        n.append(f"{r['unexpected_closes']} healthy clients closed")
    if r.get("connect_failures"):
        n.append(f"{r['connect_failures']} connect failures")
    if r.get("server_tracebacks"):
        n.append(f"{r['server_tracebacks']} server tracebacks")
    if r.get("events_per_frame") and r["events_per_frame"] > 1.05:
        n.append(f"{r['events_per_frame']} events/frame")
    rounds = r.get("rounds_deliveries_per_s") or []
    if len(rounds) > 1:
        n.append(
            "rounds " + "/".join(f"{x / 1000:.0f}k" if x and x >= 1000 else str(x) for x in rounds)
        )
    if noise and (r.get("other_cpu_pct") or 0) >= 15:
        n.append(f"other load {r['other_cpu_pct']:.0f}% CPU")
    return "; ".join(n)


def _passes(report: dict[str, Any]) -> str:
    n = report["args"].get("passes") or 1
    return f"{n} passes through the servers (a fresh process each), each with " if n > 1 else ""


def crowd_table(servers: dict[str, Any], p: dict[str, Any]) -> list[str]:
    lines = [
        f"{p.get('concurrency')} handshakes in flight, at most {p.get('limit')} s per fill; "
        "fill: every handshake done; settled: the presence notices it set off delivered "
        f"(no frame for {p.get('quiet')} s); server CPU during the fill. A fresh server for each.",
        "",
        "| server | N | one room of N: fill s | settled s | server CPU s | presence notices received "
        "| N/10 rooms of 10: fill s | server CPU s | one room / rooms of 10 | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in servers.items():
        if "error" in r:
            lines.append(
                f"| {name} | - | - | - | - | - | - | - | - | ERROR: {str(r['error'])[:100]} |"
            )
            continue
        for size, x in r["sizes"].items():
            one, tens = x["one"], x["tens"]
            note = []
            for label, phase in (("one room", one), ("rooms of 10", tens)):
                if "error" in phase:
                    note.append(f"{label}: ERROR {str(phase['error'])[:80]}")
                elif not phase.get("complete"):
                    note.append(
                        f"{label}: {phase.get('connected', 0):,} of {int(size):,} joined "
                        f"in {phase.get('fill_s')} s"
                    )
                if phase.get("server_tracebacks"):
                    note.append(f"{label}: {phase['server_tracebacks']} server tracebacks")
            fill_one = fmt(one.get("fill_s"), 2) if one.get("complete") else f">{one.get('fill_s')}"
            fill_ratio = f"{x['fill_ratio']:.2f}x" if x.get("fill_ratio") else "-"
            settled = fmt(one.get("settled_s"), 2)
            if not one.get("settled", True):
                settled = f">{settled}"  # still delivering notices when the limit came
            lines.append(
                f"| {name} | {int(size):,} | {fill_one} | {settled} "
                f"| {fmt(one.get('server_cpu_s'), 1)} | {fmt(one.get('notices'))} "
                f"| {fmt(tens.get('fill_s'), 2)} | {fmt(tens.get('server_cpu_s'), 1)} "
                f"| {fill_ratio} | {'; '.join(note)} |"
            )
    return lines


def broker_table(report: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    """One row per scenario and broker configuration; every ratio is against the memory
    broker with the same batching in this run. When other work shares the machine, the
    best round and the server's CPU per delivery are steadier than the median."""
    if "error" in entry:
        return [f"Not measured: {entry['error']}"]
    S = entry["servers"]
    scenarios = list(entry["params"])
    first = entry["params"][scenarios[0]]
    lines = [
        f"{_passes(report)}{first.get('rounds', 1)} round(s) of {first.get('duration')} s per "
        "configuration and scenario; median round shown. dup = deliveries of a seq a member "
        "had already seen (duplicates or out of order), gaps = seqs a member never got, "
        "over the whole run.",
        "",
        "| scenario | configuration | deliveries/s | vs memory | best round/s | vs memory "
        "| server CPU µs/delivery | vs memory | p99 ms | events/frame | dup / gaps | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    names = list(dict.fromkeys(key.partition("@")[0] for key in S))
    for sc in scenarios:
        for name in names:
            r = S.get(f"{name}@{sc}", {})
            if not r:  # a configuration this scenario does not run (the cluster at fanout100)
                continue
            if "error" in r:
                lines.append(f"| {sc} | {name} |" + " - |" * 9 + f" {notes(r)} |")
                continue
            ref = S.get(f"{brokers.reference_of(name)}@{sc}", {})
            d, cpu = r.get("deliveries_per_s"), r.get("server_cpu_us_per_delivery")
            best, ref_best = _best_round(r), _best_round(ref)
            order = r.get("order") or {}
            faults = f"{order.get('duplicates', '-')} / {order.get('gaps', '-')}"
            if not r.get("complete", True):
                faults += " (incomplete)"
            rounds = "/".join(
                f"{x / 1000:.0f}k" for x in r.get("rounds_deliveries_per_s") or [] if x
            )
            other = r.get("other_cpu_pct")
            remark = f"rounds {rounds}" + (f"; other load {other:.0f}% CPU" if other else "")
            lines.append(
                f"| {sc} | {name} | {fmt(d)} | {ratio(d, ref.get('deliveries_per_s'))} "
                f"| {fmt(best)} | {ratio(best, ref_best)} "
                f"| {fmt(cpu, 1)} | {ratio(cpu, ref.get('server_cpu_us_per_delivery'))} "
                f"| {fmt(r.get('p99_ms'), 1)} | {fmt(r.get('events_per_frame'), 1)} "
                f"| {faults} | {remark} |"
            )
    return lines + node_table(S)


def node_table(S: dict[str, Any]) -> list[str]:
    """What each Redis node handled in each Redis configuration's median round, in the
    scenarios the cluster runs: its pub/sub messages and their share, its script runs and
    its CPU."""
    rows = [
        (key, node, n)
        for key, r in S.items()
        if key.partition("@")[2] in brokers.CLUSTER_SCENARIOS
        for node, n in (r.get("redis_nodes") or {}).items()
    ]
    if not rows:
        return []
    lines = [
        "",
        "Per Redis node, during the median round. Redis 7.0 counts no pub/sub messages in "
        "`INFO stats`, so these are `INFO commandstats` deltas: a node's pub/sub messages are "
        "its `SPUBLISH` + `PUBLISH` calls (scripts' calls included; one call carries a room's "
        "part of a batch), script runs its `EVALSHA`/`EVAL`/`FCALL` calls; CPU is "
        "`used_cpu_sys` + `used_cpu_user` from `INFO cpu`.",
        "",
        "| scenario | configuration | node | SPUBLISH | PUBLISH | share of pub/sub | script runs "
        "| Redis CPU s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, node, n in rows:
        name, _, sc = key.partition("@")
        lines.append(
            f"| {sc} | {name} | {node} | {fmt(n.get('spublish'))} | {fmt(n.get('publish'))} "
            f"| {_pct(n.get('share'))} | {fmt(n.get('scripts'))} | {fmt(n.get('cpu_s'), 2)} |"
        )
    return lines


def _idle_losses(r: dict[str, Any]) -> str:
    """Idle connections the server closed after accepting them, by close code: before
    the memory was measured (not counted in it) and by the end."""
    connected = r.get("connected") or 0
    alive, at_end = r.get("alive", connected), r.get("alive_before_close")
    if at_end is None or at_end >= connected:
        return ""
    codes = ", ".join(f"{c}: {n:,}" for c, n in (r.get("closed_by_server") or {}).items())
    return (
        f"; {connected - alive:,} closed by the server once connected (memory is per "
        f"open one), {connected - at_end:,} by the end ({codes or 'no close frame'})"
    )


def _idle_setup(r: dict[str, Any]) -> str:
    """What an idle row's count depended on: several workers, the fd limit."""
    workers = r.get("workers") or 1
    out = f" over {workers} workers (Redis broker)" if workers > 1 else ""
    if r.get("capped_by_fd_limit"):
        per = " per process" if workers > 1 else ""
        out += f" (of {r['requested']:,}: the most an fd limit of {r['fd_limit']:,}{per} allows)"
    return out


def idle_table(servers: dict[str, Any], p: dict[str, Any]) -> list[str]:
    counts = p.get("connections")
    counts = counts if isinstance(counts, list) else [counts]
    lines = [
        f"{', '.join(f'{c:,}' for c in counts)} connections, {p.get('members')} per room, "
        f"{p.get('concurrency')} handshakes in flight, each count on a fresh server. Round "
        "trip: while they are held, 10 more members in one room, one of them sending 20 "
        "messages a second for 10 s, each message timed from its send to its arrival at "
        "every other member.",
        "",
        f"| server | connected | connect s | connects/s | vs {REFERENCE} | RSS before MB "
        "| RSS with N MB | KB per idle connection | master RSS MB | round trip p50 / p99 ms "
        "| notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, r in servers.items():
        count = key.partition("@")[2]
        ref = servers.get(f"{REFERENCE}@{count}" if count else REFERENCE, {})
        trip = r.get("roundtrip") or {}
        connected = fmt(r.get("connected")) + _idle_setup(r)
        lines.append(
            f"| {key} | {connected} | {fmt(r.get('connect_s'), 1)} "
            f"| {fmt(r.get('connects_per_s'))} "
            f"| {ratio(r.get('connects_per_s'), ref.get('connects_per_s'))} "
            f"| {fmt(r.get('rss_before_mb'), 1)} "
            f"| {fmt(r.get('rss_connected_mb'), 1)} | {fmt(r.get('kb_per_connection'), 1)} "
            f"| {fmt(r.get('master_rss_mb'), 1)} "
            f"| {fmt(trip.get('p50_ms'), 2)} / {fmt(trip.get('p99_ms'), 2)} "
            f"| {notes(r)}{_idle_losses(r)} |"
        )
    return lines


def tables(report: dict[str, Any]) -> str:
    lines: list[str] = []
    W = report["workloads"]
    for wname, entry in W.items():
        S = entry["servers"]
        p = entry["params"]
        lines.append(f"### {wname}: {entry['title']}")
        lines.append("")
        if entry["mode"] == "brokers":
            lines.extend(broker_table(report, entry))
        elif entry["mode"] == "fanout":
            lines.append(
                f"{_passes(report)}{p.get('rounds', 1)} round(s) of {p.get('duration')} s per server"
                "; median round shown."
            )
            lines.append("")
            ref = S.get(REFERENCE, {}).get("deliveries_per_s")
            base = [
                r.get("deliveries_per_s") or 0
                for n, r in S.items()
                if SERVERS[n].kind == "baseline"
            ]
            best = max(base) if base else None
            lines.append(
                f"| server | deliveries/s | vs {REFERENCE} | vs best baseline | p50 ms | p99 ms | server CPU µs/delivery | peak RSS MB | notes |"
            )
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
            for name, r in S.items():
                d = r.get("deliveries_per_s")
                lines.append(
                    f"| {name} | {fmt(d)} | {ratio(d, ref)} | {ratio(d, best)} | {fmt(r.get('p50_ms'), 1)} "
                    f"| {fmt(r.get('p99_ms'), 1)} | {fmt(r.get('server_cpu_us_per_delivery'), 1)} "
                    f"| {fmt(r.get('peak_rss_mb'), 1)} | {notes(r)} |"
                )
        elif entry["mode"] == "stalled":
            lines.append(
                f"{_passes(report)}{p.get('rounds', 1)} round(s) of {p.get('duration')} s without "
                f"the stalled clients, then {p.get('rounds', 1)} with them, in one server process; "
                "median rounds shown. "
                f"roomcast: ROOMCAST_OUTBOX_SIZE={report['args'].get('outbox_size')}."
            )
            lines.append("")
            lines.append(
                "| server | healthy deliveries/s with stalled | without | ratio | p99 ms with / without | peak RSS MB without → with | RSS growth MB | stalled clients at the end | notes |"
            )
            lines.append("|---|---:|---:|---:|---:|---:|---:|---|---|")
            for name, r in S.items():
                if "error" in r:
                    lines.append(f"| {name} | - | - | - | - | - | - | - | {notes(r)} |")
                    continue
                c, s = r["control"], r["stalled"]
                end = ", ".join(f"{k}: {v}" for k, v in (r.get("stalled_end_state") or {}).items())
                lines.append(
                    f"| {name} | {fmt(s.get('deliveries_per_s'))} | {fmt(c.get('deliveries_per_s'))} "
                    f"| {ratio(s.get('deliveries_per_s'), c.get('deliveries_per_s'))} "
                    f"| {fmt(s.get('p99_ms'), 1)} / {fmt(c.get('p99_ms'), 1)} "
                    f"| {fmt(r.get('peak_rss_before_stalled_mb'), 1)} → {fmt(r.get('peak_rss_with_stalled_mb'), 1)} "
                    f"| {r.get('rss_growth_mb'):+.1f} | {end} | {notes(s)} |"
                )
        elif entry["mode"] == "crowd":
            lines.extend(crowd_table(S, p))
        elif entry["mode"] == "multiroom":
            lines.extend(multiroom_table(report, entry))
        else:
            lines.extend(idle_table(S, p))
        lines.append("")
    if report.get("targets"):
        lines.append("### Issue targets")
        lines.append("")
        lines.append("| target | met | detail |")
        lines.append("|---|---|---|")
        for t in report["targets"]:
            lines.append(f"| {t['target']} | {verdict(t['met'])} | {t['detail']} |")
        lines.append("")
    return "\n".join(lines)


# -- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="roomcast benchmark suite: starts every server itself on a free loopback "
        "port and measures them side by side. Results: bench/results/<timestamp>.json (+ .md).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="shorter rounds, one each, 2,000 idle connections (~3 minutes)",
    )
    p.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help=f"comma-separated, from: {', '.join(SERVERS)} (default: all but the experiments)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, from: {', '.join(WORKLOADS)}",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="override rounds per server (median reported)"
    )
    p.add_argument("--duration", type=float, default=None, help="override seconds per round")
    p.add_argument(
        "--passes",
        type=int,
        default=None,
        help="go through the servers this many times per workload, each time in a fresh "
        "process, and pool the rounds (default: 2, --quick 1): drift in the machine's speed "
        "then hits every server, not the one that happened to run during it",
    )
    p.add_argument(
        "--connections",
        "--idle-connections",
        default=None,
        help="idle connections, comma-separated for several counts (each on a fresh server), "
        "e.g. 10000,100000; at most what one server worker can hold under the fd limit",
    )
    p.add_argument(
        "--idle-workers",
        type=int,
        default=1,
        help="idle workload: roomcast with this many workers and a Redis broker of its own "
        "(needs redis-server), to hold more connections than one process's fd limit allows",
    )
    p.add_argument(
        "--idle-concurrency",
        type=int,
        default=None,
        help="idle workload: handshakes in flight, over all load generator processes "
        "(default 50; fewer spare a busy machine's Redis broker its 2 s timeouts)",
    )
    p.add_argument(
        "--outbox-size", type=int, default=1024, help="ROOMCAST_OUTBOX_SIZE for roomcast"
    )
    p.add_argument(
        "--quiet-cpu",
        type=float,
        default=25.0,
        help="before each server, wait until other processes use less than this %% of a core",
    )
    p.add_argument("--max-wait", type=float, default=15.0, help="... but at most this many seconds")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here instead")
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: print the tables (and targets) of a report written earlier",
    )
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="record a py-spy flame graph of each roomcast worker (needs py-spy; "
        "SVGs land in bench/results/logs/<timestamp>/)",
    )
    args = p.parse_args(argv)
    if args.passes is None:
        args.passes = 1 if args.quick else 2
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.connections is not None:
        try:
            args.connections = [int(c.replace("_", "")) for c in args.connections.split(",")]
        except ValueError:
            p.error(f"--connections {args.connections!r}: comma-separated counts")
    for s in args.servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}")
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        report["targets"] = targets(report)
        print(tables(report))
        return 0
    nofile = raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log(
        f"bench: {len(args.servers)} servers x {len(args.workloads)} workloads, "
        f"{'quick' if args.quick else 'full'}, RLIMIT_NOFILE {nofile[0]}"
    )
    report = run_suite(args)
    report["args"]["json"] = str(args.json) if args.json else None
    stamp = report["started"].replace(":", "").replace("-", "")
    path = args.json or RESULTS / f"{stamp}.json"
    md = tables(report)
    path.write_text(json.dumps(report, indent=2, default=str))
    m = report["machine"]
    path.with_suffix(".md").write_text(
        f"roomcast bench, {report['started']}, {'quick' if args.quick else 'full'}, "
        f"{m['cpus']} cores ({m['cpu_model']}), Python {m['python']}, git {report['git']['head']}"
        f"{' + uncommitted src' if report['git']['dirty_src'] else ''}, {report['seconds']} s\n\n{md}\n"
    )
    print(md)
    log(f"bench: {report['seconds']} s; wrote {path} and {path.with_suffix('.md')}")
    return 0
