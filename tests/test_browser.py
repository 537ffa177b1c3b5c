"""End-to-end: the browser client in headless Chromium against a real ``python -m roomcast``.

The page is one ``/ws`` connection (protocol v2) with a room list. One test walks through a
chat session with three people in one room (Alice on a desktop viewport, Bob on a phone
viewport, Carol dropping in) and checks what a user would see:

* a message typed in one page appears in every page of the room, exactly once;
* the member list and count follow joins and leaves (an unnamed member only counts);
* a dropped connection resumes with ``since``/``epoch`` and replays what it missed;
* a server restart is survived: the page says it is reconnecting, then connected, shows that
  the room's history restarted, and displays every message sent afterwards;
* chat text is rendered as text (no markup is created, no script runs).

Others cover many rooms in one tab (unread counts, a drop, a reload and a server restart
resuming every room with nothing twice), direct messages opened from the member list
between signed-in users, and "X is typing".

Chromium comes from ``ROOMCAST_CHROMIUM`` or ``chromium`` on ``PATH``. Without it the test
is skipped, except under ``CI=true`` where it fails. Screenshots go to
``tests/artifacts/browser/``; the one of three rooms on a desktop is also written to
``docs/screenshot.png`` (the README's) when that file is missing or
``ROOMCAST_UPDATE_SCREENSHOT=1``, so ordinary runs leave the committed image alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ci import missing
from servers import ServerProcess, spawn_server

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts" / "browser"
DOCS_SCREENSHOT = ROOT / "docs" / "screenshot.png"

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_ENV = {"ROOMCAST_RATE_LIMIT": "0"}
ROOM = "lobby"
WAIT = 10_000  # ms: the bound on any ordinary wait
RESTART_WAIT = 25_000  # ms: graceful shutdown (5 s by default) + start + backoff

XSS = "<script>alert(1)</script><b>x</b>"


def _requirements() -> tuple[Any, str]:
    """The Playwright sync API and a Chromium executable, or skip (fail under CI)."""
    try:
        from playwright import sync_api
    except ImportError:  # pragma: no cover - depends on the environment
        missing("playwright is not installed")
    executable = os.environ.get("ROOMCAST_CHROMIUM") or shutil.which("chromium")
    if not executable or not os.path.exists(executable):
        missing("Chromium not found: set ROOMCAST_CHROMIUM or put chromium on PATH")
    return sync_api, executable


class Person:
    """One browser context and page, with what went wrong in it."""

    def __init__(self, browser: Any, expect: Any, name: str | None, **context_options: Any) -> None:
        self.name = name
        self.expect = expect
        self.context = browser.new_context(**context_options)
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT)
        self.dialogs: list[str] = []
        self.page_errors: list[str] = []
        self.csp_violations: list[str] = []
        self.page.on("dialog", self._on_dialog)
        self.page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        self.page.on("console", self._on_console)

    def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _on_console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.csp_violations.append(message.text)

    # -- locators -------------------------------------------------------------------------

    @property
    def status(self) -> Any:
        return self.page.locator("#status")

    @property
    def messages(self) -> Any:
        return self.page.locator("#messages li.message")

    def message(self, text: str) -> Any:
        return self.page.locator("#messages li.message .text").filter(
            has_text=re.compile("^" + re.escape(text) + "$")
        )

    def member(self, name: str) -> Any:
        return self.page.locator("#members li.member").filter(
            has=self.page.locator(".member-name", has_text=re.compile("^" + re.escape(name) + "$"))
        )

    # -- actions --------------------------------------------------------------------------

    def send(self, text: str, *, click: bool = False) -> None:
        box = self.page.locator("#text")
        box.fill(text)
        if click:
            self.page.locator("#send").click()
        else:
            box.press("Enter")
        self.expect(box).to_have_value("")

    def shown(self) -> list[tuple[str, int, str]]:
        """(epoch, seq, text) of every message on the page, top to bottom."""
        rows: list[tuple[str, int, str]] = self.messages.evaluate_all(
            """items => items.map(li => [li.dataset.epoch, Number(li.dataset.seq),
                                        li.querySelector('.text').textContent])"""
        )
        return [(epoch, seq, text) for epoch, seq, text in rows]

    def screenshot(self, name: str) -> None:
        # transitions finished: a button just enabled is not caught half faded
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), animations="disabled")

    def close(self) -> None:
        self.context.close()


def _assert_exactly_once(person: Person, sent: list[str]) -> None:
    """Every message sent is shown exactly once, with a unique (epoch, seq), in order."""
    shown = person.shown()
    keys = [(epoch, seq) for epoch, seq, _ in shown]
    assert len(keys) == len(set(keys)), f"{person.name}: duplicate (epoch, seq) in {keys}"
    texts = Counter(text for _, _, text in shown)
    assert texts == Counter(sent), f"{person.name}: shown {texts}, sent {Counter(sent)}"
    # within an epoch seqs strictly increase down the page
    by_epoch: dict[str, list[int]] = {}
    for epoch, seq, _ in shown:
        by_epoch.setdefault(epoch, []).append(seq)
    for epoch, seqs in by_epoch.items():
        assert seqs == sorted(seqs), f"{person.name}: epoch {epoch} out of order: {seqs}"


class Servers:
    """The current ``python -m roomcast`` subprocess; restartable on the same port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.current: ServerProcess | None = None
        self._stack: contextlib.ExitStack | None = None

    def start(self, port: int = 0) -> ServerProcess:
        self.stop()
        stack = contextlib.ExitStack()
        self.current = stack.enter_context(spawn_server(env=self.env, port=port))
        self._stack = stack
        return self.current

    def stop(self) -> None:
        """Stop the server with SIGTERM and wait for it.

        ``spawn_server`` alone would SIGKILL the ``python -m roomcast`` parent, which leaves
        Hypercorn's worker process orphaned (still holding the port and the output pipe);
        SIGTERM lets Hypercorn stop its workers.
        """
        if self._stack is None or self.current is None:
            return
        stack, server, self._stack = self._stack, self.current, None
        try:
            server.terminate()
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass  # spawn_server kills it
        finally:
            stack.close()


def _launch(stack: contextlib.ExitStack, env: dict[str, str]) -> tuple[Any, Any, Servers]:
    """Playwright's ``expect``, a headless Chromium and a running server, all ended by
    ``stack`` (browser first, then the server)."""
    sync_api, executable = _requirements()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    servers = Servers(env)
    stack.callback(servers.stop)
    servers.start()
    playwright = stack.enter_context(sync_api.sync_playwright())
    browser = playwright.chromium.launch(
        executable_path=executable, headless=True, args=CHROMIUM_ARGS, timeout=30_000
    )
    stack.callback(browser.close)
    return sync_api.expect, browser, servers


def _assert_clean(*people: Person) -> None:
    """No dialog opened, no script error, no CSP violation in any page."""
    for person in people:
        assert person.dialogs == [], person.dialogs
        assert person.page_errors == [], person.page_errors
        assert person.csp_violations == [], person.csp_violations


