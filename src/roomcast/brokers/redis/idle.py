"""Idle budgets in Redis Cluster: each idle room marked in its own slot, a periodic sweep
forgets the oldest beyond the budgets.

On one Redis every script that empties a room settles it against one global sorted set
of idle rooms and their byte total, and evicts in the same atomic step (*Idle rooms* in
:mod:`.keys`). A cluster script may touch only its own slot, so here:

- *The mark, in the room's slot.* The scripts' ``settle`` (:func:`.cluster.cluster_script`)
  sets ``roomcast:{<room>}:idle`` to the time (ms, Redis's clock) a room without presence
  but with history became idle, deletes it when presence returns, and still forgets at
  once a room with nothing to keep. A room's history bytes are its own key already.
- *The sweep, every* :data:`SWEEP_INTERVAL` *seconds, by one worker.* Every worker tries to
  take a short lease (``SET NX PX`` on :data:`LEASE`); the one that holds it lists the idle
  marks (``SCAN`` on each master), reads each with its room's history bytes, and forgets
  the least recently emptied rooms until both budgets (this server's settings) hold again,
  each with :data:`FORGET_IDLE` on the room's own slot: only if the room is still idle
  since the mark that was read (a room joined, or emptied again, since is not the room
  the sweep chose, and survives).

*Why a sweep and not an index.* An index of idle rooms in a few hash-tagged partitions,
kept by the worker after each script, is exact between sweeps but needs every script that
settles a room to report it, and leaves rooms counted that a dying worker never recorded.
The marks are written by the scripts themselves, atomically with the change, so the sweep
never misses a room and never needs repair; what it costs is that the budgets are enforced
up to :data:`SWEEP_INTERVAL` late (a burst of rooms emptied meanwhile is over budget until
the next sweep), and a ``SCAN`` of every master's keys per sweep: O(keys in the cluster),
which at a sweep every few seconds is small beside the traffic that made those rooms. A
sweep that fails (a master down) is simply the next one's work.
"""

from __future__ import annotations

import secrets
from typing import Any, Final

import anyio
from coredis.exceptions import RedisError
from coredis.tokens import PureToken

from .. import BrokerUnavailable
from . import calls
from .calls import Calls, log

__all__ = ["FORGET_IDLE", "LEASE", "SWEEP_INTERVAL", "IdleSweep"]

#: seconds between two sweeps of the idle rooms (each by one worker of the cluster)
SWEEP_INTERVAL: Final = 2.0
#: the sweep's lease: whoever sets it (NX, expiring within the interval) sweeps this round
LEASE: Final = "roomcast:{idle-sweep}"
#: what an idle mark's key looks like, for SCAN (``{`` is no glob character in Redis)
_MARKS: Final = "roomcast:{*}:idle"
#: a room's keys, the mark and presence first (:data:`FORGET_IDLE`'s KEYS)
_SUFFIXES: Final = (
    "idle",
    "presence",
    "seq",
    "epoch",
    "history",
    "history-bytes",
    "users",
    "names",
)

#: KEYS a room's idle mark, presence, then its other keys; ARGV the mark the sweep read ->
#: 1 if the room was forgotten, 0 if it is not idle since that mark any more
FORGET_IDLE: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('DEL', unpack(KEYS))
return 1
"""


def _room_of_mark(key: str) -> str:
    return key[len("roomcast:{") : -len("}:idle")]


def _bytes_key(mark: str) -> str:
    return mark.removesuffix(":idle") + ":history-bytes"


def _keys_of(room: str) -> list[str]:
    return [f"roomcast:{{{room}}}:{suffix}" for suffix in _SUFFIXES]


def beyond_budgets(rooms: list[tuple[int, int, str]], most: int, budget: int) -> list[str]:
    """The rooms to forget, oldest first: ``rooms`` are (idle since, bytes, room), and
    what remains after them is at most ``most`` rooms holding at most ``budget`` bytes."""
    rooms = sorted(rooms)
    held = sum(size for _, size, _ in rooms)
    doomed: list[str] = []
    for _, size, room in rooms:
        if len(rooms) - len(doomed) <= most and held <= budget:
            break
        doomed.append(room)
        held -= size
    return doomed


class IdleSweep(Calls):
    """The sweep of idle rooms (cluster mode only; one Redis settles them in its scripts)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._forget_idle = self.client.register_script(FORGET_IDLE)

    async def _sweep_idle_forever(self) -> None:
        if not self.cluster:
            return
        token = secrets.token_urlsafe(8)
        lease = int(SWEEP_INTERVAL * 1000 * 0.9)
        while True:
            await anyio.sleep(SWEEP_INTERVAL)
            try:
                if await self._call_raw(
                    self.client.set(LEASE, token, condition=PureToken.NX, px=lease)
                ):
                    await self._sweep_idle()
            except BrokerUnavailable:
                continue  # (logged by the call that failed, as any unavailability)

    async def _sweep_idle(self) -> int:
        """Forget the idle rooms beyond the budgets; returns how many were forgotten.

        :raises BrokerUnavailable: if a master cannot be listed or a room read
        """
        rooms = []
        for key in await self._idle_marks():
            mark, size = await self._call_raw(self.client.mget([key, _bytes_key(key)]))
            if mark is not None:  # (joined since it was listed)
                rooms.append((int(mark), int(size or 0), _room_of_mark(key)))
        marks = {room: mark for mark, _, room in rooms}
        forgotten = 0
        budgets = self.settings.idle_rooms, self.settings.idle_history_bytes
        for room in beyond_budgets(rooms, *budgets):
            forgotten += await self._call(self._forget_idle, _keys_of(room), [marks[room]])
        if forgotten:
            log.debug("idle sweep: %d of %d idle rooms forgotten", forgotten, len(rooms))
        return forgotten

    async def _idle_marks(self) -> list[str]:
        """Every idle mark in the cluster (a ``SCAN`` of each master).

        :raises BrokerUnavailable: if a master cannot be listed in time
        """
        try:
            with anyio.fail_after(calls.REQUEST_TIMEOUT * 5):
                return [key async for key in self.client.scan_iter(match=_MARKS, count=1000)]
        except (RedisError, TimeoutError, OSError) as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc
        except ExceptionGroup as group:  # (coredis lists each master in a task group)
            if group.split((RedisError, TimeoutError, OSError))[1] is not None:
                raise
            raise BrokerUnavailable(str(group.exceptions[0])) from group
