"""End-to-end: scrolling back through a room in the browser client (headless Chromium against
a real ``python -m roomcast``, as tests/test_browser.py drives it).

A room holds 500 messages; the server retains its default 100 in memory and keeps every
message in its SQLite archive, so paging back goes from the retained window into the
archive. A page that joins the room shows the newest ones, and each scroll to the top loads the
page before, keeping what the reader looked at in place, until "the beginning of #room" is
shown: then every message is on the page exactly once, in order.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import httpx

from test_browser import Person, _assert_clean, _launch

KEY = "browser-scrollback-key"
ROOM = "scroll"
COUNT = 500
SERVER_ENV = {"ROOMCAST_RATE_LIMIT": "0", "ROOMCAST_API_KEY": KEY}
#: where the text of the message with this seq is in the list's view (px from its top)
TEXT_AT_JS = """(list, seq) => {
    const item = list.querySelector(`li.message[data-seq="${seq}"] .text`);
    return item.getBoundingClientRect().top - list.getBoundingClientRect().top;
}"""
#: scroll the list to its top; the oldest message shown and where its text is in view then
TO_TOP_JS = """list => {
    list.scrollTop = 0;
    const first = list.querySelector('li.message');
    const text = first.querySelector('.text');
    return [Number(first.dataset.seq),
            text.getBoundingClientRect().top - list.getBoundingClientRect().top];
}"""


def _post_messages(base: str) -> list[str]:
    texts = [f"message {n:03d}" for n in range(1, COUNT + 1)]
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=base, headers=headers, timeout=10) as http:
        for text in texts:
            http.post(f"/api/rooms/{ROOM}/messages", json={"text": text}).raise_for_status()
    return texts


def test_scrolling_up_pages_back_to_the_beginning_with_nothing_twice_nothing_missing() -> None:
    with contextlib.ExitStack() as stack:
        archive = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "archive.db"
        env = {**SERVER_ENV, "ROOMCAST_ARCHIVE": f"sqlite:///{archive}"}
        expect, browser, servers = _launch(stack, env)
        assert servers.current is not None
        base = servers.current.http_url("/")
        sent = _post_messages(base.rstrip("/"))

        reader = Person(browser, expect, "Reader", viewport={"width": 1180, "height": 760})
        stack.callback(reader.close)
        reader.page.goto(f"{base}?room={ROOM}&name=Reader")
        expect(reader.status).to_have_attribute("data-state", "connected")
        expect(reader.message(sent[-1])).to_have_count(1)
        beginning = reader.page.locator("#messages li.notice[data-kind=beginning]")
        first_view = len(reader.shown())
        assert first_view < COUNT, "the join shows the newest page, not the whole history"
        assert beginning.count() == 0

        messages = reader.page.locator("#messages")
        for _ in range(COUNT):  # one page per scroll at least: bounded well above 10
            if beginning.count():
                break
            seq, top = messages.evaluate(TO_TOP_JS)
            reader.page.wait_for_function(
                """([seq]) => {
                    const list = document.getElementById('messages');
                    const first = list.querySelector('li.message');
                    return Number(first.dataset.seq) < seq ||
                        list.querySelector('li.notice[data-kind=beginning]') !== null;
                }""",
                arg=[seq],
            )
            # the message the reader saw at the top is still where it was
            moved = messages.evaluate(TEXT_AT_JS, seq)
            assert abs(moved - top) <= 2, (seq, top, moved)

        expect(beginning).to_have_text(f"This is the beginning of #{ROOM}.")
        expect(beginning).to_be_visible()
        shown = reader.shown()
        assert [seq for _, seq, _ in shown] == list(range(1, COUNT + 1))
        assert [text for _, _, text in shown] == sent
        assert len({epoch for epoch, _, _ in shown}) == 1
        # the first item of the list is the beginning, above message 1
        assert messages.evaluate("list => list.firstElementChild.dataset.kind") == "beginning"
        reader.screenshot("scrollback-beginning")
        _assert_clean(reader)