def test_browser_chat_end_to_end() -> None:
    started = time.monotonic()
    sent: list[str] = []
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, SERVER_ENV)
        server = servers.current
        assert server is not None
        base = server.http_url("/")
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)

        # -- Alice (desktop) joins through the URL ------------------------------------------
        alice = Person(
            browser, expect, "Alice", viewport={"width": 1180, "height": 760}, device_scale_factor=2
        )
        stack.callback(alice.close)
        alice.page.goto(f"{base}?room={ROOM}&name=Alice")
        expect(alice.status).to_have_attribute("data-state", "connected")
        expect(alice.status).to_contain_text("Connected")
        expect(alice.page.locator("#room-name")).to_have_text(ROOM)
        expect(alice.member("Alice")).to_have_count(1)
        expect(alice.page.locator("#count")).to_have_text("1")
        assert alice.page.evaluate("() => window.roomcast.session.ws.protocol") == "roomcast.batch"

        # -- Bob (phone) joins through the form -------------------------------------------
        bob = Person(
            browser,
            expect,
            "Bob",
            viewport={"width": 390, "height": 844},
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
            reduced_motion="reduce",
        )
        stack.callback(bob.close)
        bob.page.goto(base)
        expect(bob.page.locator("#join-form")).to_be_visible()
        expect(bob.page.locator("#room-input")).to_have_value("general")
        bob.screenshot("join-phone")
        bob.page.locator("#room-input").fill(ROOM)
        bob.page.locator("#name-input").fill("Bob")
        bob.page.locator("#join-button").click()
        expect(bob.status).to_have_attribute("data-state", "connected")
        assert "room=lobby" in bob.page.url and "name=Bob" in bob.page.url

        for person in (alice, bob):
            expect(person.member("Alice")).to_have_count(1)
            expect(person.member("Bob")).to_have_count(1)
            expect(person.page.locator("#count")).to_have_text("2")
        expect(alice.page.locator("#messages li.notice[data-event=join]")).to_contain_text(
            "Bob joined"
        )

        # -- messages reach both pages ----------------------------------------------------
        conversation = [
            (alice, "Morning! Is the 2.4 release still on for today?", False),
            (bob, "Yes. The last migration finished a few minutes ago.", True),
            (alice, "Great, I'll start the rollout.\nRegion by region, as usual.", False),
        ]
        for person, text, click in conversation:
            person.send(text, click=click)
            sent.append(text)
            for viewer in (alice, bob):
                expect(viewer.message(text)).to_have_count(1)
        first = alice.messages.first
        expect(first.locator(".from")).to_have_text("Alice")
        expect(first.locator("time.ts")).to_have_text(re.compile(r"\d{1,2}:\d{2}"))
        expect(bob.messages.nth(1).locator(".from")).to_have_text("Bob")
        expect(alice.page.locator("#messages li.message.mine")).to_have_count(2)
        expect(bob.page.locator("#messages li.message.mine")).to_have_count(1)

        # -- Carol joins, and someone without a name; Carol later leaves ------------------
        # Carol's browser does not offer roomcast.batch: one event per frame
        carol = Person(browser, expect, "Carol", viewport={"width": 1000, "height": 700})
        carol.page.add_init_script(
            "window.WebSocket = class extends WebSocket { constructor(url) { super(url); } };"
        )
        carol.page.goto(f"{base}?room={ROOM}&name=Carol")
        expect(carol.status).to_have_attribute("data-state", "connected")
        assert carol.page.evaluate("() => window.roomcast.session.ws.protocol") == ""
        # a fresh join shows the room's recent history
        for text in sent:
            expect(carol.message(text)).to_have_count(1)
        anonymous = Person(browser, expect, None, viewport={"width": 800, "height": 600})
        anonymous.page.goto(f"{base}?room={ROOM}")
        expect(anonymous.status).to_have_attribute("data-state", "connected")
        for person in (alice, bob):
            expect(person.member("Carol")).to_have_count(1)
            expect(person.page.locator("#count")).to_have_text("4")
            expect(person.page.locator("#members li.member")).to_have_count(3)
            expect(person.page.locator("#members-more")).to_contain_text("1 other")

        carol.send("Hi both, just dropping in to say the dashboards look green.")
        sent.append("Hi both, just dropping in to say the dashboards look green.")
        bob.send("Thanks Carol!")
        sent.append("Thanks Carol!")
        for person in (alice, bob):
            expect(person.message(sent[-1])).to_have_count(1)
        alice.page.locator("#text").fill("Rolling out to eu-west now")
        alice.screenshot("chat-desktop")
        alice.page.locator("#text").fill("")
        bob.screenshot("chat-phone")
        bob.page.locator("#members-toggle").click()
        expect(bob.page.locator("#sidebar")).to_be_in_viewport()
        bob.screenshot("members-phone")
        bob.page.locator("#scrim").click(position={"x": 30, "y": 300})
        expect(bob.page.locator("#sidebar")).not_to_be_in_viewport()

        # one at a time: each departure is seen before the next one
        carol.page.locator("#leave").click()
        expect(carol.page.locator("#join-form")).to_be_visible()
        for person in (alice, bob):
            expect(person.member("Carol")).to_have_count(0)
            expect(person.page.locator("#count")).to_have_text("3")
        anonymous.close()
        for person in (alice, bob):
            expect(person.page.locator("#count")).to_have_text("2")
            expect(person.page.locator("#members-more")).to_be_hidden()
            expect(person.page.locator("#members li.member")).to_have_count(2)
        for who in ("Carol left", "Someone left"):
            expect(
                alice.page.locator("#messages li.notice[data-event=leave]").filter(has_text=who)
            ).to_have_count(1)
        carol.close()

        # -- markup in a message is text --------------------------------------------------
        alice.send(XSS)
        sent.append(XSS)
        for person in (alice, bob):
            expect(person.message(XSS)).to_have_count(1)
            assert person.page.locator("#messages b, #messages script").count() == 0
        bob.screenshot("markup-as-text")

        # -- Bob's connection drops; he resumes and gets what he missed, once -------------
        bob.page.evaluate(
            "() => { const s = window.roomcast.session; s.attempt = 12; s.ws.close(); }"
        )
        expect(bob.status).to_have_attribute("data-state", "reconnecting")
        expect(bob.status).to_contain_text(re.compile(r"Reconnecting in \d+s"))
        expect(bob.page.locator("#banner")).to_contain_text("Reconnecting in")
        expect(alice.member("Bob")).to_have_count(0)  # the server has seen Bob go
        expect(alice.page.locator("#count")).to_have_text("1")
        missed = ["Bob, did you see this?", "And this one?"]
        for text in missed:
            alice.send(text)
            sent.append(text)
            expect(alice.message(text)).to_have_count(1)
        expect(bob.message(missed[0])).to_have_count(0)
        bob.page.locator("#retry").click()
        expect(bob.status).to_have_attribute("data-state", "connected")
        expect(alice.member("Bob")).to_have_count(1)
        expect(bob.member("Alice")).to_have_count(1)
        for text in missed:
            expect(bob.message(text)).to_have_count(1)
        _assert_exactly_once(bob, sent)
        expect(bob.page.locator("#messages li.notice.gap")).to_have_count(0)
        expect(bob.page.locator("#messages li.notice.restart")).to_have_count(0)

        # -- the server restarts ----------------------------------------------------------
        before = {
            p.name: p.page.evaluate("() => window.roomcast.session.epoch") for p in (alice, bob)
        }
        assert before["Alice"] == before["Bob"]
        drops_before = {
            p.name: p.page.locator("#messages li.notice.disconnect").count() for p in (alice, bob)
        }
        server.terminate()  # SIGTERM: open connections are closed with 1001
        for person in (alice, bob):
            expect(person.status).to_have_attribute(
                "data-state", "reconnecting", timeout=RESTART_WAIT
            )
            expect(person.status).to_contain_text("Reconnecting", timeout=RESTART_WAIT)
        server.process.wait(timeout=15)
        # each page says why: SIGTERM closes every WebSocket with 1001
        for person in (alice, bob):
            notices = person.page.locator("#messages li.notice.disconnect")
            expect(notices).to_have_count(drops_before[person.name] + 1)
            expect(notices.last).to_have_attribute("data-code", "1001")
            expect(notices.last).to_have_text("Disconnected: the server is restarting.")
        alice.screenshot("restarting")
        port = server.port
        servers.stop()
        restarted = servers.start(port=port)
        assert restarted.port == port
        for person in (alice, bob):
            expect(person.status).to_have_attribute("data-state", "connected", timeout=RESTART_WAIT)
            expect(person.page.locator("#messages li.notice.restart")).to_have_count(1)
            expect(person.page.locator("#messages li.notice.restart")).to_contain_text(
                "history restarted"
            )
        after = alice.page.evaluate("() => window.roomcast.session.epoch")
        assert after != before["Alice"]

        for person, text in ((alice, "Back after the restart?"), (bob, "Yes, all good here.")):
            person.send(text)
            sent.append(text)
        for person in (alice, bob):
            for text in sent[-2:]:
                expect(person.message(text)).to_have_count(1)
            expect(
                person.page.locator(f"#messages li.message[data-epoch='{after}']")
            ).to_have_count(2)
            expect(
                person.page.locator(f"#messages li.message[data-epoch='{after}'][data-seq='1']")
            ).to_have_count(1)
            _assert_exactly_once(person, sent)
        alice.screenshot("after-restart-desktop")
        bob.screenshot("after-restart-phone")

        for person in (alice, bob):  # every message sent was acked before each drop
            expect(person.page.locator("li.notice[data-error=unconfirmed]")).to_have_count(0)
        _assert_clean(alice, bob)

    assert time.monotonic() - started < 60


