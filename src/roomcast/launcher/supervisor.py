"""The master process of ``python -m roomcast``: N workers, supervised.

Hypercorn's own master (``hypercorn.run.run``) stops every worker as soon as one exits,
then exits 0 without a word; killed itself, it leaves its workers serving. This one:

- starts the workers (``spawn``) on sockets it bound itself and waits until each reports
  how its lifespan startup went (:mod:`.worker`). If one cannot start (Redis unreachable,
  a setting the app rejects), the command stops the others and fails with one line
  naming the cause (:class:`StartupFailed`);
- replaces a worker that dies later, for whatever reason, while the others serve on:
  one log line names the worker and how it ended, and the replacement starts after a
  backoff (:data:`FIRST_BACKOFF` s, doubling up to :data:`MAX_BACKOFF` s, back to the
  start once a worker has lived :data:`STABLE_AFTER` s), so a worker that cannot stay up
  costs a retry now and then, not a busy loop;
- on SIGTERM, SIGINT or SIGHUP, asks every worker to stop (each gives its clients close
  1001 within ``graceful_timeout``) and returns 0 once all have ended by themselves;
- is every worker's lifeline (see :mod:`.worker`): however the master ends, SIGKILL
  included, its workers see it and shut down.

It also owns the directory of prometheus-client's multiprocess mode, so that one
``/metrics`` scrape, answered by any worker, counts them all.

It imports nothing a worker needs to serve (the app, Hypercorn, an event loop, a broker's
client): a spawned worker imports those itself (:mod:`.spawned`), and the master stays
under 20 MB where it weighed 47 MB (issue 24).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Final

from .spawned import BAD_APP, FAILED, READY, start_worker

__all__ = ["StartupFailed", "Supervisor"]

log = logging.getLogger("roomcast.launcher")

FIRST_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 30.0
STABLE_AFTER: Final = 60.0
#: how long past ``graceful_timeout`` a stopping worker may take (lifespan shutdown)
STOP_MARGIN: Final = 5.0
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
METRICS_DIR_VARIABLE: Final = "PROMETHEUS_MULTIPROC_DIR"


#: prometheus-client's files of a process's live gauges (``multiprocess.mark_process_dead``
#: removes these, but importing prometheus-client would cost the master 14 MB)
LIVE_GAUGE_FILES: Final = "gauge_live*_{pid}.db"


class StartupFailed(Exception):
    """A worker could not start; the message says why."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        #: whether the cause is the command line's (``--app`` names nothing importable)
        self.usage = usage


@dataclass(frozen=True)
class Listeners:
    """The listening sockets the master bound: TLS ones and plain ones (Hypercorn's
    ``Sockets``, which each worker builds from these)."""

    secure: list[socket.socket]
    insecure: list[socket.socket]

    def close(self) -> None:
        for sock in [*self.secure, *self.insecure]:
            sock.close()


@dataclass(eq=False)
class Worker:
    slot: int
    process: BaseProcess
    lifeline: Connection
    started_at: float
    ready: bool = False
    failure: str | None = None
    #: whether its failure is the command line's (see :class:`StartupFailed`)
    bad_app: bool = False
    #: until the worker's one report (or its EOF) has been read from the lifeline
    awaiting_report: bool = True

    def __str__(self) -> str:
        return f"worker {self.slot} (pid {self.process.pid})"

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def stop(self) -> None:
        """Ask the worker to shut down gracefully (close our end of its lifeline)."""
        self.lifeline.close()

    def read_report(self) -> None:
        self.awaiting_report = False
        try:
            report = self.lifeline.recv_bytes()
        except (EOFError, OSError):
            return  # it died before reporting: its sentinel tells the rest
        if report == READY:
            self.ready = True
        elif report.startswith(BAD_APP):
            self.bad_app = True
            self.failure = report.removeprefix(BAD_APP).decode(errors="replace")
        elif report.startswith(FAILED):
            self.failure = report.removeprefix(FAILED).decode(errors="replace")


