"""Real servers for end-to-end tests.

:func:`serve_in_thread` runs Hypercorn on its own event loop in a background thread: on Trio
with roomcast's serving loop (``roomcast.launcher.trio_server``, what ``python -m roomcast``
runs), on asyncio with Hypercorn's. It is bound to a socket the test binds itself on port 0
and hands over with ``fd://``. Tests talk to it over loopback with real
clients and can run a function inside the server's loop to inspect its state.

:func:`spawn_server` starts a serving command the README offers (``python -m roomcast``,
``roomcast``, ``bash scripts/run`` or plain ``hypercorn``) as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import psutil
import trio
from hypercorn.config import Config

from roomcast.asgi import ASGIApp, Receive, Scope, Send
from roomcast.runtime import STATE_KEY, Runtime

T = TypeVar("T")


class LifespanSpy:
    """Wraps an ASGI app and keeps the lifespan ``state`` so tests can reach the runtime."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: MutableMapping[str, Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.state = scope["state"]
        await self.app(scope, receive, send)

    @property
    def runtime(self) -> Runtime:
        assert self.state is not None, "lifespan has not started"
        runtime: Runtime = self.state[STATE_KEY]
        return runtime


def bind_loopback() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class ThreadedServer:
    spy: LifespanSpy
    port: int
    worker_class: str
    _call: Callable[[Callable[[], Any]], Any] = field(repr=False)

    @property
    def runtime(self) -> Runtime:
        return self.spy.runtime

    def url(self, path: str = "/") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def http_url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def run_sync(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on the server's event loop thread and return its result."""
        result: T = self._call(fn)
        return result

    def task_count(self) -> int:
        """Tasks alive in the server's event loop right now."""
        if self.worker_class == "trio":
            return self.run_sync(_count_trio_tasks)
        return self.run_sync(lambda: len(asyncio.all_tasks()))


def _count_trio_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    return walk(trio.lowlevel.current_root_task())


@contextmanager
def serve_in_thread(
    app: ASGIApp, *, worker_class: str = "trio", **config_values: Any
) -> Iterator[ThreadedServer]:
    """Serve ``app`` with Hypercorn in a background thread until the block exits."""
    sock = bind_loopback()
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.graceful_timeout = 2.0
    config.accesslog = None
    for key, value in config_values.items():
        setattr(config, key, value)
    spy = LifespanSpy(app)
    ready: Future[Callable[[Callable[[], Any]], Any]] = Future()
    stopper: Future[Callable[[], None]] = Future()

    if worker_class == "trio":
        thread = threading.Thread(target=_run_trio, args=(spy, config, ready, stopper), daemon=True)
    else:
        thread = threading.Thread(
            target=_run_asyncio, args=(spy, config, ready, stopper), daemon=True
        )
    thread.start()
    try:
        call = ready.result(timeout=10)
        yield ThreadedServer(spy, port, worker_class, call)
    finally:
        if stopper.done():
            stopper.result()()
        thread.join(timeout=15)
        assert not thread.is_alive(), "the server did not shut down"
        if ready.exception() is not None:
            raise ready.exception()  # type: ignore[misc]


def _call_soon(token: trio.lowlevel.TrioToken, fn: Callable[[], T]) -> T:
    """Run ``fn`` in the Trio server's thread and wait for it (safe to call from any
    thread, including another Trio loop's, unlike ``trio.from_thread.run_sync``)."""
    done: Future[T] = Future()

    def call() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:
            done.set_exception(exc)

    token.run_sync_soon(call)
    return done.result(timeout=10)


def _run_trio(spy: LifespanSpy, config: Config, ready: Future[Any], stopper: Future[Any]) -> None:
    from hypercorn.utils import wrap_app

    from roomcast.launcher import trio_server

    async def main() -> None:
        shutdown = trio.Event()
        token = trio.lowlevel.current_trio_token()
        stopper.set_result(lambda: _call_soon(token, shutdown.set))
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: trio_server.serve(
                    wrap_app(spy, config.wsgi_max_body_size, "asgi"),  # type: ignore[arg-type]
                    config,
                    shutdown_trigger=shutdown.wait,
                    task_status=task_status,
                )
            )
            ready.set_result(lambda fn: _call_soon(token, fn))

    run_telling_ready(partial(trio.run, main), ready)


def _run_asyncio(
    spy: LifespanSpy, config: Config, ready: Future[Any], stopper: Future[Any]
) -> None:
    import hypercorn.asyncio

    async def main() -> None:
        loop = asyncio.get_running_loop()
        shutdown = asyncio.Event()
        stopper.set_result(lambda: loop.call_soon_threadsafe(shutdown.set))

        async def call_in_loop(fn: Callable[[], Any]) -> Any:
            return fn()

        async def announce_when_started() -> None:
            # Hypercorn's asyncio serve() has no started signal: watch the lifespan state.
            while spy.state is None or STATE_KEY not in spy.state:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            ready.set_result(
                lambda fn: asyncio.run_coroutine_threadsafe(call_in_loop(fn), loop).result(10)
            )

        async with asyncio.TaskGroup() as tg:
            tg.create_task(hypercorn.asyncio.serve(spy, config, shutdown_trigger=shutdown.wait))  # type: ignore[arg-type]
            tg.create_task(announce_when_started())

    run_telling_ready(partial(asyncio.run, main()), ready)