def test_browser_errors_and_close_reasons() -> None:
    """Refusals are shown as readable text, and the client only retries when it helps."""
    env = {
        "ROOMCAST_TOKENS": "sesame",
        "ROOMCAST_RATE_LIMIT": "1",  # burst of 2
        "ROOMCAST_ROOM_CAPACITY": "1",
        "ROOMCAST_MAX_TEXT": "20",
    }
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, env)
        assert servers.current is not None
        base = servers.current.http_url("/")
        dana = Person(browser, expect, "Dana", viewport={"width": 390, "height": 844})
        stack.callback(dana.close)

        # no token: closed with 4001, which leads to the sign-in step, and is not retried
        dana.page.goto(f"{base}?room=ops&name=Dana")
        expect(dana.page.locator("#signin")).to_be_visible()
        expect(dana.page.locator("#join-error")).to_contain_text("paste your access token")
        assert dana.page.evaluate(
            "() => !window.roomcast.session.active && window.roomcast.session.retryTimer === null"
        )
        dana.screenshot("signin-4001-phone")

        # a name the server refuses (a right-to-left override could disguise it): 4400
        # brings the join form back with the server's reason, and nothing is retried
        dana.page.goto(f"{base}?room=ops&name=Dana%E2%80%AEX&token=sesame")
        expect(dana.page.locator("#join-form")).to_be_visible()
        expect(dana.page.locator("#join-error")).to_contain_text("bidirectional control")
        assert dana.page.evaluate("() => !window.roomcast.session.active")

        # with the token: in
        dana.page.goto(f"{base}?room=ops&name=Dana&token=sesame")
        expect(dana.status).to_have_attribute("data-state", "connected")

        # too long for ROOMCAST_MAX_TEXT (told in welcome): refused here, the draft kept
        long_text = "this message is longer than twenty characters"
        dana.page.locator("#text").fill(long_text)
        dana.page.locator("#text").press("Enter")
        expect(dana.page.locator("#draft-hint")).to_have_text(
            "This message is too long: 45 of 20 characters. Shorten it to send."
        )
        expect(dana.page.locator("#send")).to_be_disabled()
        expect(dana.page.locator("#text")).to_have_value(long_text)
        # a page that misjudged the limit: the server's refusal gives the text back
        dana.page.evaluate("() => { window.roomcast.session.maxText = 1000; }")
        dana.page.locator("#text").press("Enter")
        expect(dana.page.locator("#messages li.notice.error[data-error=too_long]")).to_contain_text(
            "the limit is 20"
        )
        expect(dana.page.locator("#text")).to_have_value(long_text)
        expect(dana.messages).to_have_count(0)
        dana.page.locator("#text").fill("")

        # too fast: a rate_limited notice; what got through is shown, the rest is given back
        dana.page.evaluate(
            """() => { const box = document.getElementById('text');
                       const form = document.getElementById('composer');
                       for (let i = 0; i < 5; i++) {
                         box.value = 'quick ' + i;
                         form.requestSubmit();
                       } }"""
        )
        expect(
            dana.page.locator("#messages li.notice.error[data-error=rate_limited]")
        ).to_contain_text("too fast")
        expect(dana.message("quick 0")).to_have_count(1)
        expect(dana.message("quick 1")).to_have_count(1)
        expect(dana.page.locator("#text")).to_have_value("quick 2\nquick 3\nquick 4")
        expect(dana.page.locator("#send")).to_be_enabled()
        dana.screenshot("errors-phone")
        dana.page.locator("#text").fill("")

        # the room holds one member: the next one is told it is full and may retry by hand
        # (the connection stays up: only that room's join was refused)
        eve = Person(browser, expect, "Eve", viewport={"width": 900, "height": 600})
        stack.callback(eve.close)
        eve.page.goto(f"{base}?room=ops&name=Eve&token=sesame")
        expect(eve.status).to_have_attribute("data-state", "connected")
        expect(eve.page.locator("#banner")).to_contain_text("the room is full")
        expect(eve.page.locator("#retry")).to_be_visible()
        expect(eve.page.locator("#send")).to_be_disabled()
        eve.screenshot("closed-4003")

        # Dana leaves: Eve's retry now gets in
        dana.page.locator("#members-toggle").click()
        dana.page.locator("#leave").click()
        expect(dana.page.locator("#join-form")).to_be_visible()
        eve.page.locator("#retry").click()
        expect(eve.status).to_have_attribute("data-state", "connected")
        expect(eve.page.locator("#banner")).to_be_hidden()
        # Eve sees the room's history, Dana's accepted messages included
        expect(eve.message("quick 0")).to_have_count(1)

        _assert_clean(dana, eve)


