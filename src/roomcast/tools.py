"""``roomcast publish`` and ``roomcast history``: the server API from a shell, for cron jobs
and scripts (``ROOMCAST_API_KEY`` in the environment, or ``--key``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Final

import anyio
import httpx

from .client.api import ApiRefused, ServerAPI, open_server_api

__all__ = ["history_main", "publish_main"]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
#: ``--before`` given alone: past any room's latest seq, so the newest page
NEWEST: Final = 10**18 - 1


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("url", metavar="URL", help="the server, http(s)://host:port[/prefix]")
    parser.add_argument("--room", required=True, help="the room")
    parser.add_argument(
        "--key",
        default=os.environ.get("ROOMCAST_API_KEY") or None,
        help="the server's API key (default: $ROOMCAST_API_KEY)",
    )
    return parser


def publish_main(argv: list[str]) -> int:
    """``roomcast publish URL --room R TEXT``: prints the message's seq."""
    parser = _parser("roomcast publish", "Publish a message into a room through the server API.")
    parser.add_argument("text", metavar="TEXT", help="the message")
    parser.add_argument("--from", dest="sender", help="display name to show it from")
    parser.add_argument("--id", help="an id of yours, echoed in the message event")
    args = parser.parse_args(argv)

    async def publish() -> str:
        async with open_server_api(args.url, args.key) as api:
            seq = await api.publish(args.room, args.text, sender=args.sender, id=args.id)
        return str(seq)

    return _run(parser, args.key, publish)


def history_main(argv: list[str]) -> int:
    """``roomcast history URL --room R``: prints messages as JSON lines, oldest first: after
    ``--since`` (forwards), or the page before ``--before`` (backwards; ``--before`` alone:
    the newest page), telling on stderr the ``--before`` of the page before it."""
    parser = _parser("roomcast history", "Print a room's messages, one JSON per line.")
    parser.add_argument("--since", type=int, help="messages after this seq (default: 0)")
    parser.add_argument(
        "--before",
        type=int,
        nargs="?",
        const=NEWEST,
        help="page backwards: the messages before this seq (alone: the newest)",
    )
    parser.add_argument(
        "--limit", type=int, help="at most this many (default 100, <= 1000; --before: 50, <= 200)"
    )
    args = parser.parse_args(argv)
    if args.since is not None and args.before is not None:
        parser.error("give --since (forwards) or --before (backwards), not both")

    async def history() -> str:
        async with open_server_api(args.url, args.key) as api:
            if args.before is not None:
                return await _page_before(api, args.room, args.before, args.limit or 50)
            page = await api.history(args.room, since=args.since or 0, limit=args.limit or 100)
        return "\n".join(message.raw for message in page.messages)  # as the API sent them

    return _run(parser, args.key, history)


async def _page_before(api: ServerAPI, room: str, before: int, limit: int) -> str:
    """One page backwards as JSON lines; where the page before it starts goes to stderr
    (stdout stays JSON lines), or that this is the room's beginning."""
    page = await api.scrollback(room, before=before, limit=limit)
    if page.more:
        print(f"more: --before {page.messages[0].seq}", file=sys.stderr)
    else:
        print("the beginning of the room's history", file=sys.stderr)
    return "\n".join(message.raw for message in page.messages)


def _run(
    parser: argparse.ArgumentParser, key: str | None, call: Callable[[], Awaitable[str]]
) -> int:
    if not key:
        parser.error("no API key: pass --key or set ROOMCAST_API_KEY")
    try:
        output = anyio.run(call)
    except ApiRefused as refused:
        print(f"roomcast: {refused}", file=sys.stderr)
        return EXIT_REFUSED
    except (httpx.TransportError, ValueError) as exc:
        print(f"roomcast: cannot reach the server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if output:
        print(output)
    return EXIT_OK


def token_main(argv: list[str]) -> int:
    """``roomcast token --sub ann [--name Ann] [--rooms 'team-*'] [--ttl 1h]``: prints a
    token signed with ``ROOMCAST_JWT_SECRET`` (with the configured audience and issuer)."""
    from .identity import TokenRejected, identity_from_claims, mint_token
    from .settings import Settings, SettingsError

    parser = argparse.ArgumentParser(
        prog="roomcast token",
        description="Mint a signed token (HS256, from ROOMCAST_JWT_SECRET) for a user: "
        "for operators and local testing; applications mint their own.",
    )
    parser.add_argument("--sub", required=True, help="the user id")
    parser.add_argument("--name", help="display name (default: the user id)")
    parser.add_argument(
        "--rooms", action="append", help="a room it may enter, * as wildcard (repeatable)"
    )
    parser.add_argument(
        "--ttl",
        type=_duration,
        default=3600.0,
        help="lifetime: 90s, 30m, 1h, 2d; negative (-5m) mints an already expired token",
    )
    args = parser.parse_args(_negative_values_attached(argv, "--ttl"))
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"roomcast: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings.jwt_secret is None:
        parser.error(
            "ROOMCAST_JWT_SECRET is not set (public-key tokens are minted by their issuer)"
        )
    claims = {"sub": args.sub, "name": args.name, "rooms": args.rooms, "exp": 0}
    try:  # what the server checks after the signature: no token it would refuse
        identity_from_claims(claims)
    except TokenRejected as exc:
        parser.error(f"the server would refuse this token: {exc.reason}")
    print(
        mint_token(
            settings.jwt_secret,
            sub=args.sub,
            ttl=args.ttl,
            name=args.name,
            rooms=args.rooms,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
        )
    )
    return EXIT_OK


_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _negative_values_attached(argv: list[str], option: str) -> list[str]:
    """``argv`` with ``option VALUE`` written ``option=VALUE`` where VALUE starts with a
    dash: argparse would take ``-5m`` for an option and say "expected one argument"."""
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] == option and arg.startswith("-"):
            joined[-1] = f"{option}={arg}"
        else:
            joined.append(arg)
    return joined


def _duration(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``1h``, ``2d`` or a bare number; negative is fine (a
    token that expired that long ago, to test how clients handle one)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 90s, 30m, 1h or -5m, got {text!r}"
        )
    return seconds
