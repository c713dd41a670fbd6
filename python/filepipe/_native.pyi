"""The Rust hot path. Every function takes and returns a whole batch."""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import final

__all__ = [
    "COPY_COLUMNS",
    "SNIFF_BYTES",
    "EntryBatch",
    "Measurements",
    "Reply",
    "ReplyReader",
    "__version__",
    "encode_copy",
    "entry_ids",
    "format_timestamp",
    "measure_local",
    "parse_entries",
    "reason_codes",
    "sniff_content_type",
]

__version__: str
COPY_COLUMNS: list[str]
"""The staging table's columns, in the order every COPY buffer carries them."""
SNIFF_BYTES: int
"""How many leading bytes content sniffing looks at."""

_Fields = Mapping[bytes, bytes] | Mapping[str, str] | list[bytes] | None
_Measurement = tuple[int, bytes, str | None] | None

@final
class EntryBatch:
    """The validated entries of one XREADGROUP reply, kept on the Rust side."""

    def __len__(self) -> int:
        """How many entries were accepted."""
    @property
    def rejects(self) -> list[tuple[int, str, str, str]]:
        """(input position, entry id, reason code, message) of every rejected entry."""
    @property
    def positions(self) -> list[int]:
        """Input position of each accepted record."""
    @property
    def input_bytes(self) -> int:
        """Bytes of the input entries' ids, field names and values, rejected entries included."""
    @property
    def last_input_bytes(self) -> int:
        """Bytes of the last input entry (id, field names and values)."""
    def locations(self) -> list[tuple[str, str]]:
        """(storage, key) of each accepted record."""
    def by_storage(self) -> list[tuple[str, list[int]]]:
        """(storage, record indices) of each storage the batch names, in record order."""
    def records(self) -> list[dict[str, object]]:
        """The accepted records as dicts (for inspection and tests)."""

@final
class Measurements:
    """What was measured of each accepted record's file, by record index."""

    def __new__(cls, count: int) -> Measurements:
        """`count` records, none measured yet."""
    def __len__(self) -> int:
        """How many records (measured or not)."""
    def set(self, index: int, size: int, sha256: bytes, content_type: str | None = None) -> None:
        """Records a measurement (sha256 is the 32-byte digest)."""
    def fail(self, index: int, reason: str, message: str, transient: bool = False) -> None:
        """Marks a record as failed with a reason code; it is not encoded."""
    def failures(self) -> list[tuple[int, str, str, bool]]:
        """(record index, reason, message, transient) of every failed record."""
    def measured(self) -> list[int]:
        """Indices of the records measured successfully."""
    def get(self, index: int) -> tuple[int, bytes, str | None] | None:
        """(size, sha256 digest, content type) of a record, or None."""

@final
class Reply(Sequence[tuple[bytes, list[bytes] | None]]):
    """The entries of one XREADGROUP reply on one stream, kept in the bytes Redis sent:
    a sequence of `(id, [name, value, …] | None)` whose items are made only when asked
    for (None: read without fields, deleted from the stream while pending)."""

    def __len__(self) -> int:
        """How many entries the reply holds."""
    def __getitem__(self, index: int, /) -> tuple[bytes, list[bytes] | None]:  # type: ignore[override]
        """Entry `index` (negative: from the end)."""
    def __iter__(self) -> Iterator[tuple[bytes, list[bytes] | None]]:
        """Every entry, made at once (for the rare paths: filtering, dead letters)."""
    @property
    def stream(self) -> bytes:
        """The stream the entries were read from."""
    @property
    def nbytes(self) -> int:
        """The size of the reply, in bytes."""

@final
class ReplyReader:
    """Collects the bytes of one reply as a socket delivers them, and tells when the
    reply is complete."""

    def __new__(cls) -> ReplyReader:
        """A reader waiting for the first bytes of a reply."""
    def feed(self, chunk: bytearray | bytes, n: int) -> bool:
        """Appends the first `n` bytes of `chunk`. True once a whole reply is in, or once
        the bytes are not a reply this reader knows (`take` gives them back then)."""
    def take(self) -> tuple[Reply | None, bytes]:
        """The reply collected and the bytes read past it; the reader starts afresh. The
        reply is a Reply if it is an XREADGROUP reply on one stream; otherwise None, and
        the bytes are all that was read, for another parser."""

_Entries = Reply | Iterable[tuple[bytes | str, _Fields] | list[object]]

def entry_ids(
    entries: Reply | Iterable[tuple[bytes, object] | list[object]],
) -> tuple[list[bytes], list[bytes]]:
    """The ids of a reply's entries, and of those read without fields (None or empty:
    deleted from the stream while pending), with no Python code run per entry.

    Raises EntryError if an item is not an (id, fields) pair."""

def parse_entries(
    entries: _Entries,
    default_storage: str = "local",
    id_prefix: str = "",
    max_fields: int | None = None,
    max_bytes: int | None = None,
) -> EntryBatch:
    """Validates a batch of stream entries (a Reply, read where it is, or (id, fields)
    pairs) against the event contract, in time linear in its size, with the GIL released
    for the parse. An entry with more than `max_fields`
    fields or more than `max_bytes` bytes (id, field names and values) is rejected
    (`too_many_fields`, `entry_too_large`) without being copied; None: no cap.

    Raises EntryError if the batch itself is malformed (not (id, fields) pairs);
    a bad entry is a reject, never an exception."""

def measure_local(
    batch: EntryBatch, root: str, max_bytes: int, threads: int = 4, into: Measurements | None = None
) -> Measurements:
    """Measures every local-storage record's file (size, SHA-256, sniffed content type)
    beneath `root`, on up to `threads` threads with the GIL released.

    Raises StorageError if `root` cannot be opened."""

def encode_copy(
    batch: EntryBatch,
    measurements: Measurements | Sequence[_Measurement],
    consumer: str,
    binary: bool = True,
    only: Sequence[int] | None = None,
    *,
    stream: str,
) -> bytes:
    """Encodes the measured records into one COPY buffer (binary or text format),
    with the GIL released. `only` restricts it to the given record indices. `stream`
    (the logical stream name, part of each row's key) and `consumer` go into every row."""

def sniff_content_type(head: bytes) -> str:
    """The content type of a file from its first bytes."""

def format_timestamp(us: int) -> str:
    """Microseconds since the epoch as PostgreSQL prints a UTC timestamptz."""

def reason_codes() -> list[str]:
    """Every reason code the extension can produce."""

def file_reads() -> str:
    """How local files are read: a chunk at a time through io_uring, or one system call
    at a time (and why), or "not yet" before the first batch was measured."""