def _gap_to_bottom(person: Person) -> float:
    gap: float = person.page.evaluate(
        "() => { const m = document.getElementById('messages');"
        " return m.scrollHeight - m.scrollTop - m.clientHeight; }"
    )
    return gap


def test_a_crowd_arriving_and_leaving_is_a_few_notices_and_an_exact_member_list() -> None:
    """150 join at once (named and not), then all leave at once: the page shows the room's
    count and names as each coalesced notice gives them, in a few notice lines, not 300."""
    from concurrent.futures import ThreadPoolExecutor

    from rawws import RawWebSocket, open_raw_websocket

    crowd = 150
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, SERVER_ENV)
        server = servers.current
        assert server is not None
        watcher = Person(browser, expect, "Watcher", viewport={"width": 1000, "height": 700})
        stack.callback(watcher.close)
        watcher.page.goto(f"{server.http_url('/')}?room=crowd&name=Watcher")
        expect(watcher.status).to_have_attribute("data-state", "connected")

        def arrive(n: int) -> RawWebSocket:
            name = f"&name=guest{n:03}" if n % 3 else ""  # a third of them anonymous
            ws = open_raw_websocket(server.port, f"/ws/chat?room=crowd{name}")
            ws.next_message()  # the welcome
            return ws

        with ThreadPoolExecutor(16) as pool:
            guests = list(pool.map(arrive, range(crowd)))
        named = [f"guest{n:03}" for n in range(crowd) if n % 3]
        expect(watcher.page.locator("#count")).to_have_text(str(crowd + 1))
        # the server names 100 members (as in welcome); the rest are counted
        expect(watcher.page.locator("#members li.member")).to_have_count(100)
        expect(watcher.member("Watcher")).to_have_count(1)
        expect(watcher.member(named[0])).to_have_count(1)
        expect(watcher.page.locator("#members-more")).to_contain_text(f"{crowd + 1 - 100} others")
        for guest in guests:
            guest.kill()
        expect(watcher.page.locator("#count")).to_have_text("1")
        expect(watcher.page.locator("#members li.member")).to_have_count(1)
        expect(watcher.page.locator("#members-more")).to_be_hidden()
        notices = watcher.page.locator("#messages li.notice[data-kind=system]")
        texts = notices.all_text_contents()
        assert 2 <= len(texts) <= 12, texts  # one a second at most, each naming a few
        assert any("others joined" in text for text in texts), texts
        assert any("left" in text for text in texts), texts
        watcher.screenshot("crowd")
        _assert_clean(watcher)


def test_the_list_follows_new_messages_while_a_long_draft_grows_the_box() -> None:
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, SERVER_ENV)
        server = servers.current
        assert server is not None
        base = server.http_url("/")
        reader = Person(browser, expect, "Reader", viewport={"width": 900, "height": 600})
        writer = Person(browser, expect, "Writer", viewport={"width": 900, "height": 600})
        for person in (reader, writer):
            stack.callback(person.close)
            person.page.goto(f"{base}?room=scroll&name={person.name}")
            expect(person.status).to_have_attribute("data-state", "connected")
        for n in range(40):  # more than the list can show
            writer.send(f"filler {n}")
        expect(reader.message("filler 39")).to_have_count(1)
        assert _gap_to_bottom(reader) < 2

        box_height = reader.page.locator("#text").bounding_box()["height"]
        reader.page.locator("#text").fill("\n".join(f"draft line {n}" for n in range(6)))
        reader.page.locator("#text").dispatch_event("input")
        assert reader.page.locator("#text").bounding_box()["height"] > box_height + 40
        for n in range(3):
            writer.send(f"while drafting {n}")
            expect(reader.message(f"while drafting {n}")).to_have_count(1)
            deadline = time.monotonic() + WAIT / 1000
            while _gap_to_bottom(reader) >= 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _gap_to_bottom(reader) < 2, "the list stopped following"

        reader.page.evaluate("() => { document.getElementById('messages').scrollTop = 0; }")
        reader.page.wait_for_function("() => !window.roomcast.following")  # the scroll event
        writer.send("while reading old messages")
        expect(reader.message("while reading old messages")).to_have_count(1)
        assert reader.page.evaluate("() => document.getElementById('messages').scrollTop") == 0
        _assert_clean(reader, writer)


def test_the_page_works_mounted_under_a_prefix() -> None:
    from mounted import build
    from servers import serve_in_thread

    sync_api, executable = _requirements()
    with (
        serve_in_thread(build()) as server,
        sync_api.sync_playwright() as playwright,
        contextlib.ExitStack() as stack,
    ):
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS, timeout=30_000
        )
        stack.callback(browser.close)
        person = Person(browser, sync_api.expect, "Ann", viewport={"width": 900, "height": 600})
        stack.callback(person.close)
        person.page.goto(server.http_url("/chat/?room=mounted&name=Ann"))
        sync_api.expect(person.status).to_have_attribute("data-state", "connected")
        person.send("hello from a mounted page")
        sync_api.expect(person.message("hello from a mounted page")).to_have_count(1)
        url = person.page.evaluate("() => window.roomcast.session.ws.url")
        assert url.startswith(f"ws://127.0.0.1:{server.port}/chat/ws?")
        _assert_clean(person)


def test_sign_in_with_a_token_that_never_reaches_the_address_bar_or_the_log() -> None:
    from roomcast.identity import mint_token

    secret = "a-secret-of-at-least-thirty-two-bytes!"
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, {**SERVER_ENV, "ROOMCAST_JWT_SECRET": secret})
        server = servers.current
        assert server is not None
        token = mint_token(secret, sub="ann", name="Ann", ttl=600)
        ann = Person(browser, expect, "Ann", viewport={"width": 900, "height": 600})
        stack.callback(ann.close)

        ann.page.goto(server.http_url("/?room=lobby&name=Someone"))
        expect(ann.page.locator("#signin")).to_be_visible()
        expect(ann.page.locator("#join-error")).to_contain_text("paste your access token")
        ann.page.locator("#token-input").fill(token)
        ann.page.locator("#join-button").click()
        expect(ann.status).to_have_attribute("data-state", "connected")
        ann.send("signed in")
        expect(ann.message("signed in")).to_have_count(1)
        expect(ann.messages.first.locator(".from")).to_have_text("Ann")  # the token's name
        assert token not in ann.page.url

        # handed over in the fragment: taken, then removed from the address bar
        bob_token = mint_token(secret, sub="bob", name="Bob", ttl=600)
        bob = Person(browser, expect, "Bob", viewport={"width": 900, "height": 600})
        stack.callback(bob.close)
        bob.page.goto(server.http_url(f"/?room=lobby#token={bob_token}"))
        expect(bob.status).to_have_attribute("data-state", "connected")
        assert bob_token not in bob.page.url
        assert bob.page.evaluate("() => sessionStorage.getItem('roomcast.token')") == bob_token

        # an expired token leads back to the sign-in step, saying so
        expired = mint_token(secret, sub="cy", ttl=1, now=time.time() - 3600)
        cy = Person(browser, expect, "Cy", viewport={"width": 900, "height": 600})
        stack.callback(cy.close)
        cy.page.goto(server.http_url(f"/?room=lobby#token={expired}"))
        expect(cy.page.locator("#signin")).to_be_visible()
        expect(cy.page.locator("#join-error")).to_contain_text("Your sign-in has expired")
        assert cy.page.evaluate("() => sessionStorage.getItem('roomcast.token')") is None

        log = server.text
        for secret_token in (token, bob_token, expired):
            assert secret_token not in log and secret_token.split(".")[2] not in log
        _assert_clean(ann, bob, cy)


