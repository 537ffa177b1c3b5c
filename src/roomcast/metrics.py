"""``/metrics``: Prometheus text exposition, read from the hub at scrape time.

The hub keeps plain integer counters; this collector turns them into metric families only
when scraped, so the fan-out path pays nothing for observability. Each app owns its own
registry (no process-global state), which also keeps tests independent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .hub import Hub

__all__ = ["CONTENT_TYPE", "open_registry", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HubCollector(Collector):
    def __init__(self, hub: Hub, connections: Callable[[], int]) -> None:
        self._hub = hub
        self._connections = connections

    def collect(self) -> Iterator[Metric]:
        hub, stats = self._hub, self._hub.stats
        members = [member for room in hub.rooms.values() for member in room.members]
        yield GaugeMetricFamily(
            "roomcast_connections", "Open WebSocket connections.", value=self._connections()
        )
        yield GaugeMetricFamily(
            "roomcast_rooms",
            "Rooms with members.",
            value=sum(1 for r in hub.rooms.values() if r.members),
        )
        yield GaugeMetricFamily("roomcast_members", "Room memberships.", value=len(members))
        yield CounterMetricFamily(
            "roomcast_messages_in", "Chat messages accepted for fan-out.", value=stats.messages_in
        )
        yield CounterMetricFamily(
            "roomcast_messages_out", "Events queued to members' outboxes.", value=stats.deliveries
        )
        yield CounterMetricFamily(
            "roomcast_drops",
            "Client messages dropped (rate limit, too long, binary, bad id).",
            value=stats.drops,
        )
        yield CounterMetricFamily(
            "roomcast_evictions",
            "Members evicted because their outbox overflowed (close 4008).",
            value=stats.evictions,
        )
        depth = GaugeMetricFamily(
            "roomcast_outbox_depth", "Events waiting in outboxes.", labels=["stat"]
        )
        queued = [member.queued for member in members]
        depth.add_metric(["sum"], sum(queued))
        depth.add_metric(["max"], max(queued, default=0))
        yield depth


def open_registry(hub: Hub, connections: Callable[[], int]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub, connections))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
