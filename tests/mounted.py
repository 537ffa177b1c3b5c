"""roomcast mounted in a host app, the conventional way (README, "Use it from your backend")."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import roomcast


def build() -> Starlette:
    chat = roomcast.create_app()

    async def home(request: object) -> PlainTextResponse:
        return PlainTextResponse("the host app")

    return Starlette(
        routes=[Route("/", home), Mount("/chat", app=chat)],
        lifespan=chat.lifespan,
    )


app = build()  # for `roomcast --app mounted:app` (tests/ on PYTHONPATH)
