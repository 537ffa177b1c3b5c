"""The hub under random sequences of joins, leaves, publishes, stalls and drains.

A hypothesis ``RuleBasedStateMachine`` drives one synchronous :class:`Hub` with tiny limits
(outbox 2-5 events, history 0-5 messages, capacity 0/2/3/4, 0-2 idle rooms, 3 room names), so
that evictions, refusals, history gaps and forgotten rooms happen in most runs. Members whose
sender "keeps up" are drained after every step, as their sender task would; stalled ones are
not, until a ``drain`` step. A small model tracks what the hub must hold (rooms, members in
join order, ``seq``, retained history, idle rooms in least-recently-emptied order) and what each
member must read (SPEC §4.2, §4.3, §7):

* one order per room: every member's ``message`` events run ``seq`` +1 with no gap and no
  duplicate from the seq after its welcome (or its resume point) for as long as it is joined,
  each with the text, sender and id that were published under that seq;
* resume: retained messages after ``since``, then live ones, or ``history_gap`` first when
  messages after ``since`` were discarded or the epoch is not the room's (its ``first`` is
  where the replay starts);
* a member removed from its room (left, evicted, shut down) got everything up to that moment,
  then its outbox ends (``EndOfStream``); an evicted one got ``TOO_SLOW``, and only when its
  outbox was full; one whose sender stopped reading is dropped by the next fan-out, quietly;
* presence: ``welcome.count``/``members`` match the room when it joins; joins and leaves are
  only recorded (nobody's outbox changes) until a ``flush_presence`` step, which hands each
  member whose view is out of date one notice with the changes since the room's last notice
  and the room's count and names then; the notice waits in the member's slot (a newer one
  replaces it), takes at most the one outbox slot of a wake-up and only when the outbox was
  empty, and never evicts; a member that keeps up and has no change pending ends each step
  with the room's count;
* an ``ack`` exactly when the sender is still joined after its message's fan-out;
* hub bookkeeping: ``rooms`` holds exactly the rooms with members or retained history, idle ones
  bounded by ``idle_rooms`` (least recently emptied forgotten first; a forgotten room comes back
  with a new epoch and seq 0); ``stats`` joins/leaves/evictions/messages_in; no open outbox
  outlives its membership, and after everyone leaves no room has members.
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from roomcast.hub import PRESENCE_WAKE, Hub, Member, NameTaken, RoomFull
from roomcast.protocol import MAX_PRESENCE_NAMES, MAX_WELCOME_MEMBERS, ChatMessage, CloseCode

ROOMS = ("a", "b", "c")
_PENDING_ORDER = itertools.count(1)
NAMES = (None, "ann", "bob", "cy")
PICK = st.integers(0, 1000)  # index into a pool of members, modulo its size

#: what happened across one run of the state machine (all examples), for the coverage check
SEEN: Counter[str] = Counter()


def _event(what: str) -> None:
    event(what)
    SEEN[what] += 1


@dataclass(eq=False)
class Tracked:
    """One member as the model sees it."""

    key: str
    member: Member
    room: str
    name: str | None
    epoch: str  # the room's epoch when it joined
    welcome: dict[str, Any]  # the exact welcome it must read first
    gap: dict[str, Any] | None  # the history_gap error it must read next, if any
    next_seq: int  # the next message seq it must read
    count: int = 0  # presence count as its events tell it
    welcomed: bool = False
    stalled: bool = False  # its sender stopped draining (for now)
    gone: bool = False  # its sender stopped reading for good (receive side closed)
    removed: bool = False  # no longer a member of the room (as the model predicts)
    removed_code: CloseCode | None = None
    last_seq_range: tuple[int, int] = (0, 0)  # the last seq it may have got before removal
    finished: bool = False  # read to the end of its outbox (or gone)
    acks: dict[str, int] = field(default_factory=dict)  # id -> seq it must be acked with
    outbox_events: int = 0  # events read from the outbox (the greeting is not counted)
    stale: bool = False  # its room changed after its welcome or its last notice
    slot: dict[str, Any] | None = None  # the presence notice waiting for its sender
    wake_queued: bool = False  # a presence wake-up is in its outbox


@dataclass(eq=False)
class ModelRoom:
    epoch: str
    history: deque[int]
    seq: int = 0
    members: list[Tracked] = field(default_factory=list)
    #: joins and leaves since the room's last notice, as the hub records them
    changes: list[tuple[str, str | None]] = field(default_factory=list)
    #: when ``changes`` started: the hub flushes rooms in that order (which decides which
    #: of two rooms emptied by one flush was emptied last)
    pending_since: int = 0

    def record(self, event: str, name: str | None) -> None:
        """A join or leave the hub records (it does when others are there to tell)."""
        if not self.changes:
            self.pending_since = next(_PENDING_ORDER)
        self.changes.append((event, name))
        for t in self.members:
            t.stale = True

    def notice(self, room: str) -> dict[str, Any]:
        """The notice the hub must send for ``changes``, with the room as it is now."""
        joined = [n for e, n in self.changes if e == "join"]
        left = [n for e, n in self.changes if e == "leave"]
        joins, leaves = len(joined), len(left)
        event = "presence" if joins and leaves else "join" if joins else "leave"
        single = self.changes[0][1] if len(self.changes) == 1 else None
        return {
            "type": "system",
            "room": room,
            "event": event,
            "name": single,
            "user": None,
            "count": len(self.members),
            "joined": [n for n in joined if n is not None][:MAX_PRESENCE_NAMES],
            "left": [n for n in left if n is not None][:MAX_PRESENCE_NAMES],
            "joins": joins,
            "leaves": leaves,
            "members": [t.name for t in self.members if t.name is not None][:MAX_WELCOME_MEMBERS],
            "people": [{"user": None, "name": t.name} for t in self.members if t.name is not None][
                :MAX_WELCOME_MEMBERS
            ],
        }


def pick(pool: list[Tracked], i: int) -> Tracked | None:
    """The ``i``-th member of ``pool`` (modulo its size); ``None`` makes the step a no-op
    (rules have no preconditions: with most of them disabled early on, hypothesis would give
    up on many examples)."""
    return pool[i % len(pool)] if pool else None


class HubMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.everyone: list[Tracked] = []
        self.rooms: dict[str, ModelRoom] = {}
        self.idle: OrderedDict[str, None] = OrderedDict()
        self.epochs: dict[str, set[str]] = {name: set() for name in ROOMS}
        #: (epoch, seq) -> (text, from, id) of every message ever published
        self.messages: dict[tuple[str, int], tuple[str, str | None, str | None]] = {}
        self.resume_points: deque[tuple[str, int, str]] = deque(maxlen=12)
        self.joins = self.leaves = self.evictions = self.messages_in = 0
        self.presence_notices = 0
        self.ids = 0
        self.steps = 0
        self.closed_all = False

    # -- setup ------------------------------------------------------------------------------

    @initialize(
        outbox_size=st.integers(2, 5),
        history_size=st.integers(0, 5),
        room_capacity=st.sampled_from([0, 2, 3, 4]),
        idle_rooms=st.integers(0, 2),
        first=st.lists(st.tuples(st.sampled_from(ROOMS), st.sampled_from(NAMES)), max_size=6),
    )
    def start(
        self,
        outbox_size: int,
        history_size: int,
        room_capacity: int,
        idle_rooms: int,
        first: list[tuple[str, str | None]],
    ) -> None:
        self.hub = Hub(
            outbox_size=outbox_size,
            history_size=history_size,
            room_capacity=room_capacity,
            idle_rooms=idle_rooms,
        )
        # a few members from the start: hypothesis's swarm testing disables a random subset
        # of rules per example, and without members most rules would be no-ops
        for room, name in first:
            self.join(room, name, None)

    # -- pools ------------------------------------------------------------------------------

    def joined(self) -> list[Tracked]:
        return [t for t in self.everyone if not t.removed]

    def readable(self) -> list[Tracked]:
        return [t for t in self.everyone if not t.finished and not t.gone]

    def removed(self) -> list[Tracked]:
        return [t for t in self.everyone if t.removed]

    # -- rules ------------------------------------------------------------------------------

    @rule(
        room=st.sampled_from(ROOMS),
        name=st.sampled_from(NAMES),
        resume=st.none()
        | PICK
        | st.tuples(st.integers(0, 12), st.sampled_from([None, "not-the-epoch"])),
    )
    def join(
        self, room: str, name: str | None, resume: int | tuple[int, str | None] | None
    ) -> None:
        """A new member; names are made unique (:meth:`impersonate` tries taken ones)."""
        unique = None if name is None else f"{name}{len(self.everyone)}"
        self.enter(room, unique, resume)

    def enter(
        self,
        room: str,
        name: str | None,
        resume: int | tuple[int, str | None] | None,
        *,
        taken: bool = False,
    ) -> None:
        since: int | None = None
        epoch: str | None = None
        if isinstance(resume, int) and self.resume_points:
            room, since, epoch = self.resume_points[resume % len(self.resume_points)]
            if resume % 5 == 0:
                epoch = None  # a client that kept its seq but not the epoch
        elif isinstance(resume, tuple):
            since, epoch = resume
        mr = self.rooms.get(room)
        cap = self.hub.room_capacity
        full = mr is not None and cap > 0 and len(mr.members) >= cap
        taken = taken or (mr is not None and any(t.name == name for t in mr.members if name))
        try:
            member = self.hub.join(room, name, since=since, epoch=epoch)
        except RoomFull:
            assert full, f"RoomFull with {len(mr.members) if mr else 0} members, capacity {cap}"
            _event("join refused: room full")
            self.settle([room], {})
            return
        except NameTaken:
            assert taken and not full, f"NameTaken for {name!r} in {room}"
            _event("join refused: name taken")
            self.settle([room], {})
            return
        assert not full, "a join beyond the room capacity was accepted"
        assert not taken, f"a second member named {name!r} was accepted in {room}"

        if mr is None:  # a new room, or one the hub has forgotten: a new run of its seq
            hub_room = self.hub.rooms[room]
            assert hub_room.seq == 0 and not hub_room.history
            assert hub_room.epoch not in self.epochs[room], "a re-created room reused an epoch"
            if self.epochs[room]:
                _event("room re-created with a new epoch")
            self.epochs[room].add(hub_room.epoch)
            mr = self.rooms[room] = ModelRoom(hub_room.epoch, deque(maxlen=self.hub.history_size))
        self.idle.pop(room, None)

        present = [t.name for t in mr.members if t.name is not None]
        if name is not None:
            present.append(name)
        welcome = {
            "type": "welcome",
            "room": room,
            "epoch": mr.epoch,
            "seq": mr.seq,
            "members": present,
            "people": [{"user": None, "name": n} for n in present],
            "count": len(mr.members) + 1,
            "limits": {"text": self.hub.max_text},
        }
        gap: dict[str, Any] | None = None
        next_seq = mr.seq + 1
        if since is not None:
            same_run = epoch in (None, mr.epoch) and since <= mr.seq
            first_kept = mr.history[0] if mr.history else mr.seq + 1
            if not same_run or first_kept > since + 1:
                gap = {"type": "error", "error": "history_gap", "epoch": mr.epoch}
                gap |= {"since": since, "first": first_kept}  # where the replay starts
                next_seq = first_kept
                _event(
                    "resume: history_gap (other epoch)"
                    if epoch not in (None, mr.epoch)
                    else "resume: history_gap (messages discarded)"
                )
            else:
                next_seq = since + 1
                _event("resume: replay" if since < mr.seq else "resume: up to date")
        t = Tracked(f"m{len(self.everyone)}", member, room, name, mr.epoch, welcome, gap, next_seq)
        self.everyone.append(t)
        if mr.members:
            mr.record("join", name)
        mr.members.append(t)
        self.joins += 1
        self.settle([], {})  # nothing is sent: nobody can be removed

    @rule(
        i=PICK, texts=st.lists(st.text(max_size=5), min_size=1, max_size=3), with_id=st.booleans()
    )
    def publish(self, i: int, texts: list[str], with_id: bool) -> None:
        """One member sends 1-3 messages back to back (nobody drains in between)."""
        t = pick(self.joined(), i)
        if t is None:
            return
        for text in texts:
            msg_id = None
            if with_id:
                self.ids += 1
                msg_id = f"id{self.ids}"
            was_joined = not t.removed
            mr = self.rooms.get(t.room) if was_joined else None
            before = mr.seq if mr else 0
            seq = self.hub.publish(t.member, ChatMessage(text, msg_id))
            if not was_joined:
                assert seq is None, "a removed member's message was published"
                continue
            assert mr is not None
            assert seq == before + 1
            mr.seq = seq
            if self.hub.history_size:
                mr.history.append(seq)
            self.messages[(mr.epoch, seq)] = (text, t.name, msg_id)
            self.messages_in += 1
            self.observe([t.room], {t.room: before}, fanned_out={t.room})
            if msg_id is not None and not t.removed:
                t.acks[msg_id] = seq
        self.drain_healthy()

    @rule(i=PICK)
    def leave(self, i: int) -> None:
        t = pick(self.joined(), i)
        if t is None:
            return
        mr = self.rooms[t.room]
        self.hub.leave(t.member)
        assert not t.member.joined and t.member.close_code is None
        self.mark_removed(t, None, (mr.seq, mr.seq))
        mr.members.remove(t)
        if mr.members:
            mr.record("leave", t.name)
        else:
            self.room_emptied(t.room)
        self.leaves += 1
        self.settle([], {})  # nothing is sent: nobody else can be removed

    @rule(i=PICK, text=st.text(max_size=3))
    def stray(self, i: int, text: str) -> None:
        """A member that is no longer in its room leaves again and speaks: nothing happens."""
        t = pick(self.removed(), i)
        if t is None:
            return
        queued = {u.key: u.member.queued for u in self.everyone}
        self.hub.leave(t.member)
        assert self.hub.publish(t.member, ChatMessage(text, "stray")) is None
        assert {u.key: u.member.queued for u in self.everyone} == queued
        self.settle([], {})

    @rule(i=PICK)
    def stall(self, i: int) -> None:
        t = pick([t for t in self.readable() if not t.stalled], i)
        if t is None:
            return
        t.stalled = True
        self.settle([], {})

    @rule(i=PICK)
    def drain(self, i: int) -> None:
        t = pick([t for t in self.readable() if t.stalled], i)
        if t is None:
            return
        t.stalled = False
        if t.removed:
            _event("drained after removal")
        self.settle([], {})

    @rule(i=PICK)
    def sender_stops(self, i: int) -> None:
        """The sender task ends (e.g. cancelled) a moment before the member leaves."""
        t = pick([t for t in self.joined() if not t.gone], i)
        if t is None:
            return
        t.member.outbox.close()
        t.gone = True
        self.settle([], {})

    @rule()
    def flush_presence(self) -> None:
        """What the presence flusher does once per interval."""
        flushed = []
        handed = 0
        woke = set()
        pending = sorted(self.rooms.items(), key=lambda item: item[1].pending_since)
        for name, mr in pending:
            if not mr.changes:
                continue
            flushed.append(name)
            notice = mr.notice(name)
            mr.changes = []
            for t in mr.members:
                if not t.stale:
                    continue
                t.stale = False
                if t.slot is None and t.member.queued == 0:
                    if t.gone:
                        _event("presence: wake-up found the sender gone")
                        continue  # dropped, like a fan-out drops it
                    t.wake_queued = True
                    woke.add(t.key)
                    _event("presence: woke an idle sender")
                elif t.slot is not None:
                    _event("presence: an unsent notice replaced")
                else:
                    _event("presence: waits for a busy outbox")
                t.slot = notice
                handed += 1
        if flushed:
            _event("presence flushed")
        queued_before = {t.key: t.member.queued for t in self.everyone}
        assert self.hub.flush_presence() == handed
        self.presence_notices += handed
        for t in self.everyone:  # a wake-up or nothing: presence never queues more
            woken = t.wake_queued and t.key in woke
            assert t.member.queued == queued_before[t.key] + woken, t.key
        self.settle(flushed, {}, presence=True)

    @rule(i=st.integers(0, 1000), upper=st.booleans())
    def impersonate(self, i: int, upper: bool) -> None:
        """Someone joins under a member's name (or the same name in capitals): refused."""
        named = [t for t in self.joined() if t.name is not None]
        if not named:
            return
        target = named[i % len(named)]
        assert target.name is not None
        self.enter(target.room, target.name.upper() if upper else target.name, None, taken=True)

    @rule(room=st.sampled_from(ROOMS))
    def visit(self, room: str) -> None:
        """Someone comes, says hello and goes, with a notice each time: members that do not
        read in between have their unsent notice replaced, or find it waiting behind the
        hello."""
        self.join(room, "cy", None)
        visitor = self.everyone[-1]
        if visitor.room == room and not visitor.removed:
            # a hello first: members that stalled have something queued when the notice comes
            self.publish(self.joined().index(visitor), ["hello"], with_id=False)
        self.flush_presence()
        if visitor.room == room and not visitor.removed:
            self.leave(self.joined().index(visitor))
            self.flush_presence()

    @rule()
    def close_all(self) -> None:
        """Shutdown, at most once per run and late in it; the hub stays usable afterwards."""
        if self.closed_all or self.steps < 20 or not self.joined():
            return
        self.closed_all = True
        order = [name for name, r in self.hub.rooms.items() if r.members]
        seqs = {name: self.rooms[name].seq for name in order}
        self.hub.close_all(CloseCode.GOING_AWAY, "bye")
        _event("close_all")
        self.settle(order, seqs, closing=True)

    # -- observing a step -------------------------------------------------------------------

    def settle(
        self,
        rooms: list[str],
        seq_before: dict[str, int],
        *,
        fanned_out: Collection[str] = (),
        closing: bool = False,
        presence: bool = False,
    ) -> None:
        self.observe(rooms, seq_before, fanned_out=fanned_out, closing=closing, presence=presence)
        self.drain_healthy()

    def mark_removed(self, t: Tracked, code: CloseCode | None, seq_range: tuple[int, int]) -> None:
        t.removed, t.removed_code, t.last_seq_range = True, code, seq_range
        if t.gone:
            t.finished = True

    def observe(
        self,
        rooms: list[str],
        seq_before: dict[str, int],
        *,
        fanned_out: Collection[str] = (),
        closing: bool = False,
        presence: bool = False,
    ) -> None:
        """Account for the members the hub removed during the step, in ``rooms`` only (and
        the leaves it recorded for them)."""
        self.steps += 1
        # the rooms of the step first, in its order: rooms it empties go idle in that order
        order = [name for name in rooms if name in self.rooms]
        order += [name for name in self.rooms if name not in rooms]
        for name in order:
            if (mr := self.rooms.get(name)) is None:
                continue  # forgotten as another room of this step went idle
            gone_now = [t for t in mr.members if not t.member.joined]
            if name not in rooms:
                assert not gone_now, f"a step in {rooms} removed members of room {name}"
                continue
            evicted = 0
            for t in gone_now:
                code = t.member.close_code
                if closing:
                    assert code is CloseCode.GOING_AWAY
                elif code is CloseCode.TOO_SLOW:
                    assert not presence, f"{t.key} evicted by a presence notice"
                    assert not t.gone, "a member whose sender stopped was evicted as too slow"
                    assert t.member.queued == self.hub.outbox_size, (
                        f"{t.key} evicted with {t.member.queued}/{self.hub.outbox_size} queued"
                    )
                    evicted += 1
                    if not t.stalled:
                        _event("eviction of a member that keeps up (burst)")
                else:
                    assert code is None and t.gone, f"{t.key} removed with {code!r}"
                    _event("sender stopped: dropped quietly by fan-out")
                self.mark_removed(t, code, (seq_before.get(name, mr.seq), mr.seq))
                mr.members.remove(t)
                if mr.members and not closing:
                    mr.record("leave", t.name)
            self.leaves += len(gone_now)
            self.evictions += evicted
            if evicted:
                _event("eviction: too slow")
            if evicted > 1:
                _event("several evictions in one step (cascade)")
            if not presence and (name in fanned_out or gone_now):
                stuck = [t.key for t in mr.members if t.gone]
                assert not stuck, f"fan-out in {name} kept members whose sender stopped: {stuck}"
            if gone_now and not mr.members:
                self.room_emptied(name)

    def room_emptied(self, name: str) -> None:
        mr = self.rooms[name]
        if not mr.history or not self.hub.idle_rooms:
            del self.rooms[name]
            _event("empty room forgotten (no history or idle_rooms=0)")
            return
        self.idle[name] = None
        while len(self.idle) > self.hub.idle_rooms:
            oldest, _ = self.idle.popitem(last=False)
            del self.rooms[oldest]
            _event("idle room forgotten (idle_rooms bound)")

    # -- reading outboxes -------------------------------------------------------------------

    def drain_healthy(self) -> None:
        for t in self.readable():
            if not t.stalled:
                self.read(t)

    def read(self, t: Tracked) -> None:
        """Read what a sender task would: the greeting, then the outbox until it blocks/ends."""
        greeting, t.member.greeting = t.member.greeting, []
        for raw in greeting:
            self.check(t, orjson.loads(raw))
        while True:
            try:
                raw = t.member.outbox.receive_nowait()
            except anyio.WouldBlock:
                assert not t.removed, f"{t.key} was removed but its outbox is still open"
                self.check_presence(t, t.member.take_presence())
                break
            except anyio.EndOfStream:
                assert t.removed, f"{t.key}'s outbox ended while it is a member"
                t.finished = True
                break
            if raw is PRESENCE_WAKE:
                assert t.wake_queued, f"{t.key}: a presence wake-up it was not sent"
                t.wake_queued = False
                self.check_presence(t, t.member.take_presence())
                continue
            t.outbox_events += 1
            self.check(t, orjson.loads(raw))
        assert t.welcomed and t.gap is None
        assert not t.acks, f"{t.key} missing acks {t.acks}"
        last = t.next_seq - 1
        if t.finished:
            lo, hi = t.last_seq_range
            assert lo <= last <= hi, f"{t.key} got up to seq {last}, removed at {lo}..{hi}"
        else:
            mr = self.rooms[t.room]
            assert last == mr.seq, f"{t.key} got up to seq {last} of {mr.seq}"
            assert t.slot is None, f"{t.key} did not get its presence notice"
            if not t.stale:
                assert t.count == len(mr.members), (
                    f"{t.key} counts {t.count}, room has {len(mr.members)}"
                )
        point = (t.room, last, t.epoch)
        if not self.resume_points or self.resume_points[-1] != point:
            self.resume_points.append(point)

    def check(self, t: Tracked, ev: dict[str, Any]) -> None:
        if not t.welcomed:
            assert ev == t.welcome, f"{t.key}: {ev} != {t.welcome}"
            t.welcomed, t.count = True, ev["count"]
            return
        if t.gap is not None:
            got = {k: ev.get(k) for k in t.gap}
            assert got == t.gap, f"{t.key}: expected {t.gap}, got {ev}"
            t.gap = None
            return
        kind = ev["type"]
        if kind == "message":
            assert ev["room"] == t.room
            assert ev["seq"] == t.next_seq, f"{t.key}: seq {ev['seq']}, expected {t.next_seq}"
            text, sender, msg_id = self.messages[(t.epoch, ev["seq"])]
            assert (ev["text"], ev["from"], ev.get("id")) == (text, sender, msg_id)
            t.next_seq += 1
        elif kind == "ack":
            assert ev["id"] in t.acks, f"{t.key}: unexpected {ev}"
            assert t.acks.pop(ev["id"]) == ev["seq"] < t.next_seq, f"{t.key}: {ev} too early"
        else:
            raise AssertionError(f"{t.key}: unexpected event {ev}")

    def check_presence(self, t: Tracked, notice: str | None) -> None:
        """A notice its sender took from the slot: the latest the model handed it."""
        if notice is None:
            return
        ev = orjson.loads(notice)
        assert t.slot is not None, f"{t.key}: unexpected presence notice {ev}"
        assert ev.pop("message").endswith(f"#{t.room}")
        assert ev == t.slot, f"{t.key}: {ev} != {t.slot}"
        t.slot = None
        t.count = ev["count"]

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def hub_matches_model(self) -> None:
        hub = self.hub
        assert sorted(hub.rooms) == sorted(self.rooms)
        for name, mr in self.rooms.items():
            room = hub.rooms[name]
            assert (room.epoch, room.seq) == (mr.epoch, mr.seq)
            assert [seq for seq, _ in room.history.entries] == list(mr.history)
            assert list(room.members) == [t.member for t in mr.members]
            assert room.members or room.history, f"room {name} kept with nothing in it"
        idle = [name for name, room in hub.rooms.items() if not room.members]
        assert sorted(idle) == sorted(self.idle)
        assert len(idle) <= hub.idle_rooms

    @invariant()
    def membership_and_stats(self) -> None:
        hub, stats = self.hub, self.hub.stats
        joined = self.joined()
        assert sum(len(room.members) for room in hub.rooms.values()) == len(joined)
        assert stats.joins - stats.leaves == len(joined)
        assert (stats.joins, stats.leaves) == (self.joins, self.leaves)
        assert (stats.evictions, stats.messages_in) == (self.evictions, self.messages_in)
        assert stats.presence_notices == self.presence_notices
        for t in self.everyone:
            assert t.member.joined is not t.removed
            assert t.member.outbox.statistics().open_send_streams == (0 if t.removed else 1)
            assert t.member.queued <= hub.outbox_size
        # every event the hub queued (roomcast_messages_out) is counted, exactly once;
        # presence wake-ups are not events
        queued = sum(t.outbox_events + t.member.queued - t.wake_queued for t in self.everyone)
        assert stats.deliveries == queued, f"stats.deliveries {stats.deliveries}, queued {queued}"

    def teardown(self) -> None:
        if not hasattr(self, "hub"):
            return
        for t in self.joined():
            if not t.removed:  # an earlier leave may have evicted it
                self.leave(self.joined().index(t))
        for t in self.readable():
            t.stalled = False
        self.drain_healthy()
        assert all(t.finished for t in self.everyone)
        assert self.hub.stats.joins == self.hub.stats.leaves == len(self.everyone)
        for name, room in self.hub.rooms.items():
            assert not room.members, f"room {name} still has members"
            assert room.history, f"empty room {name} without history kept"
        for t in self.everyone:
            assert t.member.outbox.statistics().open_send_streams == 0
            assert not t.member.joined


