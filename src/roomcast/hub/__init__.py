"""Rooms, membership, fan-out and presence notices: the hub of one process.

The hub is synchronous on purpose: joining, leaving and publishing never await, so each of
them happens atomically with respect to every other task on the event loop. That is what
makes a room's order total (one ``seq`` per room, assigned and fanned out in one step) and
what makes resume exact (the history snapshot and the registration of the new member
happen with no checkpoint in between, so nothing can fall into a gap or arrive twice).

Fan-out never waits on a client: each member owns a bounded outbox (an anyio memory object
stream) and the hub only ever calls ``send_nowait`` on it. A member whose outbox is full is
evicted on the spot; its connection closes it with :attr:`CloseCode.TOO_SLOW`.

One :class:`Hub` object, whose parts live in modules of their own:

- :mod:`.model`: the data (:class:`Client`, :class:`Member`, :class:`Room`, counters);
- :mod:`.membership`: who is in which room, how a membership or connection ends
  (eviction included), which rooms are kept for resume, :func:`replay`;
- :mod:`.fanout`: messages, acks, typing and notices into outboxes (on membership);
- :mod:`.flusher`: presence notices, at most one per room and interval (a part of its
  own, ``hub.flusher``, whose operations the hub offers as its own).

Everything else (brokers, connections, the server API, metrics) uses the :class:`Hub` and
the names exported here, not the modules.
"""

from __future__ import annotations

from .fanout import Fanout
from .flusher import PRESENCE_RATE, PresenceFlusher, PresenceSource
from .membership import replay
from .model import PRESENCE_WAKE, Announce, Client, HubStats, Member, NameTaken, Room, RoomFull

__all__ = [
    "PRESENCE_RATE",
    "PRESENCE_WAKE",
    "Announce",
    "Client",
    "Hub",
    "HubStats",
    "Member",
    "NameTaken",
    "PresenceSource",
    "Room",
    "RoomFull",
    "replay",
]


class Hub(Fanout):
    """All rooms of one process: their membership (:class:`.membership.Membership`), what
    they say (:class:`.fanout.Fanout`, built on membership) and their presence notices
    (:attr:`flusher`, a :class:`.flusher.PresenceFlusher`).

    :param outbox_size: events buffered per member before it is evicted
    :param history_size: messages each room keeps for ``since`` resume
    :param room_capacity: members per room, 0 for unlimited
    :param idle_rooms: rooms without members whose history is kept (least recently
        emptied are forgotten first); beyond that a room's sequence restarts with a new epoch
    :param history_bytes: bytes of history each room keeps (:func:`~roomcast.history.entry_size`)
    :param idle_history_bytes: bytes of history all rooms without members keep together;
        beyond it the least recently emptied are forgotten, as beyond ``idle_rooms``
    :param presence_interval: seconds between two presence notices of one room (longer in
        rooms of more than :data:`PRESENCE_RATE` members)
    :param presence_grace: seconds a leave waits before it is announced; the same person
        joining within it (a reloaded tab) takes it back, and neither is announced. 0 (the
        hub's default, for tests of everything else) announces leaves as they happen
    :param max_text: the longest chat text in characters, told to clients in ``welcome``
    """

    def __init__(
        self,
        *,
        outbox_size: int = 1024,
        history_size: int = 100,
        room_capacity: int = 0,
        idle_rooms: int = 1000,
        history_bytes: int = 256 * 1024,
        idle_history_bytes: int = 64 * 1024 * 1024,
        presence_interval: float = 1.0,
        presence_grace: float = 0.0,
        max_text: int = 4000,
    ) -> None:
        super().__init__(
            outbox_size=outbox_size,
            history_size=history_size,
            room_capacity=room_capacity,
            idle_rooms=idle_rooms,
            history_bytes=history_bytes,
            idle_history_bytes=idle_history_bytes,
            max_text=max_text,
        )
        self.flusher = PresenceFlusher(
            self.stats,
            self._drop_all,
            presence_interval=presence_interval,
            presence_grace=presence_grace,
        )
        # the flusher's operations, as the hub's: brokers and tests call them on the hub
        # (bound once here, so a call costs no more than a method of the hub's own)
        self.announce_locally = self.flusher.announce_locally
        self.note_presence = self.flusher.note_presence
        self.run_presence = self.flusher.run_presence
        self.flush_presence = self.flusher.flush_presence
        self.announce = self.announce_locally

    @property
    def presence_source(self) -> PresenceSource | None:
        """Set by a broker that keeps presence elsewhere (Redis); ``None``: this hub's
        members (the flusher's, see :attr:`PresenceFlusher.presence_source`)."""
        return self.flusher.presence_source

    @presence_source.setter
    def presence_source(self, source: PresenceSource | None) -> None:
        self.flusher.presence_source = source
