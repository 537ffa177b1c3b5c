"""roomcast with a pass-through ``message`` hook (``roomcast-trio-batch-hooked`` in
bench/servers.py): what calling an application's hook in every sender's task costs
(a task-local time limit and an answer check per message), next to
``roomcast-trio-batch`` in the same run."""

from __future__ import annotations

import roomcast

hooks = roomcast.Hooks()


@hooks.message
async def pass_through(request: roomcast.MessageRequest) -> None:
    """Accept every message as sent."""
    return None


app = roomcast.create_app(hooks=hooks)