class Supervisor:
    """Runs ``workers`` worker processes on ``sockets`` until told to stop.

    :param args: the command line, from which each worker builds Hypercorn's config
    :param graceful_timeout: seconds a stopping worker has to close its connections
    :param on_serving: called once every worker is serving
    """

    def __init__(
        self,
        args: argparse.Namespace,
        sockets: Listeners,
        *,
        workers: int,
        graceful_timeout: float,
        on_serving: Callable[[], None] | None = None,
    ) -> None:
        self.args = args
        self.sockets = sockets
        self.size = workers
        self.graceful_timeout = graceful_timeout
        self.on_serving = on_serving
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, Worker] = {}
        self._due: dict[int, float] = {}  # slot -> when its replacement starts
        self._failures: dict[int, int] = dict.fromkeys(range(1, workers + 1), 0)
        self._signals: list[int] = []
        self._wakeup_reader, self._wakeup_writer = socket.socketpair()

    def run(self) -> int:
        """Serve until a stop signal; 0 once every worker ended by itself.

        :raises StartupFailed: if a worker's startup failed (the others were stopped)
        """
        with self._metrics_directory(), self._signal_handling():
            for slot in range(1, self.size + 1):
                self._start(slot)
            try:
                self._wait_until_ready()
            except StartupFailed:
                self._stop_all()
                raise
            log.info("%d worker(s) serving (pid %s)", self.size, self._pids())
            if self.on_serving is not None:
                self.on_serving()
            while not self._signals:
                self._step()
            log.info("stopping on %s", signal.Signals(self._signals[0]).name)
            return self._stop_all()

    # -- the main loop ------------------------------------------------------------------

    def _wait_until_ready(self) -> None:
        while not all(worker.ready for worker in self._workers.values()):
            if self._signals:
                raise StartupFailed(f"stopped by {signal.Signals(self._signals[0]).name}")
            reported, died = self._poll(timeout=None)
            for worker in [*reported, *died]:
                if worker.failure is not None or worker in died:
                    worker.process.join()
                    raise StartupFailed(
                        worker.failure or f"{worker} {_ending(worker.process)}",
                        usage=worker.bad_app,
                    )

    def _step(self) -> None:
        now = time.monotonic()
        timeout = max(0.0, min(self._due.values()) - now) if self._due else None
        reported, died = self._poll(timeout)
        for worker in reported:
            if worker.ready:
                log.info("%s ready", worker)
        for worker in died:
            self._replace(worker)
        now = time.monotonic()
        for slot, due in list(self._due.items()):
            if due <= now:
                del self._due[slot]
                self._start(slot)

    def _poll(self, timeout: float | None) -> tuple[list[Worker], list[Worker]]:
        """Wait for a signal, a worker's report or a worker's end; return the workers
        that reported (report read) and the workers that ended."""
        sentinels = {worker.process.sentinel: worker for worker in self._workers.values()}
        lifelines = {w.lifeline: w for w in self._workers.values() if w.awaiting_report}
        reported, died = [], []
        for event in self._wait([*sentinels, *lifelines], timeout):
            if event in lifelines:
                lifelines[event].read_report()
                reported.append(lifelines[event])
            else:
                died.append(sentinels[event])  # type: ignore[index]
        return reported, died

    def _wait(self, objects: list[object], timeout: float | None) -> list[object]:
        """``multiprocessing.connection.wait`` that also returns early on a signal."""
        ready = wait([self._wakeup_reader, *objects], timeout)  # type: ignore[list-item]
        if self._wakeup_reader in ready:
            with contextlib.suppress(BlockingIOError):
                self._wakeup_reader.recv(64)
        return [event for event in ready if event is not self._wakeup_reader]

    def _start(self, slot: int) -> None:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=start_worker,
            kwargs={
                "args": self.args,
                "secure": self.sockets.secure,
                "insecure": self.sockets.insecure,
                "lifeline": theirs,
            },
            name=f"roomcast-worker-{slot}",
        )
        process.start()
        theirs.close()  # only the worker holds its end: our close or death is its EOF
        self._workers[slot] = Worker(slot, process, ours, time.monotonic())

    def _replace(self, worker: Worker) -> None:
        worker.process.join()
        worker.lifeline.close()
        del self._workers[worker.slot]
        self._mark_dead(worker.pid)
        if time.monotonic() - worker.started_at >= STABLE_AFTER:
            self._failures[worker.slot] = 0
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** self._failures[worker.slot])
        self._failures[worker.slot] += 1
        how = f"failed to start: {worker.failure}" if worker.failure else _ending(worker.process)
        log.error("%s %s; starting a replacement in %.1f s", worker, how, delay)
        self._due[worker.slot] = time.monotonic() + delay

    # -- stopping -----------------------------------------------------------------------

    def _stop_all(self) -> int:
        """Stop every worker; 0 if all ended by themselves with status 0. Workers still
        running after ``graceful_timeout`` (and a margin), or when another stop signal
        arrives, are killed."""
        self._due.clear()
        for worker in self._workers.values():
            worker.stop()
        deadline = time.monotonic() + self.graceful_timeout + STOP_MARGIN
        signals = len(self._signals)
        while alive := [w for w in self._workers.values() if w.process.is_alive()]:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(self._signals) > signals:
                for worker in alive:
                    log.error("%s has not stopped; killing it", worker)
                    worker.process.kill()
                break
            self._wait([worker.process.sentinel for worker in alive], remaining)
        status = 0
        for worker in self._workers.values():
            worker.process.join()
            status = status or int(worker.process.exitcode != 0)
        self._workers.clear()
        return status

    # -- process-wide state -------------------------------------------------------------

    @contextlib.contextmanager
    def _signal_handling(self) -> Iterator[None]:
        def handle(signum: int, frame: FrameType | None) -> None:
            self._signals.append(signum)

        self._wakeup_writer.setblocking(False)
        self._wakeup_reader.setblocking(False)
        previous_fd = signal.set_wakeup_fd(self._wakeup_writer.fileno())
        previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_fd)
            self._wakeup_reader.close()
            self._wakeup_writer.close()

    @contextlib.contextmanager
    def _metrics_directory(self) -> Iterator[None]:
        """Give the workers a fresh prometheus-client multiprocess directory (unless the
        operator chose one), removed when the master ends."""
        if os.environ.get(METRICS_DIR_VARIABLE):
            yield
            return
        path = tempfile.mkdtemp(prefix="roomcast-metrics-")
        os.environ[METRICS_DIR_VARIABLE] = path
        try:
            yield
        finally:
            del os.environ[METRICS_DIR_VARIABLE]
            shutil.rmtree(path, ignore_errors=True)

    def _mark_dead(self, pid: int) -> None:
        """Forget a dead worker's live gauges (its connections, rooms): a replacement
        has a new pid, and the merged ``/metrics`` would count the dead one's for ever."""
        pattern = os.path.join(os.environ[METRICS_DIR_VARIABLE], LIVE_GAUGE_FILES.format(pid=pid))
        for path in glob.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def _pids(self) -> str:
        return ", ".join(str(worker.pid) for worker in self._workers.values())


def _ending(process: BaseProcess) -> str:
    code = process.exitcode
    if code is None:
        return "is running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"
