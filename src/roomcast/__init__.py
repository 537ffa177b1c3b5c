"""roomcast: a real-time chat server on ASGI, built on structured concurrency."""

from .app import RoomcastApp, create_app
from .settings import Settings, SettingsError

__all__ = ["RoomcastApp", "Settings", "SettingsError", "create_app"]
__version__ = "0.1.0"
