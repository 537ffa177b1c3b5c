"""The embedded default: rooms, order and history live in the process's own hub."""

from __future__ import annotations

from ..hub import Hub, Member
from ..protocol import ChatMessage

__all__ = ["MemoryBroker"]


class MemoryBroker:
    """Everything happens synchronously in the hub, so joining (snapshot + registration)
    and publishing (sequence + fan-out) are each atomic on the event loop."""

    name = "memory"
    healthy = True

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def join(
        self, room: str, name: str | None, *, since: int | None, epoch: str | None
    ) -> Member:
        return self.hub.join(room, name, since=since, epoch=epoch)

    async def leave(self, member: Member) -> None:
        self.hub.leave(member)

    async def publish(self, member: Member, message: ChatMessage) -> None:
        self.hub.publish(member, message)
