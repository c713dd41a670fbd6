"""The dead-letter stream: list what is there, replay it after a fix, purge it."""

# No `from __future__ import annotations`: the CLI functions defined inside
# `register_cli` need their annotations evaluated where they are defined.

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis

from .config import Settings
from .partitions import Partition, partitions
from .stream import id_key

# Fields the consumer adds to a dead letter; the rest are the entry's own.
ADDED = (b"error", b"reason", b"consumer", b"deliveries", b"source_id")
CHUNK = 500


@dataclass(frozen=True)
class DeadLetterEntry:
    id: bytes
    fields: dict[bytes, bytes]

    @property
    def reason(self) -> str:
        return self.fields.get(b"reason", b"unknown").decode(errors="replace")

    def original(self) -> dict[bytes, bytes]:
        """The entry's own fields, as they were when it was rejected."""
        out = {k: v for k, v in self.fields.items() if k not in ADDED and not k.startswith(b"orig_")}
        for k, v in self.fields.items():
            if k.startswith(b"orig_") and k[5:] in ADDED:
                out[k[5:]] = v
        return out

    def summary(self) -> dict[str, Any]:
        f = self.fields
        return {
            "id": self.id.decode(),
            "source_id": f.get(b"source_id", b"").decode(errors="replace"),
            "reason": self.reason,
            "error": f.get(b"error", b"").decode(errors="replace"),
            "consumer": f.get(b"consumer", b"").decode(errors="replace"),
            "deliveries": int(f.get(b"deliveries", b"0") or 0),
            "filename": f.get(b"filename", b"").decode(errors="replace"),
        }


def scan(r: redis.Redis, dead_stream: str) -> Iterator[DeadLetterEntry]:
    """Every dead letter, oldest first, read in chunks."""
    start = b"-"
    while True:
        reply = r.xrange(dead_stream, min=start, max="+", count=CHUNK)
        rows = cast("list[tuple[bytes, dict[bytes, bytes]]]", reply)
        if not rows:
            return
        for entry_id, fields in rows:
            yield DeadLetterEntry(entry_id, fields)
        if len(rows) < CHUNK:
            return
        start = b"(" + rows[-1][0]


def matching(
    r: redis.Redis, dead_stream: str, reason: str | None, ids: list[str] | None
) -> Iterator[DeadLetterEntry]:
    """Dead letters with the given reason and/or dead-letter (or source) ids."""
    wanted = {i.encode() for i in ids or []}
    for d in scan(r, dead_stream):
        if reason is not None and d.reason != reason:
            continue
        if wanted and d.id not in wanted and d.fields.get(b"source_id") not in wanted:
            continue
        yield d


def summarize(r: redis.Redis, dead_stream: str | list[str], recent: int = 10) -> dict[str, Any]:
    """Counts by reason and the most recent dead letters, of one dead-letter stream or
    of several (every partition's)."""
    streams = [dead_stream] if isinstance(dead_stream, str) else dead_stream
    counts: Counter[str] = Counter(d.reason for s in streams for d in scan(r, s))
    rows: list[tuple[bytes, dict[bytes, bytes]]] = []
    for s in streams if recent else []:
        rows += cast("list[tuple[bytes, dict[bytes, bytes]]]", r.xrevrange(s, count=recent) or [])
    latest = sorted(rows, key=lambda row: id_key(row[0]), reverse=True)[:recent]
    name = dead_stream if isinstance(dead_stream, str) else _shown(streams)
    return {"stream": name, "total": sum(counts.values()), "by_reason": dict(counts.most_common()),
            "recent": [DeadLetterEntry(i, f).summary() for i, f in latest]}


def _shown(streams: list[str]) -> str:
    """`file_uploads:{0}:dead … file_uploads:{7}:dead`, or the one name."""
    return streams[0] if len(streams) == 1 else f"{streams[0]} … {streams[-1]}"


def replay(r: redis.Redis, settings: Settings, entries: Iterator[DeadLetterEntry],
           part: Partition | None = None) -> int:
    """Puts dead letters back on the stream with their original fields and removes them
    from the dead-letter stream, each chunk in one MULTI/EXEC: a crash replays a chunk
    entirely or not at all. With partitions, `part` says which: its dead letters go back
    to it (the same hash slot, so the transaction stays on one node)."""
    target, dead_stream = (part.stream, part.dead_stream) if part else (settings.stream, settings.dead_stream)
    total = 0
    chunk: list[DeadLetterEntry] = []

    def flush() -> None:
        nonlocal total
        if not chunk:
            return
        pipe = r.pipeline(transaction=True)
        for d in chunk:
            pipe.xadd(target, d.original())  # type: ignore[arg-type]
        pipe.xdel(dead_stream, *[d.id for d in chunk])
        pipe.execute()
        total += len(chunk)
        chunk.clear()

    for d in entries:
        chunk.append(d)
        if len(chunk) >= CHUNK:
            flush()
    flush()
    return total