# -- subprocess servers -------------------------------------------------------------------------

_RUNNING_ON = re.compile(rb"Running on http://[0-9.]+:(\d+)")
_SERVING = re.compile(rb"worker\(s\) serving")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: the serving commands the README offers, by name
COMMANDS: dict[str, list[str]] = {
    "python -m roomcast": [sys.executable, "-m", "roomcast"],
    "roomcast": [os.path.join(os.path.dirname(sys.executable), "roomcast")],
    "scripts/run": ["bash", os.path.join(ROOT, "scripts", "run")],
    "hypercorn": [sys.executable, "-m", "hypercorn"],
}


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    output: list[bytes]
    host: str = "127.0.0.1"

    def url(self, path: str = "/") -> str:
        return f"ws://{self.host}:{self.port}{path}"

    def http_url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    @property
    def text(self) -> str:
        return b"".join(self.output).decode(errors="replace")

    def master(self) -> psutil.Process:
        """The serving process: the command's own, or its child when a shell runs it."""
        process = psutil.Process(self.process.pid)
        if process.name() == "bash":
            (process,) = [child for child in process.children() if "bash" not in child.name()]
        return process

    def workers(self) -> list[int]:
        """Worker pids (multiprocessing's resource tracker is not one)."""
        children = self.master().children()
        return sorted(c.pid for c in children if "resource_tracker" not in " ".join(c.cmdline()))

    @contextmanager
    def accepting_only(self, worker: int) -> Iterator[None]:
        """Stop every other worker (SIGSTOP) while the block runs, so that ``worker``
        accepts the connections it opens.

        The workers share one listening socket and the kernel hands a connection to
        whichever wakes first: on a busy machine one worker can win every time, so
        connecting until each worker has had one is no way to reach them all."""
        others = [pid for pid in self.workers() if pid != worker]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in others:
                os.kill(pid, signal.SIGCONT)

    def wait_for_output(self, pattern: str, timeout: float = 10.0, after: int = 0) -> str:
        """The first output line from index ``after`` on that matches ``pattern``."""
        compiled = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output[after:]:
                if compiled.search(line):
                    return line.decode(errors="replace")
            time.sleep(0.02)
        raise AssertionError(f"no output line matched {pattern!r}:\n{self.text}")


@contextmanager
def spawn_server(
    args: list[str] | None = None,
    *,
    env: dict[str, str] | None = None,
    port: int = 0,
    host: str = "127.0.0.1",
    command: str = "python -m roomcast",
    hypercorn: bool = False,
    config: str | None = None,
    nofile: int | None = None,
    timeout: float = 30.0,
    cwd: str = ROOT,
) -> Iterator[ServerProcess]:
    """Run a serving command of :data:`COMMANDS` (``hypercorn=True`` for plain Hypercorn)
    on ``host:port`` with the repository's hypercorn.toml (or ``config``; ``""``: none, so
    Hypercorn's defaults) and wait until
    every worker serves; the whole process group is killed on exit if still running.

    ``nofile`` sets the command's soft and hard open-file limit (``ulimit -n``); ``cwd``
    is its working directory.
    """
    bind = f"{host}:{port}"
    config = os.path.join(ROOT, "hypercorn.toml") if config is None else config
    command = "hypercorn" if hypercorn else command
    argv = [*COMMANDS[command], *(["--config", config] if config else []), "--bind", bind]
    argv += args or []
    if command == "hypercorn":
        argv.append("roomcast.app:app")
    # no archive unless the test names one (the default file would outlive the test)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "ROOMCAST_ARCHIVE": "off", **(env or {})}

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: workers die with it
        preexec_fn=limit_files,
    )
    output: list[bytes] = []
    ready = threading.Event()
    ports: list[int] = []
    launcher = command != "hypercorn"

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = _RUNNING_ON.search(line)
            if match and not ports:
                ports.append(int(match.group(1)))
            if ports and (not launcher or any(_SERVING.search(seen) for seen in output)):
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.05):
        if process.poll() is not None or time.monotonic() > deadline:
            _kill_group(process)
            raise RuntimeError(
                "server did not start:\n" + b"".join(output).decode(errors="replace")
            )
    try:
        yield ServerProcess(process, ports[0], output, host)
    finally:
        _kill_group(process)
        process.wait(timeout=10)
        reader.join(timeout=5)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill Hypercorn's parent, its worker processes and multiprocessing's helpers (one
    process group), so no orphan keeps the port or the output pipe open."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def run_telling_ready(run_loop: Callable[[], object], ready: Future[Any]) -> None:
    """Run a server's event loop; if it ends before it said it was ready, the test
    waiting on ``ready`` is told why instead of waiting out its timeout."""
    try:
        run_loop()
    except BaseException as exc:
        if not ready.done():
            ready.set_exception(exc)
        raise
