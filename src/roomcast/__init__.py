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
    from .settings import Settings, SettingsError

__all__ = ["RoomcastApp", "Settings", "SettingsError", "create_app"]
__version__ = "0.1.0"

#: each public name, and the module that defines it
_HOMES = {
    "RoomcastApp": ".app",
    "create_app": ".app",
    "Settings": ".settings",
    "SettingsError": ".settings",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # once: later lookups find it without this function
    return value
