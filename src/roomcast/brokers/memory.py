"""The embedded default: rooms, order and history live in the process's own hub (and,
with an archive, each room's position survives the process: :mod:`roomcast.archive.positions`)."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..hub import Client, Hub, Member
from ..protocol import ChatMessage, CloseCode
from . import DISCONNECTED, Claim, History, Person

if TYPE_CHECKING:
    from ..archive.keeper import Keeper

__all__ = ["MemoryBroker"]


class MemoryBroker:
    """Everything happens synchronously in the hub, so joining (snapshot + registration)
    and publishing (sequence + fan-out) are each atomic on the event loop."""

    name = "memory"
    healthy = True

    def __init__(self, hub: Hub, keeper: Keeper | None = None) -> None:
        self.hub = hub
        self.positions = None
        if keeper is not None:
            from ..archive.positions import Positions

            self.positions = Positions(hub, keeper)
        #: open connections per verified user, and the claims counted in it
        self._connections: Counter[str] = Counter()
        self._claims: set[Claim] = set()
        self._claim_ids = itertools.count()

    async def join(
        self,
        room: str,
        name: str | None,
        *,
        since: int | None,
        epoch: str | None,
        user: str | None = None,
        client: Client | None = None,
    ) -> Member:
        if self.positions is None:
            return self.hub.join(room, name, since=since, epoch=epoch, user=user, client=client)
        await self.positions.load(room)
        try:
            return self.hub.join(room, name, since=since, epoch=epoch, user=user, client=client)
        finally:
            self.positions.done(room)

    async def leave(self, member: Member) -> None:
        self.hub.leave(member)

    async def rename(self, member: Member, name: str) -> None:
        self.hub.rename(member, name)

    async def publish(self, member: Member, message: ChatMessage) -> None:
        self.hub.publish(member, message)

    async def clear_history(self, room: str) -> tuple[str, int] | None:
        return self.hub.clear_history(room)

    async def answered(self, member: Member) -> None:
        pass  # publish answers before it returns

    async def post(self, room: str, message: ChatMessage, sender: str | None) -> int:
        if self.positions is None:
            return self.hub.post(room, message, sender)
        await self.positions.load(room)
        try:
            return self.hub.post(room, message, sender)
        finally:
            self.positions.done(room)

    async def history(self, room: str, since: int, limit: int) -> History:
        if self.positions is not None:
            await self.positions.load(room)  # a room the hub forgot: as the archive has it
        found = self.hub.rooms.get(room)
        if found is None and self.positions is not None:
            found = self.hub.peek_room(room, self.positions.take(room))
        if found is None:
            return History(None, 0, 1, [])
        kept = found.history.entries
        first = kept[0][0] if kept else found.seq + 1
        events = [encoded for seq, encoded in kept if seq > since][:limit]
        return History(found.epoch, found.seq, first, events)

    async def presence(self, room: str) -> list[Person]:
        found = self.hub.rooms.get(room)
        return [] if found is None else [Person(user, name) for user, name in found.people()]

    async def rooms(self) -> dict[str, int]:
        return {name: room.count for name, room in self.hub.rooms.items() if room.members}

    async def claim_connection(self, user: str, limit: int) -> Claim | None:
        if self._connections[user] >= limit:
            return None
        claim = Claim(user, str(next(self._claim_ids)))
        self._claims.add(claim)
        self._connections[user] += 1
        return claim

    async def release_connection(self, claim: Claim) -> None:
        if claim not in self._claims:
            return
        self._claims.remove(claim)
        self._connections[claim.user] -= 1
        if not self._connections[claim.user]:
            del self._connections[claim.user]

    async def disconnect(self, user: str) -> int:
        return self.hub.end_user(user, CloseCode.UNAUTHORIZED, DISCONNECTED)

    async def notify(self, user: str, data: Any) -> int:
        return self.hub.notify(user, protocol.encode_notice(data))

    async def typing(self, member: Member) -> None:
        room = member.room
        encoded = protocol.encode_typing(room=room.name, user=member.user, name=member.name)
        self.hub.relay_typing(room, encoded, origin=member.client.id)
