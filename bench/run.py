"""Benchmark runner: start each server, drive it with bench/loadgen.py, tabulate.

    .venv/bin/python -m bench                     # full run (~15 min on 2 cores)
    .venv/bin/python -m bench --quick             # ~3 min
    .venv/bin/python -m bench --servers roomcast-trio-batch,chapter-trio --workloads fanout100

See bench/README.md for what each workload means and how to read the tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
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
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

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
    mode: str  # "fanout", "stalled" (a control run and a stalled run) or "idle"
    title: str
    full: dict[str, Any]
    quick: dict[str, Any]

    def params(self, quick: bool) -> dict[str, Any]:
        return dict(self.quick if quick else self.full)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "fanout100", "fanout",
            "one room of 100 members, 4 of them sending (window 4 each), 64-byte pad",
            full=dict(rooms=1, members=100, senders=4, messages=1500, window=4, pad=64, deadline=60),
            quick=dict(rooms=1, members=100, senders=4, messages=400, window=4, pad=64, deadline=30),
        ),
        Workload(
            "fanout1000", "fanout",
            "one room of 1,000 members, 4 of them sending (window 4 each), 64-byte pad",
            full=dict(rooms=1, members=1000, senders=4, messages=150, window=4, pad=64, deadline=60),
            quick=dict(rooms=1, members=1000, senders=4, messages=50, window=4, pad=64, deadline=30),
        ),
        Workload(
            "rooms", "fanout",
            "200 rooms x 5 members, every member sending (window 2 each), 64-byte pad",
            full=dict(rooms=200, members=5, senders=5, messages=60, window=2, pad=64, deadline=60),
            quick=dict(rooms=200, members=5, senders=5, messages=20, window=2, pad=64, deadline=30),
        ),
        Workload(
            "stalled", "stalled",
            "one room of 100 healthy members (4 sending) + 10 that never read (SO_RCVBUF 4 KiB), "
            "1 KiB pad; compared with the same server's run without the 10",
            full=dict(rooms=1, members=100, senders=4, messages=1500, window=4, pad=1024,
                      stalled=10, deadline=20),
            quick=dict(rooms=1, members=100, senders=4, messages=600, window=4, pad=1024,
                       stalled=10, deadline=8),
        ),
        Workload(
            "idle", "idle",
            "10,000 idle connections in rooms of 10: connect rate and memory per connection",
            full=dict(connections=10_000, members=10, concurrency=50),
            quick=dict(connections=10_000, members=10, concurrency=50),
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
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


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


class RssSampler(threading.Thread):
    """Samples the summed RSS of a process tree every ``interval`` seconds; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.last = 0
        self.hwm: dict[int, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> int:
        rss = tree_rss(self.pid)
        if rss:
            self.last = rss
            self.peak = max(self.peak, rss)
        return rss

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
        env.update(server.env)
        env["PYTHONUNBUFFERED"] = "1"
        if server.roomcast_env:
            env.update(
                ROOMCAST_RATE_LIMIT="0",
                ROOMCAST_ROOM_CAPACITY="0",
                ROOMCAST_OUTBOX_SIZE=str(args.outbox_size),
            )
        self.log_path = log_path
        self.log = open(log_path, "wb")
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
                raise RuntimeError(f"{self.server.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(b"GET /bench-ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
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
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # any worker left behind
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()

    def log_errors(self) -> int:
        try:
            return self.log_path.read_text(errors="replace").count("Traceback (most recent call last)")
        except OSError:
            return 0


def loadgen_args(mode: str, url: str, params: dict[str, Any], subprotocol: str | None) -> list[str]:
    argv = [PY, str(LOADGEN), mode, "--url", url]
    for key, value in params.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    if subprotocol:
        argv += ["--subprotocol", subprotocol]
    return argv


# -- one measurement -------------------------------------------------------------------------


class Runner:
    def __init__(self, args: argparse.Namespace, stamp: str) -> None:
        self.args = args
        self.stamp = stamp
        self.logs = RESULTS / "logs" / stamp
        self.logs.mkdir(parents=True, exist_ok=True)
        self.py_spy = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")

    def start(self, server: Server, tag: str) -> ServerProcess:
        sp = ServerProcess(server, self.args, self.logs / f"{server.name}-{tag}.log")
        try:
            sp.wait_ready()
        except Exception:
            sp.stop()
            raise
        time.sleep(0.3)
        return sp

    def _profile(self, sp: ServerProcess, tag: str) -> subprocess.Popen | None:
        if not (self.args.py_spy and sp.server.kind == "roomcast" and self.py_spy):
            return None
        out = self.logs / f"{sp.server.name}-{tag}.py-spy.svg"
        pid = sp.worker_pids()[0]
        return subprocess.Popen(
            [self.py_spy, "record", "--pid", str(pid), "--rate", "200", "--nonblocking",
             "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def fanout(self, server: Server, params: dict[str, Any], tag: str) -> dict[str, Any]:
        sp = self.start(server, tag)
        sampler = RssSampler(sp.proc.pid)
        rss_start = sampler.sample()
        sampler.start()
        prof = self._profile(sp, tag)
        budget = params.get("deadline", 60) + 120
        try:
            cp = subprocess.run(
                loadgen_args("fanout", sp.url, params, server.subprotocol),
                cwd=REPO, capture_output=True, text=True, timeout=budget,
            )
            result = _last_json(cp.stdout)
            if result is None:
                result = {"error": f"loadgen exit {cp.returncode}: {cp.stderr[-2000:]}"}
        except subprocess.TimeoutExpired:
            result = {"error": f"loadgen timed out after {budget}s"}
        finally:
            if prof is not None:
                prof.send_signal(signal.SIGINT)
                try:
                    prof.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    prof.kill()
            sampler.stop()
            sp.stop()
        result.update(
            rss_start_mb=_mb(rss_start),
            peak_rss_mb=_mb(sampler.peak),
            vm_hwm_mb={str(k): _mb(v) for k, v in sampler.hwm.items()},
            server_tracebacks=sp.log_errors(),
            log=str(sp.log_path.relative_to(REPO)),
        )
        return result

    def idle(self, server: Server, params: dict[str, Any], tag: str) -> dict[str, Any]:
        sp = self.start(server, tag)
        sampler = RssSampler(sp.proc.pid)
        time.sleep(0.5)
        before = statistics.median(sampler.sample() or 0 for _ in range(3))
        sampler.start()
        lg = subprocess.Popen(
            loadgen_args("idle", sp.url, params, server.subprotocol),
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        result: dict[str, Any] = {}
        try:
            line = _readline(lg, timeout=180)
            result = json.loads(line) if line else {"error": "idle loadgen printed nothing"}
            time.sleep(1.0)
            samples = []
            for _ in range(5):
                samples.append(tree_rss(sp.proc.pid))
                time.sleep(0.2)
            connected_rss = statistics.median(samples)
            assert lg.stdin is not None
            lg.stdin.write("close\n")
            lg.stdin.flush()
            closed = _readline(lg, timeout=60)
            if closed:
                result.update(json.loads(closed))
            n = result.get("connected") or 0
            result.update(
                rss_before_mb=_mb(before),
                rss_connected_mb=_mb(connected_rss),
                kb_per_connection=round((connected_rss - before) / n / 1024, 1) if n else None,
            )
        except Exception as exc:  # keep the rest of the run going
            result["error"] = repr(exc)
        finally:
            try:
                lg.wait(timeout=30)
            except subprocess.TimeoutExpired:
                lg.kill()
                lg.wait()
            sampler.stop()
            sp.stop()
        if lg.returncode and "error" not in result:
            result["error"] = f"loadgen exit {lg.returncode}: {(lg.stderr.read() if lg.stderr else '')[-2000:]}"
        result.update(
            peak_rss_mb=_mb(sampler.peak),
            server_tracebacks=sp.log_errors(),
            log=str(sp.log_path.relative_to(REPO)),
        )
        return result


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout)
    return box[0].strip() if box else ""


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


def pick(results: list[dict[str, Any]], key: str = "deliveries_per_s") -> dict[str, Any]:
    """The median run by ``key`` (the upper median for an even count)."""
    ok = [r for r in results if key in r]
    if not ok:
        return results[0] if results else {"error": "no run"}
    ok.sort(key=lambda r: r[key])
    chosen = dict(ok[len(ok) // 2])
    if len(ok) > 1:
        chosen["runs"] = [r[key] for r in results if key in r]
    return chosen


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    runner = Runner(args, stamp)
    servers = [SERVERS[name] for name in args.servers]
    report: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items()},
        "reference": REFERENCE,
        "workloads": {},
    }
    t_suite = time.monotonic()
    for wname in args.workloads:
        w = WORKLOADS[wname]
        params = w.params(args.quick)
        entry: dict[str, Any] = {"title": w.title, "mode": w.mode, "params": params, "servers": {}}
        report["workloads"][wname] = entry
        repeats = 1 if w.mode == "idle" else args.repeat
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {} for s in servers}
        for rep in range(repeats):
            for server in servers:
                if w.mode == "idle" and not server.idle:
                    continue
                t0 = time.monotonic()
                tag = f"{wname}-{rep}"
                try:
                    if w.mode == "fanout":
                        raw[server.name].setdefault("run", []).append(runner.fanout(server, params, tag))
                    elif w.mode == "stalled":
                        control = dict(params, stalled=0)
                        raw[server.name].setdefault("control", []).append(
                            runner.fanout(server, control, tag + "-control"))
                        raw[server.name].setdefault("stalled", []).append(
                            runner.fanout(server, params, tag + "-stalled"))
                    else:
                        raw[server.name].setdefault("run", []).append(runner.idle(server, params, tag))
                except Exception as exc:
                    raw[server.name].setdefault("run", []).append({"error": repr(exc)})
                log(f"{wname:<10} {server.name:<24} rep {rep + 1}/{repeats}  "
                    f"{time.monotonic() - t0:5.1f}s  {brief(w.mode, raw[server.name])}")
        for name, runs in raw.items():
            if not runs:
                continue
            if w.mode == "stalled":
                entry["servers"][name] = {
                    "control": pick(runs.get("control", [{"error": "no run"}])),
                    "stalled": pick(runs.get("stalled", [{"error": "no run"}])),
                    "all": runs,
                }
            elif w.mode == "idle":
                entry["servers"][name] = pick(runs["run"], "connects_per_s")
            else:
                entry["servers"][name] = pick(runs["run"])
                if len(runs["run"]) > 1:
                    entry["servers"][name]["all"] = runs["run"]
    report["seconds"] = round(time.monotonic() - t_suite, 1)
    report["targets"] = targets(report)
    return report


def brief(mode: str, runs: dict[str, list[dict[str, Any]]]) -> str:
    def one(r: dict[str, Any]) -> str:
        if "error" in r:
            return "ERROR " + str(r["error"])[:200]
        if mode == "idle":
            return f"{r.get('connects_per_s')} conn/s, {r.get('kb_per_connection')} KB/conn"
        flag = "" if r.get("complete") else " INCOMPLETE"
        return (f"{r.get('deliveries_per_s')}/s p50 {r.get('p50_ms')} p99 {r.get('p99_ms')} ms "
                f"rss {r.get('peak_rss_mb')} MB{flag}")
    return " | ".join(f"{k}: {one(v[-1])}" for k, v in runs.items())


def machine() -> dict[str, Any]:
    versions = {}
    for pkg in ["roomcast", "hypercorn", "trio", "anyio", "uvicorn", "starlette", "broadcaster",
                "websockets", "picows", "uvloop", "orjson", "wsproto", "h11"]:
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
        "versions": versions,
    }


def _cpu_model() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
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
        baselines = {n: r for n, r in W[w]["servers"].items()
                     if SERVERS[n].kind == "baseline" and "error" not in r}
        if batch and baselines:
            best = max(baselines, key=lambda n: baselines[n].get("deliveries_per_s", 0))
            b = baselines[best]["deliveries_per_s"]
            out.append(dict(
                target=f"{w}: roomcast-trio-batch deliveries/s > every baseline",
                met=batch["deliveries_per_s"] > b,
                detail=f"{batch['deliveries_per_s']}/s vs best baseline {best} {b}/s "
                       f"({batch['deliveries_per_s'] / b:.2f}x)" if b else "",
            ))
        if batch and ref:
            out.append(dict(
                target=f"{w}: roomcast-trio-batch p99 < {REFERENCE} p99",
                met=(batch.get("p99_ms") or 1e9) < (ref.get("p99_ms") or 0),
                detail=f"{batch.get('p99_ms')} ms vs {ref.get('p99_ms')} ms",
            ))
        if plain and ref and ref.get("deliveries_per_s"):
            ratio = plain["deliveries_per_s"] / ref["deliveries_per_s"]
            out.append(dict(
                target=f"{w}: roomcast-trio (no batching) >= 0.9x {REFERENCE}",
                met=ratio >= 0.9,
                detail=f"{plain['deliveries_per_s']}/s vs {ref['deliveries_per_s']}/s ({ratio:.2f}x)",
            ))
    if "stalled" in W:
        S = W["stalled"]["servers"]
        for name in ("roomcast-trio-batch", "roomcast-trio"):
            r = S.get(name)
            if not r:
                continue
            c, s = r["control"], r["stalled"]
            if "error" in c or "error" in s or not c.get("deliveries_per_s"):
                continue
            ratio = s["deliveries_per_s"] / c["deliveries_per_s"]
            out.append(dict(
                target=f"stalled: {name} healthy throughput >= 0.9x its run without stalled readers",
                met=ratio >= 0.9 and bool(s.get("complete")),
                detail=f"{s['deliveries_per_s']}/s vs {c['deliveries_per_s']}/s ({ratio:.2f}x)",
            ))
        growth = {}
        for name, r in S.items():
            c, s = r["control"], r["stalled"]
            if "peak_rss_mb" in c and "peak_rss_mb" in s:
                growth[name] = round(s["peak_rss_mb"] - c["peak_rss_mb"], 1)
        rc = {n: g for n, g in growth.items() if SERVERS[n].kind == "roomcast"}
        unb = {n: g for n, g in growth.items() if SERVERS[n].bounded is False}
        if rc and unb:
            out.append(dict(
                target="stalled: roomcast peak RSS stays bounded while unbounded baselines grow",
                met=max(rc.values()) < min(unb.values()),
                detail="RSS growth MB (stalled - control): "
                       + ", ".join(f"{n} {g:+}" for n, g in growth.items()),
            ))
    return out


# -- tables ----------------------------------------------------------------------------------


def fmt(v: Any, nd: int = 0) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and nd:
        return f"{v:,.{nd}f}"
    if isinstance(v, (int, float)):
        return f"{v:,.0f}" if abs(v) >= 100 or nd == 0 else f"{v:.{max(nd, 1)}f}"
    return str(v)


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def notes(r: dict[str, Any]) -> str:
    n = []
    if "error" in r:
        return "ERROR: " + str(r["error"])[:120]
    if r.get("complete") is False:
        n.append(f"incomplete ({r.get('delivered')}/{r.get('expected')})")
    if r.get("unexpected_closes"):
        n.append(f"{r['unexpected_closes']} healthy clients closed")
    if r.get("connect_failures"):
        n.append(f"{r['connect_failures']} connect failures")
    if r.get("server_tracebacks"):
        n.append(f"{r['server_tracebacks']} server tracebacks")
    if r.get("events_per_frame") and r["events_per_frame"] > 1.05:
        n.append(f"{r['events_per_frame']} events/frame")
    if r.get("runs"):
        n.append("runs " + "/".join(f"{x / 1000:.0f}k" if x >= 1000 else str(x) for x in r["runs"]))
    return "; ".join(n)


def tables(report: dict[str, Any]) -> str:
    lines: list[str] = []
    W = report["workloads"]
    for wname, entry in W.items():
        S = entry["servers"]
        lines.append(f"### {wname}: {entry['title']}")
        lines.append("")
        if entry["mode"] == "fanout":
            ref = S.get(REFERENCE, {}).get("deliveries_per_s")
            base = [r.get("deliveries_per_s") or 0 for n, r in S.items() if SERVERS[n].kind == "baseline"]
            best = max(base) if base else None
            lines.append(f"| server | deliveries/s | vs {REFERENCE} | vs best baseline | p50 ms | p99 ms | peak RSS MB | notes |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
            for name, r in S.items():
                d = r.get("deliveries_per_s")
                lines.append(
                    f"| {name} | {fmt(d)} | {ratio(d, ref)} | {ratio(d, best)} | {fmt(r.get('p50_ms'), 1)} "
                    f"| {fmt(r.get('p99_ms'), 1)} | {fmt(r.get('peak_rss_mb'), 1)} | {notes(r)} |")
        elif entry["mode"] == "stalled":
            lines.append("| server | healthy deliveries/s (stalled) | without stalled | ratio | p99 ms stalled / without | peak RSS MB stalled / without | RSS growth MB | notes |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
            for name, r in S.items():
                c, s = r["control"], r["stalled"]
                growth = (s.get("peak_rss_mb") or 0) - (c.get("peak_rss_mb") or 0) if "peak_rss_mb" in s and "peak_rss_mb" in c else None
                lines.append(
                    f"| {name} | {fmt(s.get('deliveries_per_s'))} | {fmt(c.get('deliveries_per_s'))} "
                    f"| {ratio(s.get('deliveries_per_s'), c.get('deliveries_per_s'))} "
                    f"| {fmt(s.get('p99_ms'), 1)} / {fmt(c.get('p99_ms'), 1)} "
                    f"| {fmt(s.get('peak_rss_mb'), 1)} / {fmt(c.get('peak_rss_mb'), 1)} "
                    f"| {'-' if growth is None else f'{growth:+.1f}'} | {notes(s)} |")
        else:
            ref = S.get(REFERENCE, {}).get("connects_per_s")
            lines.append(f"| server | connected | connects/s | vs {REFERENCE} | RSS before MB | RSS with N MB | KB per idle connection | notes |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
            for name, r in S.items():
                lines.append(
                    f"| {name} | {fmt(r.get('connected'))} | {fmt(r.get('connects_per_s'))} "
                    f"| {ratio(r.get('connects_per_s'), ref)} | {fmt(r.get('rss_before_mb'), 1)} "
                    f"| {fmt(r.get('rss_connected_mb'), 1)} | {fmt(r.get('kb_per_connection'), 1)} | {notes(r)} |")
        lines.append("")
    if report.get("targets"):
        lines.append("### Issue targets")
        lines.append("")
        lines.append("| target | met | detail |")
        lines.append("|---|---|---|")
        for t in report["targets"]:
            lines.append(f"| {t['target']} | {'yes' if t['met'] else 'NO'} | {t['detail']} |")
        lines.append("")
    return "\n".join(lines)


# -- entry point -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="roomcast benchmark suite: starts every server itself on a free loopback "
        "port and measures them side by side. Results: bench/results/<timestamp>.json (+ .md).",
    )
    p.add_argument("--quick", action="store_true", help="fewer messages (~3 minutes)")
    p.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                   help=f"comma-separated, from: {', '.join(SERVERS)} (default: all but the uvloop variant)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, from: {', '.join(WORKLOADS)}")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs per server and workload, median reported (default 2, 1 with --quick)")
    p.add_argument("--outbox-size", type=int, default=1024, help="ROOMCAST_OUTBOX_SIZE for roomcast")
    p.add_argument("--json", type=Path, default=None, help="write the JSON here instead")
    p.add_argument("--py-spy", action="store_true",
                   help="record a py-spy flame graph of each roomcast worker (needs py-spy; "
                        "SVGs land in bench/results/logs/<timestamp>/)")
    args = p.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for s in args.servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}")
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log(f"bench: {len(args.servers)} servers x {len(args.workloads)} workloads, "
        f"{'quick' if args.quick else 'full'}, repeat {args.repeat}, RLIMIT_NOFILE {nofile[0]}")
    report = run_suite(args)
    report["args"]["json"] = str(args.json) if args.json else None
    stamp = report["started"].replace(":", "").replace("-", "")
    path = args.json or RESULTS / f"{stamp}.json"
    md = tables(report)
    path.write_text(json.dumps(report, indent=2, default=str))
    path.with_suffix(".md").write_text(
        f"roomcast bench, {report['started']}, {'quick' if args.quick else 'full'}, "
        f"{report['machine']['cpus']} cores ({report['machine']['cpu_model']}), "
        f"Python {report['machine']['python']}, {report['seconds']} s\n\n{md}\n")
    print(md)
    log(f"bench: {report['seconds']} s; wrote {path} and {path.with_suffix('.md')}")
    return 0
