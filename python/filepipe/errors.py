"""The exceptions filepipe raises. The Rust extension raises these same classes."""

from __future__ import annotations


class FilepipeError(Exception):
    """Base class of every error filepipe reports to its user."""


class ConfigError(FilepipeError):
    """The configuration (environment, .env or options) is missing or invalid."""


class SchemaError(ConfigError):
    """The events table does not have the layout this version loads (`filepipe init-db` fixes it)."""


class EntryError(FilepipeError):
    """A stream entry or a batch of them is not in the expected shape."""


class StorageError(FilepipeError):
    """The storage backend (local directory or S3) cannot be used."""


class DatabaseError(FilepipeError):
    """PostgreSQL refused an operation for a reason that retrying will not fix."""


class TransientError(FilepipeError):
    """A service is unreachable or overloaded for now; the operation is retried."""


class GaveUp(FilepipeError):
    """A service stayed unreachable (or the table refused rows) longer than `--drain` waits."""


class NotPreloadedError(ConfigError):
    """TimescaleDB is installed on the server but not in `shared_preload_libraries`."""
