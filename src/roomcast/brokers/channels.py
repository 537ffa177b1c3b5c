"""Which room channels a worker's subscriber holds: one per room with local members.

A worker hears only the rooms it serves. With one pattern subscription for everything,
every worker received (and parsed, and dropped) every message of every room in the
deployment; here a room's channel is subscribed while a local member is in the room and
unsubscribed when the last one leaves (:meth:`RoomChannels.want`,
:meth:`RoomChannels.release`).

*Pipelining.* Wishes are not sent one by one: one writer task
(:meth:`RoomChannels.keep_subscribed`) wakes after they were made and sends everything
wished for since it last looked as one ``UNSUBSCRIBE`` and one ``SUBSCRIBE`` of many
channels (at most :data:`CHUNK` each). A thousand joins into a thousand rooms in the same
moment cost a couple of commands, not a thousand round trips.

*Why a join waits for its room's confirmation.* The broker takes a joiner's snapshot
(seq, history) only once the room's subscription is confirmed. Redis answers
``SUBSCRIBE`` on the subscriber's connection when it has processed it, so every message
published after that answer reaches the subscriber; the snapshot is read after it, so
every seq after the snapshot is received (the joining argument of
:mod:`.redis.joining`). Each subscription is confirmed by a reply of its own, in the
order the commands went out; a channel unsubscribed and subscribed again before the
first answers came back is ready only after the answer to the last ``SUBSCRIBE`` (a
count per channel), never on an earlier one that an ``UNSUBSCRIBE`` has since undone.

*A new connection* (the subscriber reconnected) holds nothing: :meth:`RoomChannels.restart`
forgets what was sent and wishes every wanted channel again; joins waiting meanwhile wait
for the new confirmation, or time out and are refused ("try again shortly").

*Messages from before the confirmation are not the room's stream.* A room let go and wanted
again while its ``UNSUBSCRIBE`` was on its way has messages arriving from the old
subscription, then none while it was undone, then the new one's. The broker hands a
room's messages on only while :meth:`RoomChannels.holds` it, which becomes true at the
confirmation, read in the order of the connection's messages: its stream starts after
the gap.

Every method but :meth:`~RoomChannels.keep_subscribed` is synchronous and called from the
worker's tasks on one event loop: wishes from joins and leaves, confirmations from the
subscriber's reader.
"""

from __future__ import annotations

from collections import Counter
from typing import Final, Protocol

import anyio

__all__ = ["CHUNK", "ChannelCommands", "RoomChannels"]

#: most channels in one SUBSCRIBE or UNSUBSCRIBE
CHUNK: Final = 1000


class ChannelCommands(Protocol):
    """What :meth:`RoomChannels.keep_subscribed` needs of a subscription."""

    async def subscribe(self, channels: list[str]) -> None: ...

    async def unsubscribe(self, channels: list[str]) -> None: ...


class RoomChannels:
    """The room channels one subscriber connection should hold, and which it does."""

    def __init__(self) -> None:
        #: wanted channel -> set once its subscription is confirmed on this connection
        self._wanted: dict[str, anyio.Event] = {}
        #: channels subscribed (the command sent, confirmed or not) on this connection
        self._sent: set[str] = set()
        #: SUBSCRIBE commands sent per channel and not answered yet
        self._unconfirmed: Counter[str] = Counter()
        #: channels wished for or let go since the writer last looked (ordered, no repeats)
        self._changed: dict[str, None] = {}
        self._wakeup = anyio.Event()

    def __len__(self) -> int:
        return len(self._wanted)

    def __contains__(self, channel: str) -> bool:
        """``channel`` is wanted here (confirmed or not)."""
        return channel in self._wanted

    @property
    def ready(self) -> bool:
        """Every wanted channel is confirmed on the current connection."""
        return all(event.is_set() for event in self._wanted.values())

    def holds(self, channel: str) -> bool:
        """``channel`` is wanted and confirmed: its messages belong to the subscription
        a joiner's snapshot was taken after (any earlier one may have gaps)."""
        ready = self._wanted.get(channel)
        return ready is not None and ready.is_set()

    def want(self, channel: str) -> anyio.Event:
        """Hold ``channel`` (a room a local member is joining); the event is set once
        its subscription is confirmed (at once if it already is)."""
        ready = self._wanted.get(channel)
        if ready is None:
            ready = self._wanted[channel] = anyio.Event()
            if channel in self._sent and not self._unconfirmed[channel]:
                ready.set()  # let go a moment ago, but its UNSUBSCRIBE had not gone out
            else:
                self._note(channel)
        return ready

    def release(self, channel: str) -> None:
        """Let ``channel`` go (its room's last local member has left)."""
        if self._wanted.pop(channel, None) is not None:
            self._note(channel)

    def confirmed(self, channel: str) -> None:
        """Redis answered one ``SUBSCRIBE`` of ``channel`` (called by the reader, in the
        order of the connection's messages)."""
        left = self._unconfirmed[channel] - 1
        if left > 0:
            self._unconfirmed[channel] = left
            return
        self._unconfirmed.pop(channel, None)
        ready = self._wanted.get(channel)
        if ready is not None and channel in self._sent:
            ready.set()

    def restart(self) -> None:
        """A new connection holds nothing: wish for every wanted channel again."""
        self._sent.clear()
        self._unconfirmed.clear()
        for channel, ready in self._wanted.items():
            if ready.is_set():
                self._wanted[channel] = anyio.Event()
        self._changed = dict.fromkeys(self._wanted)
        self._wakeup.set()

    async def keep_subscribed(self, subscription: ChannelCommands) -> None:
        """Send what was wished for, in as few commands as it takes, until cancelled.

        :raises SubscriptionLost: if a command cannot be written
        """
        while True:
            await self._wakeup.wait()
            self._wakeup = anyio.Event()
            changed, self._changed = self._changed, {}
            drop = [c for c in changed if c not in self._wanted and c in self._sent]
            add = [c for c in changed if c in self._wanted and c not in self._sent]
            self._sent.difference_update(drop)
            self._sent.update(add)
            self._unconfirmed.update(add)
            for start in range(0, len(drop), CHUNK):
                await subscription.unsubscribe(drop[start : start + CHUNK])
            for start in range(0, len(add), CHUNK):
                await subscription.subscribe(add[start : start + CHUNK])

    def _note(self, channel: str) -> None:
        self._changed[channel] = None
        self._wakeup.set()
