"""``/metrics``: Prometheus text exposition of one worker, or of all of them.

The hub and the runtime keep plain integer counters, so the fan-out path pays nothing for
observability; the metric families below are read from them only when needed.

- One process (tests, plain ``hypercorn``): a collector reads the families at scrape time.
  Each app owns its own registry (no process-global state).
- Several workers (``python -m roomcast``, whose master sets ``PROMETHEUS_MULTIPROC_DIR``):
  a scrape reaches one worker, which must answer for all. Each worker copies its values
  into prometheus-client's multiprocess files (:class:`SharedMetrics`) every
  :data:`SYNC_INTERVAL` seconds and right before it answers a scrape, and the answer
  merges every worker's files: gauges are summed over live workers, counters over every
  worker the server has had (so they never go back when one is replaced), and
  ``roomcast_outbox_depth`` is reported per worker, with a ``pid`` label.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .runtime import Runtime

__all__ = [
    "CONTENT_TYPE",
    "SYNC_INTERVAL",
    "SharedMetrics",
    "open_registry",
    "open_shared_metrics",
    "render",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROCESS_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"
#: seconds between a worker's copies of its values into the shared files
SYNC_INTERVAL: Final = 1.0

Value = float | dict[str, float]  # a dict is one value per ``stat`` label


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    kind: Literal["gauge", "counter"]
    read: Callable[[Runtime], Value]
    #: how gauges combine across workers (prometheus-client's multiprocess modes)
    across_workers: str = "livesum"


def _members(runtime: Runtime) -> int:
    return sum(len(room.members) for room in runtime.hub.rooms.values())


def _outbox_depth(runtime: Runtime) -> dict[str, float]:
    rooms = runtime.hub.rooms.values()
    clients = {member.client for room in rooms for member in room.members}  # a v2 one: once
    queued = [client.queued for client in clients]
    return {"sum": sum(queued), "max": max(queued, default=0)}


FAMILIES: Final = (
    Family("roomcast_connections", "Open WebSocket connections.", "gauge", lambda r: r.connections),
    Family(
        "roomcast_max_connections",
        "WebSocket connections a worker takes before answering 503.",
        "gauge",
        lambda r: r.max_connections,
    ),
    Family(
        "roomcast_rooms",
        "Rooms with members (a room with members on two workers counts twice).",
        "gauge",
        lambda r: sum(1 for room in r.hub.rooms.values() if room.members),
    ),
    Family("roomcast_members", "Room memberships.", "gauge", _members),
    Family(
        "roomcast_messages_in",
        "Chat messages accepted for fan-out.",
        "counter",
        lambda r: r.hub.stats.messages_in,
    ),
    Family(
        "roomcast_messages_out",
        "Events queued to members' outboxes.",
        "counter",
        lambda r: r.hub.stats.deliveries,
    ),
    Family(
        "roomcast_drops",
        "Client messages dropped (rate limit, too long, binary, bad id).",
        "counter",
        lambda r: r.hub.stats.drops,
    ),
    Family(
        "roomcast_evictions",
        "Members evicted because their outbox overflowed (close 4008).",
        "counter",
        lambda r: r.hub.stats.evictions,
    ),
    Family(
        "roomcast_connections_refused",
        "WebSocket handshakes answered 503 (ROOMCAST_MAX_CONNECTIONS reached).",
        "counter",
        lambda r: r.refused,
    ),
    Family(
        "roomcast_outbox_depth",
        "Events waiting in outboxes.",
        "gauge",
        _outbox_depth,
        across_workers="liveall",
    ),
    # -- big rooms: coalesced presence, retained history
    Family(
        "roomcast_presence_notices",
        "Presence notices handed to members (one per room per interval at most).",
        "counter",
        lambda r: r.hub.stats.presence_notices,
    ),
    Family(
        "roomcast_history_bytes",
        "Bytes of history retained for resume, in every room.",
        "gauge",
        lambda r: sum(room.history.bytes for room in r.hub.rooms.values()),
    ),
    # -- the archive (0 when ROOMCAST_ARCHIVE=off)
    Family(
        "roomcast_archive_lag",
        "Messages sequenced and not yet committed to the archive (queued or being written).",
        "gauge",
        lambda r: 0 if r.keeper is None else r.keeper.lag,
    ),
    Family(
        "roomcast_archive_written",
        "Messages committed to the archive.",
        "counter",
        lambda r: 0 if r.keeper is None else r.keeper.written,
    ),
    Family(
        "roomcast_archive_commits",
        "Archive transactions committed (one per batch).",
        "counter",
        lambda r: 0 if r.keeper is None else r.keeper.commits,
    ),
    Family(
        "roomcast_archive_commit_seconds",
        "Seconds spent in committed archive transactions.",
        "counter",
        lambda r: 0 if r.keeper is None else r.keeper.commit_seconds,
    ),
    Family(
        "roomcast_archive_failures",
        "Archive commits that failed (each is retried).",
        "counter",
        lambda r: 0 if r.keeper is None else r.keeper.failures,
    ),
    Family(
        "roomcast_archive_missed",
        "Messages the archive never received (its queue was full); recorded as missing.",
        "counter",
        lambda r: 0 if r.keeper is None else r.keeper.missed,
    ),
    Family(
        "roomcast_idle_history_bytes",
        "Bytes of history retained in rooms without members (ROOMCAST_IDLE_HISTORY_BYTES).",
        "gauge",
        lambda r: r.hub.idle_bytes,
    ),
)


class RuntimeCollector(Collector):
    """Reads every family from one runtime at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        for family in FAMILIES:
            metric_class = GaugeMetricFamily if family.kind == "gauge" else CounterMetricFamily
            value = family.read(self._runtime)
            if isinstance(value, dict):
                metric = metric_class(family.name, family.help, labels=["stat"])
                for stat, number in value.items():
                    metric.add_metric([stat], number)
                yield metric
            else:
                yield metric_class(family.name, family.help, value=value)


