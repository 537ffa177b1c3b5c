"""The ``roomcast`` command: the server by default, and its companions.

::

    roomcast [serve options]                 the server (roomcast --help)
    roomcast chat URL ...                    the terminal client
    roomcast publish URL --room R TEXT       publish through the server API
    roomcast history URL --room R [--before [S]]  a room's messages, as JSON lines (paging back)
    roomcast token --sub U [--rooms P]       mint a signed token (ROOMCAST_JWT_SECRET)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["main"]


def _chat(argv: list[str]) -> int:
    from .chat import main

    return main(argv)


def _publish(argv: list[str]) -> int:
    from .tools import publish_main

    return publish_main(argv)


def _history(argv: list[str]) -> int:
    from .tools import history_main

    return history_main(argv)


def _token(argv: list[str]) -> int:
    from .tools import token_main

    return token_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "chat": _chat,
    "publish": _publish,
    "history": _history,
    "token": _token,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = COMMANDS.get(args[0]) if args else None
    if command is not None:
        return command(args[1:])
    from .launcher import main as serve

    return serve(args)
