"""The dead-letter stream: list what is there, replay it after a fix, purge it."""

# No `from __future__ import annotations`: the CLI functions defined inside
# `register_cli` need their annotations evaluated where they are defined.

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from .config import Settings

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
        rows = r.xrange(dead_stream, min=start, max="+", count=CHUNK)
        if not rows:
            return
        for entry_id, fields in rows:
            yield DeadLetterEntry(entry_id, fields)
        if len(rows) < CHUNK:
            return
        start = b"(" + rows[-1][0]


def matching(r: redis.Redis, dead_stream: str, reason: str | None, ids: list[str] | None) -> Iterator[DeadLetterEntry]:
    """Dead letters with the given reason and/or dead-letter (or source) ids."""
    wanted = {i.encode() for i in ids or []}
    for d in scan(r, dead_stream):
        if reason is not None and d.reason != reason:
            continue
        if wanted and d.id not in wanted and d.fields.get(b"source_id") not in wanted:
            continue
        yield d


def summarize(r: redis.Redis, dead_stream: str, recent: int = 10) -> dict[str, Any]:
    """Counts by reason and the most recent dead letters."""
    counts: Counter[str] = Counter(d.reason for d in scan(r, dead_stream))
    latest = [DeadLetterEntry(i, f).summary() for i, f in r.xrevrange(dead_stream, count=recent)]
    return {"stream": dead_stream, "total": sum(counts.values()), "by_reason": dict(counts.most_common()),
            "recent": latest}


def replay(r: redis.Redis, settings: Settings, entries: Iterator[DeadLetterEntry]) -> int:
    """Puts dead letters back on the stream with their original fields and removes them
    from the dead-letter stream, each chunk in one MULTI/EXEC: a crash replays a chunk
    entirely or not at all."""
    total = 0
    chunk: list[DeadLetterEntry] = []

    def flush() -> None:
        nonlocal total
        if not chunk:
            return
        pipe = r.pipeline(transaction=True)
        for d in chunk:
            pipe.xadd(settings.stream, d.original())  # type: ignore[arg-type]
        pipe.xdel(settings.dead_stream, *[d.id for d in chunk])
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

    from .cli import Debug, RedisUrl, Stream, settings_from
    from .errors import TransientError

    dlq_app = typer.Typer(help="Inspect, replay and purge the dead-letter stream.", no_args_is_help=True)
    app.add_typer(dlq_app, name="dlq")

    Reason = Annotated[str | None, typer.Option("--reason", help="Only dead letters with this reason code.",
                                                show_default=False)]
    Ids = Annotated[list[str] | None, typer.Option("--id", help="Only this dead-letter or source entry id "
                                                   "(repeatable).", show_default=False)]

    def connect(s: Settings) -> redis.Redis:
        r = redis.Redis.from_url(s.redis_url, socket_timeout=10, socket_connect_timeout=s.connect_timeout_s)
        try:
            r.ping()
        except redis.ConnectionError as e:
            from .config import mask_url

            raise TransientError(f"cannot reach Redis at {mask_url(s.redis_url)}: {e}") from e
        return r

    @dlq_app.command("list")
    @handle_errors
    def list_cmd(
        recent: Annotated[int, typer.Option("--recent", min=0, help="How many recent dead letters to show.")] = 10,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
        redis_url: RedisUrl = None,
        stream: Stream = None,
        debug: Debug = False,
    ) -> None:
        """Dead letters by reason, and the most recent ones."""
        s = settings_from(redis_url=redis_url, stream=stream)
        summary = summarize(connect(s), s.dead_stream, recent)
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        typer.echo(f"DEAD LETTERS in {s.dead_stream}: {summary['total']}")
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
        debug: Debug = False,
    ) -> None:
        """Put dead letters back on the stream (after fixing what rejected them)."""
        s = settings_from(redis_url=redis_url, stream=stream)
        r = connect(s)
        n = replay(r, s, matching(r, s.dead_stream, reason, ids))
        typer.echo(f"✓ Replayed {n} dead letters onto {s.stream}")

    @dlq_app.command("purge")
    @handle_errors
    def purge_cmd(
        reason: Reason = None,
        ids: Ids = None,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
        redis_url: RedisUrl = None,
        stream: Stream = None,
        debug: Debug = False,
    ) -> None:
        """Delete dead letters (all of them, or those matching --reason / --id)."""
        s = settings_from(redis_url=redis_url, stream=stream)
        r = connect(s)
        what = "all dead letters" if reason is None and not ids else "the matching dead letters"
        if not yes and not typer.confirm(f"Delete {what} from {s.dead_stream}?"):
            raise typer.Exit(1)
        selected = None if reason is None and not ids else matching(r, s.dead_stream, reason, ids)
        n = purge(r, s.dead_stream, selected)
        typer.echo(f"✓ Purged {n} dead letters from {s.dead_stream}")
