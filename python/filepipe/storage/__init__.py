"""Where files live: a local directory or an S3 bucket."""

from __future__ import annotations

from ..config import Settings
from .base import Storage, key_problem, safe_key_name
from .local import LocalStorage


def open_storage(settings: Settings, mode: str | None = None) -> Storage:
    """The storage backend for `mode` (default: the configured STORAGE_MODE)."""
    mode = mode or settings.storage_mode
    if mode == "s3":
        from .s3 import S3Storage

        return S3Storage.from_settings(settings)
    return LocalStorage.from_settings(settings)


__all__ = ["LocalStorage", "Storage", "key_problem", "open_storage", "safe_key_name"]