def _person_in(
    stack: contextlib.ExitStack,
    browser: Any,
    expect: Any,
    url: str,
    name: str,
    *,
    init_script: str | None = None,
    **options: Any,
) -> Person:
    """A page that has joined the room at ``url`` (connected)."""
    person = Person(browser, expect, name, **options)
    stack.callback(person.close)
    if init_script:
        person.page.add_init_script(init_script)
    person.page.goto(url)
    expect(person.status).to_have_attribute("data-state", "connected")
    return person


def test_a_draft_over_the_limits_stays_in_the_box_and_no_sent_text_is_lost() -> None:
    """Issue 20, item 4: a 70,000-character paste was sent, closed with 1009 and lost."""
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, SERVER_ENV)
        assert servers.current is not None
        base = servers.current.http_url("/")
        pat = _person_in(
            stack,
            browser,
            expect,
            f"{base}?room=limits&name=Pat",
            "Pat",
            viewport={"width": 900, "height": 700},
        )
        box, hint = pat.page.locator("#text"), pat.page.locator("#draft-hint")
        assert pat.page.evaluate("() => window.roomcast.session.maxText") == 4000  # welcome

        # the paste: refused here, kept in the box, the connection untouched
        paste = "0123456789" * 7000
        box.fill(paste)
        expect(hint).to_have_text(
            "This message is too long: 70,000 of 4,000 characters. Shorten it to send."
        )
        expect(pat.page.locator("#send")).to_be_disabled()
        box.press("Enter")
        expect(box).to_have_value(paste)
        expect(hint).to_be_visible()
        pat.screenshot("draft-too-long")
        # characters as the server counts them: an emoji is one, not two UTF-16 units
        emoji = "\N{GRINNING FACE}" * 4000
        box.fill(emoji)
        expect(hint).to_be_hidden()
        expect(pat.page.locator("#send")).to_be_enabled()
        pat.send(emoji)
        expect(pat.message(emoji)).to_have_count(1)  # and the server agrees

        # a page whose idea of the limits is wrong sends it: the 1009 close gives it back,
        # and the page then knows that frame was too large
        pat.page.evaluate(
            "() => { const s = window.roomcast.session; s.maxText = null; s.frameLimit = 1e9; }"
        )
        box.fill(paste)
        box.press("Enter")
        expect(pat.page.locator("#messages li.notice[data-code='1009']")).to_have_count(1)
        expect(pat.page.locator("#messages li.notice[data-error=too_large]")).to_contain_text(
            "back in the message box"
        )
        expect(box).to_have_value(paste)
        expect(pat.status).to_have_attribute("data-state", "connected", timeout=RESTART_WAIT)
        # just under that frame's size (the text plus its JSON and id)
        assert 70_000 < pat.page.evaluate("() => window.roomcast.session.frameLimit") < 70_100
        expect(hint).to_contain_text("too long: 70,000 of 4,000 characters")
        box.fill("")

        # sent, then the connection drops before any answer: lost on the way, it comes back
        # into the box after the resume; one that did arrive is shown, not given back
        pat.page.evaluate("() => { window.roomcast.session.ws.send = () => {}; }")
        box.fill("lost on the way")
        box.press("Enter")
        expect(box).to_have_value("")
        pat.page.evaluate("() => window.roomcast.session.ws.close()")
        expect(pat.page.locator("li.notice[data-error=unconfirmed]")).to_have_count(1)
        expect(pat.status).to_have_attribute("data-state", "connected", timeout=RESTART_WAIT)
        expect(box).to_have_value("lost on the way")
        expect(pat.page.locator("li.notice[data-error=unsent]")).to_contain_text(
            "back in the message box"
        )
        expect(pat.message("lost on the way")).to_have_count(0)
        box.fill("")

        pat.page.evaluate(
            """() => { const ws = window.roomcast.session.ws;
                       ws.onmessage = null;  // its ack and echo go unseen
                       const box = document.getElementById('text');
                       box.value = 'arrived unconfirmed';
                       document.getElementById('composer').requestSubmit();
                       setTimeout(() => ws.close(), 500); }"""
        )
        expect(pat.page.locator("li.notice[data-error=unconfirmed]")).to_have_count(2)
        expect(pat.status).to_have_attribute("data-state", "connected", timeout=RESTART_WAIT)
        expect(pat.message("arrived unconfirmed")).to_have_count(1)  # from the resume
        expect(pat.page.locator("li.notice[data-error=unsent]")).to_have_count(1)
        expect(box).to_have_value("")
        _assert_clean(pat)


