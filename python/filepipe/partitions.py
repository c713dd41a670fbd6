"""Partitioned streams: one logical stream spread over P Redis streams.

With `STREAM_PARTITIONS=P` (P > 0) the producer puts each event on partition
`crc32(file_id) mod P`, a stable hash: the same file id always lands on the same
partition, whatever the host or the Python version. Every consumer reads every
partition. Partition i is the stream `<stream>:{i}`; its dead letters go to
`<stream>:{i}:dead` and its consumers' heartbeats to keys ending in
`<stream>:{i}:<consumer>`. The `{i}` is a Redis Cluster hash tag: a partition and
everything that belongs to it live in one hash slot, so one script or MULTI/EXEC can
write a dead letter and acknowledge an entry atomically, and different partitions
can live on different masters.

With P = 0 (the default) there is one stream, `<stream>`, with `<stream>:dead`
(or DEAD_LETTER_STREAM): the layout of an unpartitioned deployment, unchanged.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from . import constants as c
from .config import Settings


@dataclass(frozen=True)
class Partition:
    """One stream a consumer reads, with the names that belong to it."""

    index: int | None  # None: the single, unpartitioned stream
    stream: str
    dead_stream: str
    id_prefix: str = ""  # put before entry ids in the stream_id column


def partitions(settings: Settings) -> list[Partition]:
    """Every stream of `settings`: `[<stream>]`, or its P partitions in order."""
    if not settings.partitions:
        return [Partition(None, settings.stream, settings.dead_stream)]
    return [
        Partition(
            i,
            c.partition_stream(settings.stream, i),
            c.partition_dead_stream(settings.stream, i),
            c.partition_id_prefix(i),
        )
        for i in range(settings.partitions)
    ]


def partition_index(file_id: str | bytes, count: int) -> int:
    """The partition of an event: crc32 of its `file_id` (UTF-8 bytes) mod `count`."""
    data = file_id.encode() if isinstance(file_id, str) else file_id
    return zlib.crc32(data) % count


def stream_for(settings: Settings, file_id: str | bytes | None) -> str:
    """The stream an event with this `file_id` is added to. An event without one (it
    will be dead-lettered) goes to partition 0."""
    if not settings.partitions:
        return settings.stream
    index = partition_index(file_id, settings.partitions) if file_id else 0
    return c.partition_stream(settings.stream, index)
