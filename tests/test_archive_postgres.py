"""The PostgreSQL archive in process (both backends): the archive contract of
tests/test_archive.py run against PostgreSQL, what differs (the sequencer's lock and its
recovery, a lock held elsewhere, servers sharing one database, a server that restarts),
and the in-process broker continuing a room across a restart on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import orjson
import psycopg
import pytest

import roomcast.archive.postgres as postgres
from roomcast import Settings, create_app
from roomcast.archive import ArchiveUnavailable, Missing, open_archive
from roomcast.archive.postgres import PostgresArchive, open_postgres_archive, redacted

import test_archive
from harness import open_asgi_client
from postgres_server import run_postgres
from test_archive import post, stored

pytestmark = pytest.mark.anyio


def archive_at(url: str, window: int = 100, *, sequencer: bool = True) -> Any:
    return open_postgres_archive(url, window=window, sequencer=sequencer)


def seqs(messages: list[str]) -> list[int]:
    return [orjson.loads(m)["seq"] for m in messages]


class TestPostgresArchive(test_archive.TestSqliteArchive):
    """Every test of the SQLite archive that speaks only the interface, on PostgreSQL (as
    the in-process broker's sequencer, the role SQLite has); the SQLite-only ones are
    replaced below."""

    @pytest.fixture(autouse=True)
    def on_postgres(self, monkeypatch: pytest.MonkeyPatch, postgres_url: str) -> None:
        async def reopen(tmp_path: Path, window: int = 100) -> Any:
            return archive_at(postgres_url, window)

        monkeypatch.setattr(test_archive, "reopen", reopen)

    # SQLite tells a crash with recorded drops from one without; PostgreSQL cannot
    test_an_unclean_stop_moves_every_room_past_what_it_may_have_lost = None  # type: ignore[assignment]
    test_an_unclean_stop_with_unrecorded_drops_starts_a_new_epoch = None  # type: ignore[assignment]
    # the file's lock and journal mode, a file locked by another connection
    test_a_second_process_is_refused_and_the_schema_is_versioned = None  # type: ignore[assignment]
    test_a_locked_database_is_unavailable_not_stuck = None  # type: ignore[assignment]

    async def test_an_unclean_stop_starts_every_room_a_new_epoch(self, postgres_url: str) -> None:
        with anyio.fail_after(20):
            async with archive_at(postgres_url) as archive:
                await archive.write([stored("a", s) for s in range(1, 301)], [])
            # no mark_clean: the process died
            async with archive_at(postgres_url) as archive:
                recovery = archive.recovery
                assert not recovery.clean and recovery.new_epoch and recovery.rooms_moved == 1
                position = await archive.position("a")
                assert position.epoch != "E1" and position.seq == 0 and position.window == []
                page = await archive.before("a", "E1", 301, 10)  # what was committed stays
                assert seqs(page.messages) == list(range(291, 301))
                await archive.mark_clean()
            async with archive_at(postgres_url) as archive:
                assert archive.recovery.clean

    async def test_a_second_sequencer_is_refused_and_the_schema_is_versioned(
        self, postgres_url: str
    ) -> None:
        with anyio.fail_after(20):
            async with archive_at(postgres_url):
                with pytest.raises(ArchiveUnavailable, match="in use by another roomcast"):
                    async with archive_at(postgres_url):
                        pass
                # with Redis, any number of servers share it
                async with archive_at(postgres_url, sequencer=False) as shared:
                    await shared.write([stored("a", 1)], [])
            async with archive_at(postgres_url):  # the lock went with the first
                pass
        with psycopg.connect(postgres_url) as db:
            assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]

    async def test_a_lock_held_elsewhere_is_unavailable_not_stuck(
        self, postgres_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(postgres, "STATEMENT_TIMEOUT_MS", 300)
        with anyio.fail_after(20):
            async with archive_at(postgres_url) as archive:
                with psycopg.connect(postgres_url) as other:
                    other.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
                    with pytest.raises(ArchiveUnavailable, match="statement timeout"):
                        await archive.write([stored("a", 1)], [])
                    other.rollback()
                await archive.write([stored("a", 1)], [])
                assert seqs((await archive.before("a", "E1", 100, 10)).messages) == [1]


class TestSharedByServers:
    async def test_servers_writing_one_room_at_once_keep_every_seq_once(
        self, postgres_url: str
    ) -> None:
        """Four servers' keepers (Redis: sequences interleaved among them), each batch
        written twice, rooms in opposite orders: no seq twice, none lost, no deadlock."""
        rooms = ["a", "b", "c"]
        with anyio.fail_after(60):
            async with (
                archive_at(postgres_url, sequencer=False) as first,
                archive_at(postgres_url, sequencer=False) as second,
                archive_at(postgres_url, sequencer=False) as third,
                archive_at(postgres_url, sequencer=False) as fourth,
            ):
                servers = [first, second, third, fourth]

                async def keep(index: int) -> None:
                    order = rooms if index % 2 else rooms[::-1]
                    for start in range(1, 401, 20):
                        batch = [
                            stored(room, seq)
                            for room in order
                            for seq in range(start, start + 20)
                            if seq % 4 == index
                        ]
                        await servers[index].write(batch, [])
                        await servers[index].write(batch, [])  # a retried batch

                async with anyio.create_task_group() as tg:
                    for index in range(4):
                        tg.start_soon(keep, index)
                for room in rooms:
                    page = await first.before(room, "E1", 401, 200)
                    older = await first.before(room, "E1", 201, 200)
                    assert seqs(older.messages) + seqs(page.messages) == list(range(1, 401))
                    assert not older.more
        with psycopg.connect(postgres_url) as db:
            assert db.execute("SELECT count(*) FROM messages").fetchone() == (1200,)
            assert db.execute("SELECT room, seq FROM rooms ORDER BY room").fetchall() == [
                ("a", 400),
                ("b", 400),
                ("c", 400),
            ]

    async def test_data_and_missing_ranges_round_trip(self, postgres_url: str) -> None:
        with anyio.fail_after(20):
            async with archive_at(postgres_url, sequencer=False) as archive:
                message = stored("a", 1, text="ünïcode ✓ 'quotes' \"and\" \\ backslash")
                await archive.write([message], [Missing("a", "E1", 2, 9)])
                (event,) = (await archive.before("a", "E1", 10, 10)).messages
                assert orjson.loads(event)["text"] == message.text
                assert orjson.loads(event)["data"] == {"n": 1}
                assert await archive.missing("a") == [Missing("a", "E1", 2, 9)]


class TestRestarts:
    async def test_a_stopped_server_is_unavailable_and_the_next_call_reconnects(self) -> None:
        with run_postgres() as server, anyio.fail_after(60):
            url = server.database()
            async with archive_at(url) as archive:
                await archive.write([stored("a", 1)], [])
                await anyio.to_thread.run_sync(server.stop)
                with pytest.raises(ArchiveUnavailable):
                    await archive.write([stored("a", 2)], [])
                with pytest.raises(ArchiveUnavailable, match="connection"):
                    await archive.write([stored("a", 2)], [])
                await anyio.to_thread.run_sync(server.start)
                await archive.write([stored("a", 2)], [])
                assert seqs((await archive.before("a", "E1", 10, 10)).messages) == [1, 2]

    async def test_an_unreachable_or_wrong_url_fails_in_one_line_without_the_password(
        self,
    ) -> None:
        from redis_server import free_port

        nowhere = f"postgresql://ann:s3cret@127.0.0.1:{free_port()}/chat"
        settings = Settings(archive=nowhere)
        with anyio.fail_after(20):
            with pytest.raises(ArchiveUnavailable) as refused:
                async with open_archive(settings):
                    pass
            message = str(refused.value)
            assert "\n" not in message and "s3cret" not in message
            assert message.startswith(f"cannot open {redacted(nowhere)}: ")
            assert "Connection refused" in message
            with pytest.raises(ArchiveUnavailable) as wrong:
                async with open_archive(Settings(archive="postgresql://host:port:what/db")):
                    pass
            assert "\n" not in str(wrong.value)


def test_a_server_whose_postgres_is_unreachable_fails_to_start_in_one_line() -> None:
    from redis_server import free_port

    env = {**os.environ, "ROOMCAST_ARCHIVE": f"postgresql://ann:s3cret@127.0.0.1:{free_port()}/c"}
    done = subprocess.run(
        [sys.executable, "-m", "roomcast", "--bind", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("roomcast: cannot start: cannot open postgresql://ann:***@127.0.0.1:")
    assert "Connection refused" in line and "s3cret" not in line


class TestMemoryBrokerOnPostgres:
    async def test_a_clean_restart_continues_the_room_and_resume_has_no_gap(
        self, postgres_url: str
    ) -> None:
        settings = Settings(archive=postgres_url, rate_limit=0, api_key="k")
        with anyio.fail_after(30):
            async with open_asgi_client(create_app(settings)) as client:
                assert isinstance(client.runtime.archive, PostgresArchive)
                for n in range(1, 31):
                    assert await post(client, "lobby", f"m{n}") == n
                epoch = client.runtime.hub.rooms["lobby"].epoch
            async with open_asgi_client(create_app(settings)) as client:
                assert client.runtime.archive.recovery.clean
                async with client.websocket(f"/ws/chat?room=lobby&since=25&epoch={epoch}") as ws:
                    welcome = await ws.receive_json()
                    assert (welcome["epoch"], welcome["seq"]) == (epoch, 30)
                    replayed = [(await ws.receive_json()) for _ in range(5)]
                    assert [e["seq"] for e in replayed] == [26, 27, 28, 29, 30]
                    assert await post(client, "lobby", "after") == 31
                    assert (await ws.receive_until("message"))["seq"] == 31