def test_signed_in_the_page_shows_who_you_are_and_keeps_the_token_truthfully() -> None:
    """Issue 20, item 5: no "you" for the signed-in user, an ignored "Display name" field and
    ``name=`` in the address bar, and an empty token field after 4403 while it was kept."""
    from roomcast.identity import mint_token

    secret = "a-secret-of-at-least-thirty-two-bytes!"
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, {**SERVER_ENV, "ROOMCAST_JWT_SECRET": secret})
        assert servers.current is not None
        base = servers.current.http_url("/")
        token = mint_token(secret, sub="dee", name="Dee", rooms=["lobby"], ttl=600)
        dee = Person(browser, expect, "Dee", viewport={"width": 900, "height": 700})
        stack.callback(dee.close)
        name_input, token_input = dee.page.locator("#name-input"), dee.page.locator("#token-input")

        # the sign-in step: once a signed token is pasted, its name replaces the name field
        dee.page.goto(f"{base}?room=lobby&name=Someone")
        expect(dee.page.locator("#signin")).to_be_visible()
        expect(name_input).to_be_visible()
        token_input.fill(token)
        expect(name_input).to_be_hidden()
        expect(dee.page.locator("#signed-as")).to_have_text(
            "You will appear as Dee, the name in your token."
        )
        dee.page.locator("#join-button").click()
        expect(dee.status).to_have_attribute("data-state", "connected")
        expect(dee.member("Dee").locator(".you")).to_have_count(1)
        assert "name=" not in dee.page.url and "token" not in dee.page.url
        dee.send("hello")
        expect(dee.messages.first.locator(".from")).to_have_text("Dee")

        # a room the token does not grant: 4403, the join form says so and shows the token
        # still kept (masked), with the token's name rather than a name field
        dee.page.locator("#leave").click()
        dee.page.locator("#room-input").fill("vault")
        dee.page.locator("#join-button").click()
        expect(dee.page.locator("#join-error")).to_contain_text("not allowed")
        assert dee.page.evaluate("() => sessionStorage.getItem('roomcast.token')") == token
        expect(dee.page.locator("#signin")).to_be_visible()
        expect(token_input).to_have_value(token)
        expect(token_input).to_have_attribute("type", "password")
        expect(name_input).to_be_hidden()
        dee.screenshot("signin-4403")
        # joining another room goes on with the kept token
        dee.page.locator("#room-input").fill("lobby")
        dee.page.locator("#join-button").click()
        expect(dee.status).to_have_attribute("data-state", "connected")
        expect(dee.member("Dee").locator(".you")).to_have_count(1)

        # clearing the field signs out: the token is forgotten, the name field is back
        dee.page.locator("#leave").click()
        token_input.fill("")
        expect(name_input).to_be_visible()
        dee.page.locator("#join-button").click()
        expect(dee.page.locator("#join-error")).to_contain_text("paste your access token")
        assert dee.page.evaluate("() => sessionStorage.getItem('roomcast.token')") is None
        expect(token_input).to_have_value("")
        _assert_clean(dee)


PHONE: dict[str, Any] = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}


def test_the_status_pill_is_readable_on_a_phone() -> None:
    """Issue 20, item 10: at 390 px the pill was cut to "Reconnecting i…"."""
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, SERVER_ENV)
        assert servers.current is not None
        base = servers.current.http_url("/")
        phone = _person_in(stack, browser, expect, f"{base}?room=lobby&name=Pia", "Pia", **PHONE)
        phone.page.evaluate(
            "() => { const s = window.roomcast.session; s.attempt = 12; s.ws.close(); }"
        )
        expect(phone.status).to_contain_text(re.compile(r"Reconnecting in \d+s"))
        phone.screenshot("reconnecting-phone")
        texts = [
            "Reconnecting in 10s",
            "Reconnecting…",
            "Connecting…",
            "Connected",
            "Closed: the room is full",
            "Closed: you have too many connections open",
        ]
        # measured in one go, before the countdown rewrites the text
        shown = phone.page.evaluate(
            """texts => texts.map(text => {
                 const pill = document.getElementById('status');
                 const span = document.getElementById('status-text');
                 span.textContent = text;
                 const box = pill.getBoundingClientRect();
                 const toggle = document.getElementById('members-toggle').getBoundingClientRect();
                 return {text, clipped: span.scrollWidth > span.clientWidth
                                        || span.scrollHeight > span.clientHeight
                                        || pill.scrollWidth > pill.clientWidth,
                         inside: box.left >= 0 && box.right <= window.innerWidth,
                         overlaps: box.right > toggle.left};
               })""",
            texts,
        )
        for measured in shown:
            assert measured == {**measured, "clipped": False, "inside": True, "overlaps": False}
        _assert_clean(phone)


def test_links_in_messages_are_clickable_and_nothing_else_is() -> None:
    """Issue 20, item 10: http(s) URLs become links (new tab, no opener, no referrer); a
    ``javascript:`` URL and markup stay text."""
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, SERVER_ENV)
        assert servers.current is not None
        base = servers.current.http_url("/")
        health = servers.current.http_url("/healthz")
        ann = _person_in(
            stack,
            browser,
            expect,
            f"{base}?room=links&name=Ann",
            "Ann",
            viewport={"width": 900, "height": 700},
        )
        bob = _person_in(
            stack,
            browser,
            expect,
            f"{base}?room=links&name=Bob",
            "Bob",
            viewport={"width": 900, "height": 700},
        )
        text = (
            f"status: {health}. Docs (https://example.com/wiki/A_(b)?q=1&r=2), "
            'not javascript:alert(1) nor <a href="javascript:alert(2)">x</a>'
            " nor <img src=x onerror=alert(3)>"
        )
        ann.send(text)
        for person in (ann, bob):
            expect(person.message(text)).to_have_count(1)  # textContent is the text, exactly
            links = person.page.locator("#messages li.message .text a")
            expect(links).to_have_count(2)
            rows = links.evaluate_all(
                "as => as.map(a => [a.getAttribute('href'), a.textContent, a.target, a.rel])"
            )
            assert rows == [
                [health, health, "_blank", "noopener noreferrer"],
                [
                    "https://example.com/wiki/A_(b)?q=1&r=2",
                    "https://example.com/wiki/A_(b)?q=1&r=2",
                    "_blank",
                    "noopener noreferrer",
                ],
            ]
            assert person.page.locator("#messages img, #messages a[href^=javascript]").count() == 0
        bob.screenshot("links")
        with bob.context.expect_page() as opened:
            bob.page.locator("#messages li.message .text a").first.click()
        tab = opened.value
        tab.wait_for_load_state()
        assert tab.url == health
        assert tab.evaluate("() => window.opener") is None
        tab.close()
        _assert_clean(ann, bob)


# -- many rooms over one connection (protocol v2) --------------------------------------------


COUNT_SOCKETS = """
window.socketsOpened = 0;
window.WebSocket = class extends WebSocket {
  constructor(...args) { super(...args); window.socketsOpened++; }
};
"""


def _room_item(person: Person, room: str) -> Any:
    return person.page.locator(f'#rooms-pane li.room-item[data-room="{room}"]')


def _switch(person: Person, room: str) -> None:
    """Show ``room`` from the room list (opening the drawer first on a phone)."""
    if person.page.locator("#rooms-toggle").is_visible():
        person.page.locator("#rooms-toggle").click()
    _room_item(person, room).locator("button").click()
    person.expect(person.page.locator("#rooms-pane li.room-item.current")).to_have_attribute(
        "data-room", room
    )


def _wait_joined(person: Person, *rooms: str) -> None:
    for room in rooms:
        person.page.wait_for_function(
            "name => { const r = window.roomcast.room(name); return r && r.state === 'joined'; }",
            arg=room,
        )


def _room_shown(person: Person, room: str) -> list[tuple[str, int, str]]:
    """(epoch, seq, text) of every message in ``room``'s list, whether in view or not."""
    rows: list[tuple[str, int, str]] = person.page.evaluate(
        """name => Array.from(window.roomcast.room(name).list.querySelectorAll('li.message'))
                    .map(li => [li.dataset.epoch, Number(li.dataset.seq),
                                li.querySelector('.text').textContent])""",
        room,
    )
    return [(epoch, seq, text) for epoch, seq, text in rows]


