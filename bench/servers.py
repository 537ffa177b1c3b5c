"""The servers the suite measures: roomcast in four configurations and the baselines.

Every server is started as a subprocess of the runner (``cwd`` = the repository root, so
``bench.baselines.*`` and ``./hypercorn.toml`` resolve), on a free loopback port, in its
own process group so that the runner can stop it and every worker it spawned.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

BATCH = "roomcast.batch"
PY = sys.executable


@dataclass(frozen=True)
class Server:
    name: str
    argv: tuple[str, ...]  # "{port}" is replaced by the chosen port
    description: str
    kind: str  # "roomcast" or "baseline"
    subprotocol: str | None = None  # offered by the load generator's clients
    #: the load generator's clients offer permessage-deflate as browsers do
    deflate: bool = False
    env: dict[str, str] = field(default_factory=dict)
    roomcast_env: bool = False  # gets ROOMCAST_* settings from the runner
    #: the idle workload runs once per server process kind: batch variants share it
    idle: bool = True
    bounded: bool | None = None  # per-client memory bounded under stalled readers (design)
    #: handshakes the load generator keeps in flight while a room fills (not measured).
    #: 1 for the chapter app: it adds a client to its room before accepting it, and a
    #: concurrent join's broadcast to a not-yet-accepted client raises, which silently
    #: drops that client from the room for good.
    join_concurrency: int = 20

    def command(self, port: int) -> list[str]:
        return [arg.replace("{port}", str(port)) for arg in self.argv]


#: ROOMCAST_COMPRESSION's values, each an experiment server of its own
DEFLATE_MODES = ("low-memory", "no-context", "full", "off")


def _roomcast(worker: str) -> tuple[str, ...]:
    return (PY, "-m", "roomcast", "--bind", "127.0.0.1:{port}", "-k", worker, "--workers", "1")


def _hypercorn_trio(app: str) -> tuple[str, ...]:
    return (PY, "-m", "hypercorn", "-k", "trio", "-w", "1", "--bind", "127.0.0.1:{port}", app)


def _uvicorn(app: str) -> tuple[str, ...]:
    return (
        PY,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--log-level",
        "warning",
        "--no-access-log",
        "--lifespan",
        "on",
    )


SERVERS: dict[str, Server] = {
    s.name: s
    for s in [
        Server(
            "roomcast-trio-batch",
            _roomcast("trio"),
            "roomcast, Hypercorn trio worker, clients offer roomcast.batch",
            "roomcast",
            subprotocol=BATCH,
            roomcast_env=True,
            idle=False,
            bounded=True,
        ),
        Server(
            "roomcast-trio",
            _roomcast("trio"),
            "roomcast, Hypercorn trio worker, one event per frame",
            "roomcast",
            roomcast_env=True,
            bounded=True,
        ),
        Server(
            "roomcast-asyncio-batch",
            _roomcast("asyncio"),
            "roomcast, Hypercorn asyncio worker, clients offer roomcast.batch",
            "roomcast",
            subprotocol=BATCH,
            roomcast_env=True,
            idle=False,
            bounded=True,
        ),
        Server(
            "roomcast-asyncio",
            _roomcast("asyncio"),
            "roomcast, Hypercorn asyncio worker, one event per frame",
            "roomcast",
            roomcast_env=True,
            bounded=True,
        ),
        Server(
            "chapter-trio",
            _hypercorn_trio("bench.baselines.chapter:application"),
            "the chapter's sequential-broadcast app, Hypercorn trio worker",
            "baseline",
            bounded=None,
            join_concurrency=1,
        ),
        Server(
            "chapter-uvicorn",
            _uvicorn("bench.baselines.chapter:application"),
            "the chapter's sequential-broadcast app, uvicorn (uvloop, websockets-sansio)",
            "baseline",
            bounded=None,
            join_concurrency=1,
        ),
        Server(
            "starlette-broadcaster",
            _uvicorn("bench.baselines.starlette_broadcaster:app"),
            "Starlette + broadcaster (memory://), uvicorn: a task and an unbounded queue per client",
            "baseline",
            bounded=False,
        ),
        Server(
            "websockets-broadcast",
            (PY, "-m", "bench.baselines.websockets_broadcast", "--port", "{port}"),
            "websockets.asyncio.server + broadcast(), asyncio loop: no backpressure",
            "baseline",
            bounded=False,
        ),
        # Not in the default set: experiments.
        Server(
            "roomcast-trio-gc",
            _roomcast("trio"),
            "roomcast-trio with gc.set_threshold(100_000, 50, 1000) (bench/experiments/gc)",
            "roomcast",
            roomcast_env=True,
            bounded=True,
            env={"PYTHONPATH": "bench/experiments/gc"},
        ),
        Server(
            "roomcast-trio-batch-gc",
            _roomcast("trio"),
            "roomcast-trio-batch with gc.set_threshold(100_000, 50, 1000) (bench/experiments/gc)",
            "roomcast",
            subprotocol=BATCH,
            roomcast_env=True,
            idle=False,
            bounded=True,
            env={"PYTHONPATH": "bench/experiments/gc"},
        ),
        Server(
            "roomcast-trio-hypercorn-write",
            _roomcast("trio"),
            "roomcast-trio with Hypercorn's own write path (bench/experiments/hypercorn_write)",
            "roomcast",
            roomcast_env=True,
            bounded=True,
            env={"PYTHONPATH": "bench/experiments/hypercorn_write"},
        ),
        Server(
            "roomcast-trio-batch-hypercorn-write",
            _roomcast("trio"),
            "roomcast-trio-batch with Hypercorn's own write path (bench/experiments/hypercorn_write)",
            "roomcast",
            subprotocol=BATCH,
            roomcast_env=True,
            idle=False,
            bounded=True,
            env={"PYTHONPATH": "bench/experiments/hypercorn_write"},
        ),
        Server(
            "roomcast-trio-batch-hooked",
            (*_roomcast("trio"), "--app", "bench.hooked:app"),
            "roomcast-trio-batch with a pass-through message hook (bench/hooked.py)",
            "roomcast",
            subprotocol=BATCH,
            roomcast_env=True,
            idle=False,
            bounded=True,
        ),
        Server(
            "roomcast-trio-batch-webhook",
            (PY, "-m", "bench.webhooked", "--port", "{port}"),
            "roomcast-trio-batch posting a message webhook to a local receiver (bench/webhooked.py)",
            "roomcast",
            subprotocol=BATCH,
            roomcast_env=True,
            idle=False,
            bounded=True,
        ),
        Server(
            "roomcast-trio-batch-archived",
            _roomcast("trio"),
            "roomcast-trio-batch with the SQLite archive (a fresh file per server start)",
            "roomcast",
            subprotocol=BATCH,
            roomcast_env=True,
            idle=False,
            bounded=True,
            env={"ROOMCAST_ARCHIVE": "sqlite:///{tmpdir}/archive.db"},
        ),
        Server(
            "outbox-trio",
            _hypercorn_trio("bench.experiments.outbox_app:application"),
            "roomcast's task-per-member design alone (bench/experiments/outbox_app.py), trio",
            "baseline",
            bounded=True,
        ),
        *(
            Server(
                f"roomcast-trio-batch-deflate-{mode}",
                _roomcast("trio"),
                f"roomcast-trio-batch, clients offering permessage-deflate as browsers do, "
                f"ROOMCAST_COMPRESSION={mode}",
                "roomcast",
                subprotocol=BATCH,
                deflate=True,
                roomcast_env=True,
                bounded=True,
                env={"ROOMCAST_COMPRESSION": mode},
            )
            for mode in DEFLATE_MODES
        ),
        Server(
            "websockets-broadcast-deflate",
            (PY, "-m", "bench.baselines.websockets_broadcast", "--port", "{port}"),
            "websockets-broadcast, clients offering permessage-deflate as browsers do",
            "baseline",
            deflate=True,
            bounded=False,
        ),
        Server(
            "websockets-broadcast-uvloop",
            (PY, "-m", "bench.baselines.websockets_broadcast", "--port", "{port}", "--uvloop"),
            "websockets.asyncio.server + broadcast(), uvloop",
            "baseline",
            bounded=False,
        ),
    ]
}

EXPERIMENTS = {
    "roomcast-trio-batch-hooked",
    "roomcast-trio-batch-webhook",
    "roomcast-trio-batch-archived",
    *(f"roomcast-trio-batch-deflate-{mode}" for mode in DEFLATE_MODES),
    "websockets-broadcast-deflate",
    "outbox-trio",
    "websockets-broadcast-uvloop",
    "roomcast-trio-gc",
    "roomcast-trio-batch-gc",
    "roomcast-trio-hypercorn-write",
    "roomcast-trio-batch-hypercorn-write",
}
DEFAULT_SERVERS = [name for name in SERVERS if name not in EXPERIMENTS]
#: the chapter app on the same server roomcast uses: every ratio in the tables is against it
REFERENCE = "chapter-trio"
