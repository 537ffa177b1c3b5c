"""Rooms the in-process broker opens from the archive: a room's epoch, seq and retained
window come from there when the hub does not hold the room, so its sequence goes on
across restarts and after the hub forgot it (idle budgets).

The hub is synchronous (:meth:`Hub.join` opens a room with no checkpoint), so the
position is loaded before it is called: :meth:`Positions.load` reads it (one reading per
room at a time; a second join of the same unseen room waits for the first's), leaves it
in :attr:`Positions.ready`, and the caller calls the hub with no checkpoint in between;
the hub takes it from there (:meth:`Positions.take`) when it opens the room, and the
caller drops whatever is left (:meth:`Positions.done`). So nothing is held per room
beyond a join in progress: a room the hub forgets is read again when it is next opened.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from .base import ArchiveUnavailable, Position
from .keeper import POSITION_TIMEOUT, Keeper

if TYPE_CHECKING:
    from ..hub import Hub

__all__ = ["Positions"]

log = logging.getLogger("roomcast")


class Positions:
    """Loads rooms' positions for ``hub`` from ``keeper`` (see the module docstring)."""

    def __init__(self, hub: Hub, keeper: Keeper) -> None:
        self.hub = hub
        self.keeper = keeper
        #: positions read and not yet taken by the hub (``None``: a room never archived)
        self.ready: dict[str, Position | None] = {}
        self._loading: dict[str, anyio.Event] = {}
        hub.restore = self.take

    async def load(self, room: str) -> None:
        """Return once the hub holds ``room`` or its position is ready: the caller then
        calls the hub without a checkpoint, and :meth:`done` after."""
        while room not in self.hub.rooms and room not in self.ready:
            loading = self._loading.get(room)
            if loading is not None:
                await loading.wait()  # and look again: it may be gone already
                continue
            self._loading[room] = loading = anyio.Event()
            try:
                position = await self._read(room)
                if room not in self.hub.rooms:
                    self.ready[room] = position
            finally:
                del self._loading[room]
                loading.set()

    async def _read(self, room: str) -> Position | None:
        """The room's position; if the archive cannot tell in time, none: the room opens
        with a new epoch (no seq can be reused), and chat goes on."""
        try:
            with anyio.fail_after(POSITION_TIMEOUT):
                return await self.keeper.position(room)
        except (ArchiveUnavailable, TimeoutError) as exc:
            log.warning(
                "roomcast: #%s opens with a new epoch: the archive cannot say where it stands (%s)",
                room,
                exc or "timed out",
            )
            return None

    def take(self, room: str) -> Position | None:
        """The hub opens ``room``: its position, if one was read."""
        return self.ready.pop(room, None)

    def done(self, room: str) -> None:
        """The hub call that followed :meth:`load` is over."""
        self.ready.pop(room, None)
