"""`filepipe dlq list | replay | purge`: the dead-letter stream."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import Settings
from ..observe.text import plural
from ..redaction import printable
from .app import app
from .options import REDIS, command

dlq_app = typer.Typer(help="Inspect, replay and purge the dead-letter stream.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

WHERE = (*REDIS, "stream", "partitions")
SHOWN = 20  # dead letters named when a replay leaves some

Reason = Annotated[
    str | None, typer.Option("--reason", help="Only dead letters with this reason code.", show_default=False)
]
Ids = Annotated[
    list[str] | None,
    typer.Option("--id", help="Only this dead-letter or source entry id (repeatable).", show_default=False),
]


def echo(line: str, err: bool = False) -> None:
    """A line quoting whatever the dead-letter stream holds: escaped."""
    typer.echo(printable(line), err=err)


@command(dlq_app, "list", settings=WHERE)
def list_cmd(
    s: Settings,
    recent: Annotated[
        int, typer.Option("--recent", min=0, help="How many recent dead letters to show.")
    ] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Dead letters by reason, and the most recent ones."""
    import json

    from ..dlq import connect, retention_summary, size_text, summarize
    from ..partitions import partitions

    r = connect(s)
    streams = [p.dead_stream for p in partitions(s)]
    summary = summarize(r, streams, recent)
    kept = summary["retention"] = retention_summary(r, s, streams, summary["total"])
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    echo(f"DEAD LETTERS in {summary['stream']}: {summary['total']}")
    of = f" of {kept['cap']:,}" + (" each" if len(streams) > 1 else "") if kept["cap"] else ""
    echo(
        f"  Kept: {kept['kept']:,}{of} (DEAD_LETTER_RETENTION={kept['setting']}: {kept['rule']}), "
        f"{size_text(kept['memory_bytes'])} in Redis"
    )
    for reason, n in summary["by_reason"].items():
        echo(f"  {reason:<18} {n:>8}")
    if summary["recent"]:
        typer.echo("")
        echo("Most recent:")
        for d in summary["recent"]:
            echo(f"  {d['id']}  (source {d['source_id']})  {d['reason']}: {d['error']}")


@command(dlq_app, "replay", settings=WHERE)
def replay_cmd(s: Settings, reason: Reason = None, ids: Ids = None) -> None:
    """Put dead letters back on the stream (after fixing what rejected them)."""
    from ..dlq import Replayed, connect, matching, replay
    from ..partitions import partitions

    r = connect(s)
    result = Replayed()
    for p in partitions(s):
        replay(r, s, matching(r, p.dead_stream, reason, ids), p, result)
    where = (
        s.stream if not s.partitions else f"{s.stream} ({s.partitions} {plural(s.partitions, 'partition')})"
    )
    typer.echo(f"✓ Replayed {result.count} {plural(result.count, 'dead letter')} onto {where}")
    if result.refused:
        n = len(result.refused)
        typer.echo(f"✗ Left {n} {plural(n, 'dead letter')} that cannot be replayed:", err=True)
        for d, why in result.refused[:SHOWN]:
            source = d.fields.get(b"source_id", b"?")
            echo(f"  {d.id.decode()} (source {source.decode(errors='replace')}): {why}", err=True)
        if n > SHOWN:
            typer.echo(f"  … and {n - SHOWN} more", err=True)
        typer.echo("  (`filepipe dlq purge --id ID` deletes one)", err=True)
        raise typer.Exit(1)


@command(dlq_app, "purge", settings=WHERE)
def purge_cmd(
    s: Settings,
    reason: Reason = None,
    ids: Ids = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete dead letters (all of them, or those matching --reason / --id)."""
    from ..dlq import connect, matching, purge, shown_streams
    from ..partitions import partitions

    r = connect(s)
    dead_streams = [p.dead_stream for p in partitions(s)]
    shown = shown_streams(dead_streams)
    what = "all dead letters" if reason is None and not ids else "the matching dead letters"
    if not yes and not typer.confirm(f"Delete {what} from {shown}?"):
        raise typer.Exit(1)
    n = 0
    for dead_stream in dead_streams:
        selected = None if reason is None and not ids else matching(r, dead_stream, reason, ids)
        n += purge(r, dead_stream, selected)
    typer.echo(f"✓ Purged {n} {plural(n, 'dead letter')} from {shown}")
