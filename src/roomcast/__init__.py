"""roomcast: a real-time chat server on ASGI, built on structured concurrency."""

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