SETTINGS = settings(max_examples=300, stateful_step_count=50, deadline=None)


def test_hub_state_machine() -> None:
    SEEN.clear()
    run_state_machine_as_test(HubMachine, settings=SETTINGS)
    # the run exercised what it is meant to (each is common: dozens to thousands per run)
    for what in (
        "eviction: too slow",
        "join refused: room full",
        "resume: replay",
        "resume: history_gap (messages discarded)",
        "resume: history_gap (other epoch)",
        "idle room forgotten (idle_rooms bound)",
        "room re-created with a new epoch",
        "sender stopped: dropped quietly by fan-out",
        "close_all",
        "presence flushed",
        "presence: woke an idle sender",
        "presence: an unsent notice replaced",
        "presence: waits for a busy outbox",
        "presence: wake-up found the sender gone",
    ):
        assert SEEN[what] > 0, f"never happened in {SETTINGS.max_examples} examples: {what}"
    print(dict(SEEN))


# let the hypothesis pytest plugin collect this run's statistics (--hypothesis-show-statistics)
# as it does for a state machine's own TestCase.runTest
test_hub_state_machine.is_hypothesis_test = True  # type: ignore[attr-defined]


def test_presence_notices_are_counted_apart_from_deliveries() -> None:
    """``roomcast_messages_out`` counts events queued to outboxes; presence notices wait in
    the members' slots and are counted in ``roomcast_presence_notices`` instead."""
    hub = Hub()
    stays = hub.join("r")
    goes = hub.join("r")
    hub.leave(goes)
    assert hub.flush_presence() == 1
    assert (stays.queued, hub.stats.deliveries, hub.stats.presence_notices) == (1, 0, 1)
    assert stays.take_presence() is not None
