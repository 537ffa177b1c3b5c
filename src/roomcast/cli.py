"""The ``roomcast`` command: ``roomcast [serve options]`` runs the server,
``roomcast chat URL`` runs the terminal client."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["chat"]:
        from .chat import main as chat_main

        return chat_main(args[1:])
    from .launcher import main as serve_main

    return serve_main(args)
