"""The archive in process (both backends): the SQLite archive's operations, the keeper's
group commit, retries and missing ranges, and the in-process broker continuing rooms'
sequences from it across a restart of the app."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest

from roomcast import Settings, create_app
from roomcast.archive import ArchiveUnavailable, Missing, Position
from roomcast.archive.keeper import COMMIT_MAX, Keeper, unarchived_bound
from roomcast.archive.sqlite import SqliteArchive, open_sqlite_archive
from roomcast.protocol import ChatMessage
from roomcast.settings import SettingsError
from roomcast.stored import StoredFeed, StoredMessage

from harness import open_asgi_client

pytestmark = pytest.mark.anyio

BOUND = 1000


def stored(room: str, seq: int, epoch: str = "E1", text: str | None = None) -> StoredMessage:
    message = ChatMessage(text or f"m{seq}", f"id{seq}", {"n": seq} if seq % 2 else None)
    return StoredMessage.of(room, seq, epoch, message, "ann", "u1", 1_000 + seq)


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'archive.db'}"


async def reopen(tmp_path: Path, window: int = 100) -> Any:
    return open_sqlite_archive(url(tmp_path), window=window, unarchived_bound=BOUND)


class TestSqliteArchive:
    async def test_a_clean_reopening_keeps_positions_windows_and_pages(
        self, tmp_path: Path
    ) -> None:
        with anyio.fail_after(10):
            async with await reopen(tmp_path) as archive:
                assert archive.recovery.clean
                await archive.write([stored("a", s) for s in range(1, 251)], [])
                await archive.write([stored("b", 1, "EB")], [])
                await archive.mark_clean()
            async with await reopen(tmp_path, window=100) as archive:
                assert archive.recovery.clean and archive.recovery.rooms_moved == 0
                position = await archive.position("a")
                assert (position.epoch, position.seq) == ("E1", 250)
                assert [seq for seq, _ in position.window] == list(range(151, 251))
                event = orjson.loads(position.window[-1][1])
                assert event == {
                    "type": "message",
                    "text": "m250",
                    "room": "a",
                    "seq": 250,
                    "from": "ann",
                    "user": "u1",
                    "ts": 1250,
                    "id": "id250",
                }
                assert orjson.loads(position.window[-2][1])["data"] == {"n": 249}
                assert await archive.position("nowhere") is None
                page = await archive.before("a", "E1", 101, 50)
                assert [orjson.loads(m)["seq"] for m in page.messages] == list(range(51, 101))
                assert page.more
                last = await archive.before("a", "E1", 51, 50)
                assert [orjson.loads(m)["seq"] for m in last.messages] == list(range(1, 51))
                assert not last.more

    async def test_writing_a_batch_twice_keeps_it_once(self, tmp_path: Path) -> None:
        with anyio.fail_after(10):
            async with await reopen(tmp_path) as archive:
                batch = [stored("a", s) for s in range(1, 4)]
                await archive.write(batch, [])
                await archive.write(batch, [])
                page = await archive.before("a", "E1", 100, 100)
                assert len(page.messages) == 3

    async def test_an_unclean_stop_moves_every_room_past_what_it_may_have_lost(
        self, tmp_path: Path
    ) -> None:
        with anyio.fail_after(10):
            async with await reopen(tmp_path) as archive:
                await archive.write([stored("a", s) for s in range(1, 301)], [])
            # no mark_clean: the process died
            async with await reopen(tmp_path) as archive:
                assert not archive.recovery.clean and archive.recovery.rooms_moved == 1
                position = await archive.position("a")
                assert (position.epoch, position.seq) == ("E1", 300 + BOUND)
                assert position.window == []  # the client is told history_gap
                page = await archive.before("a", "E1", 301, 10)  # what was committed stays
                assert [orjson.loads(m)["seq"] for m in page.messages] == list(range(291, 301))

    async def test_an_unclean_stop_with_unrecorded_drops_starts_a_new_epoch(
        self, tmp_path: Path
    ) -> None:
        with anyio.fail_after(10):
            async with await reopen(tmp_path) as archive:
                await archive.write([stored("a", 1)], [])
                archive.note_unrecorded()
            async with await reopen(tmp_path) as archive:
                assert archive.recovery.new_epoch
                position = await archive.position("a")
                assert position.epoch != "E1" and position.seq == 0
            async with await reopen(tmp_path) as archive:  # the flag went with the recovery
                assert not archive.recovery.new_epoch

    async def test_missing_ranges_are_recorded_and_move_the_position(self, tmp_path: Path) -> None:
        with anyio.fail_after(10):
            async with await reopen(tmp_path) as archive:
                await archive.write([stored("a", 1)], [Missing("a", "E1", 2, 40)])
                await archive.write([stored("a", 41)], [])
                assert await archive.missing("a") == [Missing("a", "E1", 2, 40)]
                position = await archive.position("a")
                assert position.seq == 41
                assert [seq for seq, _ in position.window] == [41]  # not across the hole

    async def test_forget_deletes_messages_and_late_ones_but_keeps_the_sequence(
        self, tmp_path: Path
    ) -> None:
        with anyio.fail_after(10):
            async with await reopen(tmp_path) as archive:
                await archive.write([stored("a", s) for s in range(1, 6)], [])
                await archive.forget("a", "E1", 7)
                await archive.write([stored("a", 6), stored("a", 7), stored("a", 8)], [])
                position = await archive.position("a")
                assert position.seq == 8
                assert [seq for seq, _ in position.window] == [8]
                page = await archive.before("a", "E1", 100, 100)
                assert [orjson.loads(m)["seq"] for m in page.messages] == [8]

    async def test_prune_deletes_by_age(self, tmp_path: Path) -> None:
        with anyio.fail_after(10):
            async with await reopen(tmp_path) as archive:
                await archive.write([stored("a", s) for s in range(1, 11)], [])
                assert await archive.prune(1_006) == 5  # ts 1001..1005
                page = await archive.before("a", "E1", 100, 100)
                assert [orjson.loads(m)["seq"] for m in page.messages] == list(range(6, 11))

    async def test_a_second_process_is_refused_and_the_schema_is_versioned(
        self, tmp_path: Path
    ) -> None:
        with anyio.fail_after(10):
            async with await reopen(tmp_path):
                with pytest.raises(ArchiveUnavailable, match="another roomcast process"):
                    async with await reopen(tmp_path):
                        pass
        with sqlite3.connect(tmp_path / "archive.db") as db:
            assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    async def test_a_locked_database_is_unavailable_not_stuck(self, tmp_path: Path) -> None:
        with anyio.fail_after(20):
            async with await reopen(tmp_path) as archive:
                other = sqlite3.connect(tmp_path / "archive.db", isolation_level=None)
                other.execute("BEGIN EXCLUSIVE")
                with pytest.raises(ArchiveUnavailable, match="locked"):
                    await archive.write([stored("a", 1)], [])
                other.execute("ROLLBACK")
                other.close()
                await archive.write([stored("a", 1)], [])


class FlakyArchive:
    """An archive that fails while ``down`` is set (and counts what it is given)."""

    def __init__(self, inner: SqliteArchive) -> None:
        self.inner = inner
        self.down = False
        self.unrecorded = False
        self.attempts = 0
        self.positions = 0
        self.failed_thrice = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def write(self, batch: Sequence[StoredMessage], missing: Sequence[Missing]) -> None:
        self.attempts += 1
        await anyio.lowlevel.checkpoint()
        if self.down:
            if self.attempts >= 3:
                self.failed_thrice.set()
            raise ArchiveUnavailable("disk full")
        await self.inner.write(batch, missing)

    async def position(self, room: str) -> Position | None:
        self.positions += 1
        await anyio.sleep(0.05)  # long enough for a second join to arrive meanwhile
        return await self.inner.position(room)

    def note_unrecorded(self) -> None:
        self.unrecorded = True

    def note_recorded(self) -> None:
        self.unrecorded = False


class TestKeeper:
    async def test_a_failing_archive_costs_nothing_but_what_it_records_as_missing(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        with anyio.fail_after(20):
            async with await reopen(tmp_path) as inner:
                archive = FlakyArchive(inner)
                feed = StoredFeed()
                keeper = Keeper(archive, feed, size=10)  # type: ignore[arg-type]
                async with anyio.create_task_group() as tg:
                    tg.start_soon(feed.run)
                    archive.down = True
                    for seq in range(1, 31):  # never waits, whatever the archive does
                        feed.put(stored("a", seq))
                    await archive.failed_thrice.wait()
                    assert keeper.failures >= 2 and keeper.missed > 0 and archive.unrecorded
                    assert keeper.lag > 0
                    archive.down = False
                    await keeper.caught_up()
                    feed.put(stored("a", 31))
                    await keeper.caught_up()
                    assert "a" not in keeper.unarchived
                    tg.cancel_scope.cancel()
                kept = await inner.before("a", "E1", 100, 100)
                seqs = {orjson.loads(m)["seq"] for m in kept.messages}
                gaps = await inner.missing("a")
                lost = {s for gap in gaps for s in range(gap.first, gap.last + 1)}
                assert seqs | lost == set(range(1, 32)) and not seqs & lost
                assert len(lost) == keeper.missed and not archive.unrecorded
                assert keeper.written == len(seqs)
        said = [r.message for r in caplog.records]
        assert sum("cannot store" in line for line in said) == 1, said  # once, not per retry
        assert sum("stores messages again" in line for line in said) == 1, said

    async def test_a_position_still_on_its_way_to_the_archive_wins(self, tmp_path: Path) -> None:
        with anyio.fail_after(10):
            async with await reopen(tmp_path) as archive:
                await archive.write([stored("a", 1), stored("a", 2)], [])
                feed = StoredFeed()
                keeper = Keeper(archive, feed)
                feed.put(stored("a", 3))  # queued: nobody drains it here
                assert await keeper.position("a") == Position("E1", 3, [])
                assert (await keeper.position("b")) is None

    async def test_finish_commits_what_is_queued_and_marks_the_archive_clean(
        self, tmp_path: Path
    ) -> None:
        with anyio.fail_after(10):
            async with await reopen(tmp_path) as archive:
                feed = StoredFeed()
                keeper = Keeper(archive, feed)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(feed.run)
                    feed.put(stored("a", 1))
                    await keeper.caught_up()  # the drain now waits out the commit interval
                    for seq in range(2, 6):
                        feed.put(stored("a", seq))
                    await keeper.finish()
                    tg.cancel_scope.cancel()
            async with await reopen(tmp_path) as archive:
                assert archive.recovery.clean
                position = await archive.position("a")
                assert [seq for seq, _ in position.window] == [1, 2, 3, 4, 5]

    def test_the_bound_covers_a_full_queue_and_a_batch(self) -> None:
        assert unarchived_bound(10_000) == 10_000 + COMMIT_MAX == 14_096


def archived(tmp_path: Path, **values: Any) -> Settings:
    return Settings(archive=url(tmp_path), rate_limit=0, api_key="k", **values)


async def post(client: Any, room: str, text: str) -> int:
    broker = client.runtime.broker
    return int(await broker.post(room, ChatMessage(text), "api"))


class TestMemoryBrokerAcrossRestarts:
    async def test_a_clean_restart_continues_the_room_and_resume_has_no_gap(
        self, tmp_path: Path
    ) -> None:
        with anyio.fail_after(20):
            async with open_asgi_client(create_app(archived(tmp_path))) as client:
                for n in range(1, 31):
                    assert await post(client, "lobby", f"m{n}") == n
                epoch = client.runtime.hub.rooms["lobby"].epoch
            async with open_asgi_client(create_app(archived(tmp_path))) as client:
                assert client.runtime.archive.recovery.clean
                async with client.websocket(f"/ws/chat?room=lobby&since=25&epoch={epoch}") as ws:
                    welcome = await ws.receive_json()
                    assert (welcome["epoch"], welcome["seq"]) == (epoch, 30)
                    replayed = [(await ws.receive_json()) for _ in range(5)]
                    assert [e["seq"] for e in replayed] == [26, 27, 28, 29, 30]
                    assert await post(client, "lobby", "after") == 31
                    assert (await ws.receive_until("message"))["seq"] == 31

    async def test_two_joins_of_an_unseen_room_read_its_position_once(self, tmp_path: Path) -> None:
        with anyio.fail_after(20):
            async with open_asgi_client(create_app(archived(tmp_path))) as client:
                await post(client, "lobby", "one")
                epoch = client.runtime.hub.rooms["lobby"].epoch
            app = create_app(archived(tmp_path))
            async with open_asgi_client(app) as client:
                broker = client.runtime.broker
                flaky = FlakyArchive(client.runtime.archive)  # type: ignore[arg-type]
                broker.positions.keeper.archive = flaky
                welcomes = []

                async def join(name: str) -> None:
                    async with client.websocket(f"/ws/chat?room=lobby&name={name}") as ws:
                        welcomes.append(await ws.receive_json())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(join, "a")
                    tg.start_soon(join, "b")
                assert flaky.positions == 1
                assert [(w["epoch"], w["seq"]) for w in welcomes] == [(epoch, 1)] * 2
                # nothing is held for the room beyond the joins (the hub forgets it)
                assert broker.positions.ready == {} and broker.positions._loading == {}

    async def test_delete_forgets_the_history_and_keeps_the_sequence(self, tmp_path: Path) -> None:
        with anyio.fail_after(20):
            async with open_asgi_client(create_app(archived(tmp_path))) as client:
                for n in range(1, 6):
                    await post(client, "lobby", f"m{n}")
                runtime = client.runtime
                assert runtime.keeper is not None
                await runtime.keeper.caught_up()
                epoch = runtime.hub.rooms["lobby"].epoch
                response = await delete(client, "/api/rooms/lobby/messages")
                assert response == {"room": "lobby", "epoch": epoch, "seq": 5}
                assert await post(client, "lobby", "m6") == 6
                async with client.websocket(f"/ws/chat?room=lobby&since=2&epoch={epoch}") as ws:
                    await ws.receive_json()  # welcome
                    gap = await ws.receive_json()
                    assert (gap["error"], gap["first"]) == ("history_gap", 6)
                assert runtime.archive is not None
                await runtime.keeper.caught_up()
                page = await runtime.archive.before("lobby", epoch, 100, 100)
                assert [orjson.loads(m)["seq"] for m in page.messages] == [6]


async def delete(client: Any, path: str) -> Any:
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "DELETE",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"authorization", b"Bearer k")],
        "state": dict(client.state),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await client.app(scope, receive, send)
    assert sent[0]["status"] == 200, sent
    return orjson.loads(b"".join(m.get("body", b"") for m in sent[1:]))


class TestSettings:
    def test_the_default_is_sqlite_on_the_memory_broker_and_off_with_redis(self) -> None:
        assert Settings.from_env({}).archive_url == "sqlite:///roomcast.db"
        assert Settings().archive_url == "off"  # built in code: none unless asked
        redis = {"ROOMCAST_REDIS_URL": "redis://localhost"}
        assert Settings.from_env(redis).archive_url == "off"
        chosen = Settings.from_env(
            {"ROOMCAST_ARCHIVE": "sqlite:///x.db", "ROOMCAST_ARCHIVE_DAYS": "30"}
        )
        assert (chosen.archive_url, chosen.archive_days) == ("sqlite:///x.db", 30.0)
        with pytest.raises(SettingsError, match="ROOMCAST_ARCHIVE"):
            Settings.from_env({"ROOMCAST_ARCHIVE": "mysql://nope"})

    def test_several_workers_with_a_sqlite_archive_are_refused_in_one_line(
        self, tmp_path: Path
    ) -> None:
        env = {
            **os.environ,
            "ROOMCAST_REDIS_URL": "redis://127.0.0.1:1",
            "ROOMCAST_ARCHIVE": url(tmp_path),
        }
        done = subprocess.run(
            [sys.executable, "-m", "roomcast", "--workers", "2", "--bind", "127.0.0.1:0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        (line,) = done.stderr.strip().splitlines()
        assert "a SQLite archive serves one process" in line
