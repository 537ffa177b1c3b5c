"""roomcast: a real-time chat server on ASGI, built on structured concurrency.

Its names are imported on first use (PEP 562), not with the package: ``python -m
roomcast`` imports this package in its master process too, which serves no app and
stays small (sockets, signals and its workers), while each worker imports the app.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import RoomcastApp, create_app
    from .hooks import (
        ConnectRequest,
        Hooks,
        JoinRequest,
        LeaveEvent,
        MessageRequest,
        Refuse,
        Rewrite,
    )
    from .identity import Identity
    from .settings import Settings, SettingsError
    from .stored import StoredMessage

__all__ = [
    "ConnectRequest",
    "Hooks",
    "Identity",
    "JoinRequest",
    "LeaveEvent",
    "MessageRequest",
    "Refuse",
    "Rewrite",
    "RoomcastApp",
    "Settings",
    "SettingsError",
    "StoredMessage",
    "create_app",
]
__version__ = "0.1.0"

#: each public name, and the module that defines it
_HOMES = {
    "RoomcastApp": ".app",
    "create_app": ".app",
    "ConnectRequest": ".hooks",
    "Hooks": ".hooks",
    "JoinRequest": ".hooks",
    "LeaveEvent": ".hooks",
    "MessageRequest": ".hooks",
    "Refuse": ".hooks",
    "Rewrite": ".hooks",
    "Identity": ".identity",
    "Settings": ".settings",
    "SettingsError": ".settings",
    "StoredMessage": ".stored",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value
