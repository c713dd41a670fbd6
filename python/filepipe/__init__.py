"""filepipe: moves "file uploaded" events from a Redis stream into PostgreSQL/TimescaleDB."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("filepipe")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

from .config import Settings, load_settings
from .errors import (
    ConfigError,
    DatabaseError,
    EntryError,
    FilepipeError,
    StorageError,
    TransientError,
)

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
