"""The product's chat, tested the way its team would: in process with roomcast.testing,
on asyncio and trio (conftest.py), no server to start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from product import create_product

from roomcast import Settings
from roomcast.client import Message
from roomcast.testing import MessageRefused, TestClient, open_test_client

pytestmark = pytest.mark.anyio

SECRET = "test-secret"


@pytest.fixture
def product(tmp_path: Path):  # type: ignore[no-untyped-def]
    return create_product(
        database=str(tmp_path / "product.db"),
        secret=SECRET,
        chat_settings=Settings(rate_limit=0, presence_grace=0),
    )


async def log_in(client: TestClient, user: str, password: str) -> dict[str, str]:
    """The session cookie the product sets for ``user``."""
    response = await client.post("/login", json={"user": user, "password": password})
    assert response.status_code == 200, response.text
    cookie = response.headers["set-cookie"].split(";")[0]
    name, _, value = cookie.partition("=")
    return {name: value}


async def search(client: TestClient, words: str) -> list[dict[str, Any]]:
    """``/search``'s hits, once there are some: ``stored`` copies a message into the
    product's table after the room has it, off the sender's path, so a moment later."""
    with anyio.fail_after(5):
        while True:
            hits: list[dict[str, Any]] = (await client.get("/search", params={"q": words})).json()
            if hits:
                return hits
            await anyio.sleep(0.01)


async def test_chat_knows_who_logged_in(product) -> None:  # type: ignore[no-untyped-def]
    async with open_test_client(product) as client:
        ann = await log_in(client, "ann", "ann-password")
        async with client.connect("/chat/ws/chat?room=lobby", cookies=ann) as ws:
            welcome = await ws.receive_event()
            assert welcome.members == ("Ann",)
            ack = await ws.send_message("hello")
            heard = await ws.receive_event()
            assert isinstance(heard, Message)
            assert (heard.seq, heard.sender, heard.user) == (ack.seq, "Ann", "ann")


async def test_no_session_no_chat(product) -> None:  # type: ignore[no-untyped-def]
    async with open_test_client(product) as client:
        wrong = await client.post("/login", json={"user": "ann", "password": "guess"})
        assert wrong.status_code == 401
        async with client.connect("/chat/ws/chat?room=lobby") as ws:
            assert await ws.wait_closed() == (4001, "log in first")
        forged = {"session": "ann.9999999999.0000"}
        async with client.connect("/chat/ws/chat?room=lobby", cookies=forged) as ws:
            assert (await ws.wait_closed())[0] == 4001


async def test_moderation(product) -> None:  # type: ignore[no-untyped-def]
    async with open_test_client(product) as client:
        ann = await log_in(client, "ann", "ann-password")
        bo = await log_in(client, "bo", "bo-password")
        async with (
            client.connect("/chat/ws/chat?room=lobby", cookies=ann) as ann_ws,
            client.connect("/chat/ws", cookies=bo) as bo_ws,
        ):
            await ann_ws.receive_event()
            await bo_ws.join("lobby")
            with pytest.raises(MessageRefused) as refused:
                await ann_ws.send_message("cheap SPAM here")
            assert refused.value.code == "banned_word"
            await ann_ws.send_message("see you :)")
            heard = await bo_ws.receive_json()
            while heard["type"] != "message":  # (presence: ann was there first)
                heard = await bo_ws.receive_json()
            assert heard["text"] == "see you 🙂"
            assert heard["data"] == {"original": "see you :)"}


async def test_every_message_is_searchable_in_the_product(product) -> None:  # type: ignore[no-untyped-def]
    async with open_test_client(product) as client:
        ann = await log_in(client, "ann", "ann-password")
        async with client.connect("/chat/ws/chat?room=lobby", cookies=ann) as ws:
            await ws.receive_event()
            await ws.send_message("the quarterly report is ready")
            await ws.send_message("lunch at noon :)")
        found = await search(client, "report")
        assert [(hit["room"], hit["seq"], hit["name"]) for hit in found] == [("lobby", 1, "Ann")]
        assert found[0]["text"] == "the quarterly report is ready"
        found = await search(client, "noon")
        assert found[0]["text"] == "lunch at noon 🙂"  # what the room saw