def _wait_room_texts(person: Person, room: str, sent: list[str]) -> None:
    """``room`` shows exactly ``sent``, each once, in order within each epoch."""
    deadline = time.monotonic() + RESTART_WAIT / 1000
    while Counter(t for _, _, t in _room_shown(person, room)) != Counter(sent):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    shown = _room_shown(person, room)
    keys = [(epoch, seq) for epoch, seq, _ in shown]
    assert len(keys) == len(set(keys)), f"{person.name} #{room}: duplicates in {keys}"
    assert Counter(t for _, _, t in shown) == Counter(sent), (person.name, room, shown, sent)
    by_epoch: dict[str, list[int]] = {}
    for epoch, seq, _ in shown:
        by_epoch.setdefault(epoch, []).append(seq)
    for seqs in by_epoch.values():
        assert seqs == sorted(seqs), f"{person.name} #{room}: out of order {seqs}"


def test_three_rooms_in_one_tab_unread_counts_resumed_after_drop_reload_and_restart() -> None:
    rooms = ("lobby", "ops", "random")
    sent: dict[str, list[str]] = {room: [] for room in rooms}
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, SERVER_ENV)
        server = servers.current
        assert server is not None
        base = server.http_url("/")

        # -- Alice (desktop) joins one room through the URL, two more from the room list --
        alice = _person_in(
            stack,
            browser,
            expect,
            f"{base}?room=lobby&name=Alice",
            "Alice",
            init_script=COUNT_SOCKETS,
            viewport={"width": 1180, "height": 760},
            device_scale_factor=2,
        )
        for room in ("ops", "random"):
            alice.page.locator("#add-room-input").fill(room)
            alice.page.locator("#add-room-input").press("Enter")
            expect(alice.page.locator("#room-name")).to_have_text(room)
        _wait_joined(alice, *rooms)
        expect(alice.page.locator("#rooms-pane li.room-item")).to_have_count(3)
        assert alice.page.evaluate("() => window.roomcast.session.ws.protocol") == "roomcast.batch"
        assert alice.page.evaluate("() => window.socketsOpened") == 1  # one for three rooms
        url = alice.page.url
        assert "room=random" in url and "rooms=lobby%2Cops%2Crandom" in url
        _switch(alice, "lobby")
        # anonymous: no direct messages, and the member list says why
        expect(alice.page.locator("#dm-hint")).to_contain_text("Sign in")
        expect(alice.page.locator(".dm-button")).to_have_count(0)

        # -- Bob (phone) is in the same three rooms through the address bar ----------------
        bob = _person_in(
            stack,
            browser,
            expect,
            f"{base}?room=ops&rooms=lobby,ops,random&name=Bob",
            "Bob",
            **PHONE,
        )
        _wait_joined(bob, *rooms)
        expect(bob.page.locator("#room-name")).to_have_text("ops")
        for text in ("deploy is green", "rolling back nothing today"):
            bob.send(text)
            sent["ops"].append(text)
        _switch(bob, "random")
        bob.send("lunch?")
        sent["random"].append("lunch?")

        # -- Alice, looking at #lobby, sees unread counts for the others -------------------
        expect(_room_item(alice, "ops").locator(".unread")).to_have_text("2")
        expect(_room_item(alice, "random").locator(".unread")).to_have_text("1")
        expect(_room_item(alice, "lobby").locator(".unread")).to_have_count(0)
        expect(alice.messages).to_have_count(0)  # #lobby's list: nothing was said there
        assert alice.page.title().startswith("(3) ")
        alice.page.locator("#text").fill("Morning all")
        alice.screenshot("rooms-unread-desktop")

        # switching shows that room's messages and members; the draft stays with #lobby
        _switch(alice, "ops")
        expect(alice.page.locator("#text")).to_have_value("")
        for text in sent["ops"]:
            expect(alice.message(text)).to_have_count(1)
        expect(alice.message("lunch?")).to_have_count(0)
        expect(_room_item(alice, "ops").locator(".unread")).to_have_count(0)
        expect(alice.member("Bob")).to_have_count(1)
        expect(alice.page.locator("#count")).to_have_text("2")
        alice.page.locator("#text").fill("On it")
        alice.screenshot("rooms-desktop")
        if not DOCS_SCREENSHOT.exists() or os.environ.get("ROOMCAST_UPDATE_SCREENSHOT") == "1":
            alice.page.screenshot(path=str(DOCS_SCREENSHOT), animations="disabled")
        alice.page.locator("#text").fill("")
        _switch(alice, "lobby")
        expect(alice.page.locator("#text")).to_have_value("Morning all")
        alice.page.locator("#text").press("Enter")
        sent["lobby"].append("Morning all")
        expect(alice.message("Morning all")).to_have_count(1)
        expect(_room_item(bob, "lobby").locator(".unread")).to_have_text("1")
        bob.page.locator("#rooms-toggle").click()
        expect(bob.page.locator("#rooms-pane")).to_be_in_viewport()
        bob.screenshot("rooms-phone")
        bob.page.locator("#scrim").click(position={"x": 370, "y": 400})
        expect(bob.page.locator("#rooms-pane")).not_to_be_in_viewport()
        bob.screenshot("chat-phone-rooms")

        # -- Alice's connection drops; Bob writes in every room; Alice resumes all three --
        alice.page.evaluate(
            "() => { const s = window.roomcast.session; s.attempt = 12; s.ws.close(); }"
        )
        expect(alice.status).to_have_attribute("data-state", "reconnecting")
        expect(bob.member("Alice")).to_have_count(0)  # the server has seen her go
        for room in rooms:
            _switch(bob, room)
            text = f"while Alice was away, in #{room}"
            bob.send(text)
            sent[room].append(text)
        alice.page.locator("#retry").click()
        expect(alice.status).to_have_attribute("data-state", "connected")
        _wait_joined(alice, *rooms)
        for room in rooms:
            _wait_room_texts(alice, room, sent[room])
        expect(_room_item(alice, "ops").locator(".unread")).to_have_text("1")
        expect(_room_item(alice, "random").locator(".unread")).to_have_text("2")  # + "lunch?"
        expect(alice.page.locator("#messages li.notice.gap")).to_have_count(0)

        # -- a reload restores the three rooms (their history, once) ----------------------
        alice.page.reload()
        expect(alice.status).to_have_attribute("data-state", "connected")
        _wait_joined(alice, *rooms)
        expect(alice.page.locator("#rooms-pane li.room-item")).to_have_count(3)
        expect(alice.page.locator("#room-name")).to_have_text("lobby")
        for room in rooms:
            _wait_room_texts(alice, room, sent[room])
        # history is not unread
        expect(alice.page.locator("#rooms-pane .unread")).to_have_count(0)

        # -- the server restarts: every room is resumed, nothing shown twice ---------------
        epochs = {
            room: alice.page.evaluate("n => window.roomcast.room(n).epoch", room) for room in rooms
        }
        port = server.port
        servers.stop()
        for person in (alice, bob):
            expect(person.status).to_have_attribute(
                "data-state", "reconnecting", timeout=RESTART_WAIT
            )
        servers.start(port=port)
        for person in (alice, bob):
            expect(person.status).to_have_attribute("data-state", "connected", timeout=RESTART_WAIT)
            _wait_joined(person, *rooms)
        for room in rooms:
            assert alice.page.evaluate("n => window.roomcast.room(n).epoch", room) != epochs[room]
            restart_notices = alice.page.evaluate(
                "n => window.roomcast.room(n).list.querySelectorAll('li.notice.restart').length",
                room,
            )
            assert restart_notices == 1, (room, restart_notices)
        for room in rooms:
            _switch(bob, room)
            text = f"after the restart, in #{room}"
            bob.send(text)
            sent[room].append(text)
        for room in rooms:
            _wait_room_texts(alice, room, sent[room])
            _wait_room_texts(bob, room, sent[room])
        _switch(alice, "random")
        alice.screenshot("rooms-after-restart-desktop")

        # leaving one room touches no other; leaving the last shows the join form
        alice.page.locator("#leave").click()
        expect(alice.page.locator("#rooms-pane li.room-item")).to_have_count(2)
        expect(bob.page.locator("#count")).to_have_text("2")  # Bob is in #random
        expect(alice.status).to_have_attribute("data-state", "connected")
        assert "random" not in alice.page.url
        for _ in range(2):
            alice.page.locator("#leave").click()
        expect(alice.page.locator("#join-form")).to_be_visible()
        _assert_clean(alice, bob)


