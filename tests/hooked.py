"""An app with every hook, for the hook tests: in process (``build(record)``) and on real
servers (``roomcast --app hooked:app``, tests/ on PYTHONPATH; settings from ``ROOMCAST_*``).

What each hook does is chosen by what the client sends, so one app serves every test:

- ``connect``: a ``session`` cookie ``banned`` is refused with 4010; another ``session``
  cookie logs in as that user (name ``User <session>``); no cookie: the tokens decide.
- ``join``: room ``vault`` is refused ("members only"); room ``broken-join`` raises.
- ``message``: ``sleep:S`` sleeps S seconds then passes; ``raise`` raises; ``refuse:CODE``
  refuses with CODE; ``rewrite:TEXT`` becomes ``TEXT`` upper-cased with
  ``data={"original": TEXT}``; anything else passes unchanged.
- ``stored`` and ``leave``: recorded; on real servers ``stored`` appends one JSON line per
  message to ``$HOOKED_STORED_DIR/<pid>.jsonl`` (when set), so a test can count them
  across processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import anyio

import roomcast
from roomcast import (
    ConnectRequest,
    Identity,
    JoinRequest,
    LeaveEvent,
    MessageRequest,
    Refuse,
    Rewrite,
    StoredMessage,
)

Record = Callable[[str, object], None]


def build(record: Record, settings: roomcast.Settings | None = None) -> roomcast.RoomcastApp:
    """The app; ``record(hook, event)`` sees every ``stored`` and ``leave`` call."""
    hooks = roomcast.Hooks()

    @hooks.connect
    async def connect(request: ConnectRequest) -> Identity | Refuse | None:
        session = request.cookies.get("session")
        if session is None:
            return None
        if session == "banned":
            return Refuse(4010, "banned from this chat")
        return Identity(session, f"User {session}", None, float("inf"))

    @hooks.join
    async def join(request: JoinRequest) -> Refuse | None:
        if request.room == "broken-join":
            raise RuntimeError("the membership table is gone")
        return Refuse(reason="members only") if request.room == "vault" else None

    @hooks.message
    async def message(request: MessageRequest) -> Rewrite | Refuse | None:
        command, _, argument = request.text.partition(":")
        if command == "sleep":
            await anyio.sleep(float(argument))
        elif command == "raise":
            raise ValueError("the moderation service is down")
        elif command == "refuse":
            return Refuse(argument, f"not here: {argument}")
        elif command == "rewrite":
            return Rewrite(argument.upper(), {"original": argument})
        return None

    @hooks.stored
    async def stored(message: StoredMessage) -> None:
        record("stored", message)

    @hooks.leave
    async def leave(event: LeaveEvent) -> None:
        record("leave", event)

    return roomcast.create_app(settings, hooks=hooks)


def _to_file(hook: str, event: object) -> None:
    directory = os.environ.get("HOOKED_STORED_DIR")
    if hook == "stored" and directory and dataclasses.is_dataclass(event):
        line = json.dumps({**dataclasses.asdict(event), "pid": os.getpid()})  # type: ignore[arg-type]
        with open(os.path.join(directory, f"{os.getpid()}.jsonl"), "a") as file:
            file.write(line + "\n")


app = build(_to_file)  # for `roomcast --app hooked:app`
