"""filepipe: moves "file uploaded" events from a Redis stream into PostgreSQL/TimescaleDB."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ConfigError,
    DatabaseError,
    EntryError,
    FilepipeError,
    StorageError,
    TransientError,
)

if TYPE_CHECKING:
    from .config import Settings, load_settings

__version__: str

__all__ = [
    "ConfigError",
    "DatabaseError",
    "EntryError",
    "FilepipeError",
    "Settings",
    "StorageError",
    "TransientError",
    "__version__",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    """`__version__`, `Settings` and `load_settings`, loaded when first asked for: importing
    the package stays quick, so that `filepipe consume` has its signal handlers within
    milliseconds of starting (see `shutdown`)."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("filepipe")
        except PackageNotFoundError:  # running from a source tree without installing
            value = "0.0.0"
        globals()["__version__"] = value
        return value
    if name in ("Settings", "load_settings"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'filepipe' has no attribute {name!r}")