class SharedMetrics:
    """This worker's values in prometheus-client's multiprocess files."""

    def __init__(self) -> None:
        self._metrics: dict[str, Gauge | Counter] = {}
        self._counted: dict[str, float] = {}
        for family in FAMILIES:
            labels = ["stat"] if family.name == "roomcast_outbox_depth" else []
            if family.kind == "gauge":
                gauge = Gauge(
                    family.name,
                    family.help,
                    labels,
                    registry=None,
                    multiprocess_mode=family.across_workers,  # type: ignore[arg-type]
                )
                for stat in ("sum", "max") if labels else ():
                    gauge.labels(stat)  # open its file now, not at the first sync
                self._metrics[family.name] = gauge
            else:
                self._metrics[family.name] = Counter(family.name, family.help, registry=None)
                self._counted[family.name] = 0

    def sync(self, runtime: Runtime) -> None:
        """Copy the runtime's current values into the shared files."""
        for family in FAMILIES:
            metric, value = self._metrics[family.name], family.read(runtime)
            if isinstance(metric, Counter):
                assert not isinstance(value, dict)
                metric.inc(value - self._counted[family.name])
                self._counted[family.name] = value
            elif isinstance(value, dict):
                for stat, number in value.items():
                    metric.labels(stat).set(number)
            else:
                metric.set(value)


def open_shared_metrics() -> SharedMetrics | None:
    """Shared metrics if the process runs as one of several workers, else ``None``."""
    return SharedMetrics() if os.environ.get(MULTIPROCESS_DIR) else None


def open_registry(runtime: Runtime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    if runtime.shared_metrics is not None:
        MultiProcessCollector(registry, os.environ[MULTIPROCESS_DIR])  # type: ignore[no-untyped-call]
    else:
        registry.register(RuntimeCollector(runtime))
    return registry


def render(runtime: Runtime) -> bytes:
    if runtime.shared_metrics is not None:
        runtime.shared_metrics.sync(runtime)
    return generate_latest(runtime.registry)