def purge(r: redis.Redis, dead_stream: str, entries: Iterator[DeadLetterEntry] | None) -> int:
    """Deletes the given dead letters, or the whole dead-letter stream."""
    if entries is None:
        n = int(r.xlen(dead_stream))
        r.delete(dead_stream)
        return n
    total = 0
    ids = [d.id for d in entries]
    for i in range(0, len(ids), CHUNK):
        total += int(r.xdel(dead_stream, *ids[i : i + CHUNK]))
    return total


def register_cli(app: Any, handle_errors: Callable[[Any], Any]) -> None:
    """Adds `filepipe dlq list|replay|purge`."""
    from typing import Annotated

    import typer

    from .cli import Debug, Partitions, RedisUrl, Stream, settings_from
    from .errors import TransientError

    dlq_app = typer.Typer(help="Inspect, replay and purge the dead-letter stream.", no_args_is_help=True)
    app.add_typer(dlq_app, name="dlq")

    Reason = Annotated[str | None, typer.Option("--reason", help="Only dead letters with this reason code.",
                                                show_default=False)]
    Ids = Annotated[list[str] | None, typer.Option("--id", help="Only this dead-letter or source entry id "
                                                   "(repeatable).", show_default=False)]

    def connect(s: Settings) -> redis.Redis:
        from .stream import connect as connect_redis

        r = connect_redis(s, socket_timeout=10)
        try:
            r.ping()
        except redis.ConnectionError as e:
            from .config import mask_url
            from .redaction import error_line

            raise TransientError(f"cannot reach Redis at {mask_url(s.redis_url)}: {error_line(e)}") from e
        return r

    @dlq_app.command("list")
    @handle_errors
    def list_cmd(
        recent: Annotated[
            int, typer.Option("--recent", min=0, help="How many recent dead letters to show.")
        ] = 10,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
        redis_url: RedisUrl = None,
        stream: Stream = None,
        partitions_: Partitions = None,
        debug: Debug = False,
    ) -> None:
        """Dead letters by reason, and the most recent ones."""
        s = settings_from(redis_url=redis_url, stream=stream, partitions=partitions_)
        summary = summarize(connect(s), [p.dead_stream for p in partitions(s)], recent)
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        typer.echo(f"DEAD LETTERS in {summary['stream']}: {summary['total']}")
        for reason, n in summary["by_reason"].items():
            typer.echo(f"  {reason:<18} {n:>8}")
        if summary["recent"]:
            typer.echo("\nMost recent:")
            for d in summary["recent"]:
                typer.echo(f"  {d['id']}  (source {d['source_id']})  {d['reason']}: {d['error']}")

    @dlq_app.command("replay")
    @handle_errors
    def replay_cmd(
        reason: Reason = None,
        ids: Ids = None,
        redis_url: RedisUrl = None,
        stream: Stream = None,
        partitions_: Partitions = None,
        debug: Debug = False,
    ) -> None:
        """Put dead letters back on the stream (after fixing what rejected them)."""
        s = settings_from(redis_url=redis_url, stream=stream, partitions=partitions_)
        r = connect(s)
        parts = partitions(s)
        n = sum(replay(r, s, matching(r, p.dead_stream, reason, ids), p) for p in parts)
        where = s.stream if not s.partitions else f"{s.stream} ({s.partitions} partitions)"
        typer.echo(f"✓ Replayed {n} dead letters onto {where}")

    @dlq_app.command("purge")
    @handle_errors
    def purge_cmd(
        reason: Reason = None,
        ids: Ids = None,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
        redis_url: RedisUrl = None,
        stream: Stream = None,
        partitions_: Partitions = None,
        debug: Debug = False,
    ) -> None:
        """Delete dead letters (all of them, or those matching --reason / --id)."""
        s = settings_from(redis_url=redis_url, stream=stream, partitions=partitions_)
        r = connect(s)
        dead_streams = [p.dead_stream for p in partitions(s)]
        shown = _shown(dead_streams)
        what = "all dead letters" if reason is None and not ids else "the matching dead letters"
        if not yes and not typer.confirm(f"Delete {what} from {shown}?"):
            raise typer.Exit(1)
        n = 0
        for dead_stream in dead_streams:
            selected = None if reason is None and not ids else matching(r, dead_stream, reason, ids)
            n += purge(r, dead_stream, selected)
        typer.echo(f"✓ Purged {n} dead letters from {shown}")