def test_direct_messages_from_the_member_list_and_who_is_typing() -> None:
    from roomcast.identity import mint_token

    secret = "a-secret-of-at-least-thirty-two-bytes!"
    dm = "dm:ann:ben"
    with contextlib.ExitStack() as stack:
        expect, browser, servers = _launch(stack, {**SERVER_ENV, "ROOMCAST_JWT_SECRET": secret})
        assert servers.current is not None
        base = servers.current.http_url("/")

        def signed_in(sub: str, name: str, **options: Any) -> Person:
            token = mint_token(secret, sub=sub, name=name, ttl=600)
            return _person_in(
                stack, browser, expect, f"{base}?room=lobby#token={token}", name, **options
            )

        ann = signed_in(
            "ann", "Ann", viewport={"width": 1180, "height": 760}, device_scale_factor=2
        )
        ben = signed_in("ben", "Ben", **PHONE)
        for person in (ann, ben):
            expect(person.page.locator("#count")).to_have_text("2")
        # the member list gives each member's user id (welcome and notices carry people):
        # both can open a conversation at once, before either has written anything
        expect(ann.member("Ben").locator(".dm-button")).to_have_count(1)
        expect(ben.member("Ann").locator(".dm-button")).to_have_count(1)
        expect(ann.member("Ann").locator(".dm-button")).to_have_count(0)  # not with oneself
        expect(ben.page.locator("#dm-hint")).to_be_hidden()

        # Ann opens the conversation from the member list: dm:ann:ben, shown as "Ben"
        ann.member("Ben").locator(".dm-button").click()
        expect(ann.page.locator("#room-name")).to_have_text("Ben")
        expect(ann.page.locator("#room-sigil")).to_have_text("@")
        expect(_room_item(ann, dm)).to_have_count(1)
        expect(_room_item(ann, dm).locator(".room-label")).to_have_text("Ben")
        expect(ann.page.locator("#dms-head")).to_be_visible()
        _wait_joined(ann, dm)
        # Ben's page hears of it (roomcast's notice): the conversation joins his list,
        # marked new, while he stays where he is
        expect(_room_item(ben, dm).locator(".room-label")).to_have_text("Ann")
        expect(_room_item(ben, dm).locator(".unread")).to_have_text("new")
        expect(ben.page.locator("#rooms-toggle-unread")).to_have_text("1")
        expect(ben.page.locator("#room-name")).to_have_text("lobby")
        _wait_joined(ben, dm)
        ann.send("Just between us: the release slips a day.")
        expect(ann.message("Just between us: the release slips a day.")).to_have_count(1)
        expect(_room_item(ben, dm).locator(".unread")).to_have_text("1")

        # Ben opens it from his side (phone: the member drawer), reads it and answers
        ben.page.locator("#members-toggle").click()
        ben.member("Ann").locator(".dm-button").click()
        expect(ben.page.locator("#room-name")).to_have_text("Ann")
        expect(ben.message("Just between us: the release slips a day.")).to_have_count(1)
        expect(ben.page.locator("#count")).to_have_text("2")
        expect(_room_item(ben, dm).locator(".unread")).to_have_count(0)
        ben.send("Thanks for telling me first.")
        expect(ann.message("Thanks for telling me first.")).to_have_count(1)

        # typing: shown to the other page, for the room in view, for about 3 s
        # (slowly enough to last over a second: Ann's page sent one while writing above)
        ann.page.locator("#text").press_sequentially("Also, the", delay=150)
        expect(ben.page.locator("#typing")).to_have_text("Ann is typing…")
        expect(ann.page.locator("#typing")).to_have_text("")  # never oneself
        ben.screenshot("dm-typing-phone")
        expect(ben.page.locator("#typing")).to_have_text("", timeout=WAIT)
        ann.page.locator("#text").press("Enter")
        expect(ben.message("Also, the")).to_have_count(1)
        # at most one typing event a second, whatever the typing speed
        typed = ann.page.evaluate(
            """async () => {
                 const ws = window.roomcast.session.ws, send = ws.send.bind(ws);
                 let typing = 0;
                 ws.send = (frame) => {
                   if (JSON.parse(frame).type === 'typing') typing++;
                   send(frame);
                 };
                 const box = document.getElementById('text');
                 for (let i = 0; i < 40; i++) {
                   box.value += 'x';
                   box.dispatchEvent(new Event('input'));
                   await new Promise(r => setTimeout(r, 50));
                 }
                 ws.send = send;
                 return typing;
               }"""
        )
        assert 1 <= typed <= 3, typed
        ann.page.locator("#text").fill("")

        # a DM message while Ben looks at #lobby: unread on the conversation
        _switch(ben, "lobby")
        ann.send("ping")
        expect(_room_item(ben, dm).locator(".unread")).to_have_text("1")
        expect(ben.page.locator("#rooms-toggle-unread")).to_have_text("1")
        ben.screenshot("dm-unread-phone")
        ann.screenshot("dm-desktop")

        # someone else cannot get into their conversation
        cy_token = mint_token(secret, sub="cy", name="Cy", ttl=600)
        cy = Person(browser, expect, "Cy", viewport={"width": 900, "height": 600})
        stack.callback(cy.close)
        cy.page.goto(f"{base}?room={dm}#token={cy_token}")
        expect(cy.page.locator("#join-form")).to_be_visible()
        expect(cy.page.locator("#join-error")).to_contain_text("direct conversation")
        _assert_clean(ann, ben, cy)
