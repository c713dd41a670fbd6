"""filepipe against a Rust peer on the same events, in one run: faucet-cli from crates.io, a
config-driven pipeline runner, reading the same Redis stream and writing the same rows into
PostgreSQL.

    python -m benches.peer                              # 200,000 events, 12 pairs (`make bench`)
    python -m benches.peer --events 20000 --pairs 3     # quicker

Two pinned releases of the peer: 1.0.1, whose PostgreSQL sink writes with INSERTs, and
1.15.1, whose sink can COPY but which needs Rust 1.96 (the default toolchain, else another
rustup toolchain that is new enough). Each is installed once with `cargo install --locked`
into FILEPIPE_BENCH_PEER_DIR (default ~/.cache/filepipe-bench/peer)/<version>, with only its
Redis source, PostgreSQL sink and transforms compiled in. A release that cannot be had here
(no cargo, no crates.io, no Rust new enough) is skipped in one line; with neither, the bench
exits 0. It runs against throwaway servers unless FILEPIPE_BENCH_REDIS_URL / _PG_URI (or the
FILEPIPE_TEST_* ones) are set.

filepipe's producer puts N events for existing files into a stream once; each run gets its
own server-side copy of that stream (same ids, same fields) and its own truncated table.
filepipe drains its copy as `filepipe consume --drain` does (in this process, as benches.e2e
times it); the peer runs `faucet run` once per write mode of its PostgreSQL sink. The runs
of a pair alternate their order; each ratio is peer time / filepipe time within a pair, and
the table shows the median of the pairs. A peer run that does not load exactly N rows is a
failed run and is reported as one, not timed."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import redis

from benches.e2e import Cpu, bench_servers, bench_settings, count_rows, make_files, replace, timed
from filepipe import stream
from filepipe.config import Settings
from filepipe.consumer import Consumer
from filepipe.db import init_db
from filepipe.producer import Producer

PEER_CRATE = "faucet-cli"
PEER_FEATURES = ("source-redis", "sink-postgres", "transforms")
PEER_BIN = "faucet"

FILEPIPE = "filepipe"
FILEPIPE_DOES = (
    "XREADGROUP; parses and validates each entry; opens, stats, reads and SHA-256-hashes the file "
    "and sniffs its type; COPY into the table (a redelivered batch: merge, ON CONFLICT DO NOTHING); "
    "XACK after the commit (and trims what every group acknowledged)"
)
PEER_READS = (
    "XRANGE over the stream (a pipeline run of this version streams pages with XRANGE: the "
    "group and consumer in its config are not used, and nothing is acknowledged); each entry "
    "to a JSON record"
)


@dataclass(frozen=True)
class Mode:
    """One write mode of the peer's PostgreSQL sink, with what it does per event."""

    name: str
    does: str
    column_mapping: Any
    transforms: tuple[dict[str, Any], ...] = ()
    sink: tuple[tuple[str, Any], ...] = ()  # further keys of the sink's config

    @property
    def columns(self) -> bool:
        """Into filepipe's columns (else into one jsonb column)."""
        return bool(self.column_mapping == "auto_map")


def to_columns(s: Settings) -> tuple[dict[str, Any], ...]:
    """The transforms that turn a stream entry's record into filepipe's columns."""
    renames = {
        "id": "stream_id",
        "fields__file_id": "file_id",
        "fields__filename": "filename",
        "fields__key": "storage_key",
        "fields__size": "size_bytes",
        "fields__storage": "storage",
        "fields__uploaded_at": "uploaded_at",
    }
    return (
        {"type": "flatten", "config": {"separator": "__"}},
        {"type": "rename_field", "config": {"fields": renames}},
        {"type": "set", "config": {"values": {"stream": s.stream, "consumer": PEER_CRATE}}},
    )


NOTHING_ELSE = "no file read, no hash, no dedup"


def insert_modes(s: Settings) -> tuple[Mode, ...]:
    # auto_map binds one text parameter per column per row, cast to the column's type.
    return (
        Mode(
            "faucet 1.0.1, auto_map (multi-row INSERT)",
            f"{PEER_READS}; flattens and renames it to filepipe's columns; multi-row INSERT, "
            f"a bound parameter per column; {NOTHING_ELSE}",
            "auto_map",
            to_columns(s),
        ),
        Mode(
            "faucet 1.0.1, jsonb (INSERT … unnest)",
            f"{PEER_READS}; one INSERT … SELECT FROM unnest($1::jsonb[]) per batch into one "
            f"jsonb column; {NOTHING_ELSE}",
            {"jsonb": {"column": "data"}},
        ),
    )


def copy_modes(s: Settings) -> tuple[Mode, ...]:
    return (
        Mode(
            "faucet 1.15.1, auto_map (COPY)",
            f"{PEER_READS}; flattens and renames it to filepipe's columns; COPY … FROM STDIN "
            f"(text) per batch; {NOTHING_ELSE}",
            "auto_map",
            to_columns(s),
            sink=(("write_method", "copy"),),
        ),
        Mode(
            "faucet 1.15.1, jsonb (COPY)",
            f"{PEER_READS}; COPY … FROM STDIN (text) per batch into one jsonb column; {NOTHING_ELSE}",
            {"jsonb": {"column": "data"}},
            sink=(("write_method", "copy"),),
        ),
    )


@dataclass(frozen=True)
class Peer:
    """One pinned release of the peer, the Rust it needs (its rust-version) and its modes."""

    version: str
    rust: tuple[int, int]
    modes: Callable[[Settings], tuple[Mode, ...]]


PEERS = (
    # The newest release whose rust-version a stable 1.95 meets. Its PostgreSQL sink has two
    # write modes, both INSERTs.
    Peer("1.0.1", (1, 94), insert_modes),
    # The newest release a 1.97 meets (1.16 asks for 1.99): its sink has COPY (`write_method`).
    Peer("1.15.1", (1, 96), copy_modes),
)


# -- the peer's install ------------------------------------------------------------------------


def peer_root() -> Path:
    env = os.environ.get("FILEPIPE_BENCH_PEER_DIR")
    return Path(env) if env else Path.home() / ".cache" / "filepipe-bench" / "peer"


def installed(root: Path, version: str) -> bool:
    """True when `version` with these features is in `root` (cargo's own record)."""
    record = root / ".crates2.json"
    if not (root / "bin" / PEER_BIN).exists() or not record.exists():
        return False
    try:
        installs = json.loads(record.read_text()).get("installs", {})
    except (OSError, ValueError):
        return False
    return any(
        key.startswith(f"{PEER_CRATE} {version} ")
        and sorted(v.get("features", [])) == sorted(PEER_FEATURES)
        and v.get("no_default_features")
        for key, v in installs.items()
    )


def rust_of(cargo: list[str]) -> tuple[int, int] | None:
    """The (major, minor) of the rustc that `cargo` (with its +toolchain) runs."""
    rustc = [str(Path(cargo[0]).with_name("rustc")), *cargo[1:], "--version"]
    try:
        out = subprocess.run(rustc, capture_output=True, text=True, timeout=30).stdout.split()
        major, minor = out[1].split(".")[:2]
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def cargo_for(rust: tuple[int, int]) -> list[str] | str:
    """A cargo command (the default toolchain, else another rustup toolchain) whose rustc is
    at least `rust`; or why there is none."""
    cargo = shutil.which("cargo")
    if cargo is None:
        return "cargo is not installed"
    candidates = [[cargo]]
    rustup = shutil.which("rustup")
    if rustup is not None:
        listed = subprocess.run([rustup, "toolchain", "list"], capture_output=True, text=True).stdout
        candidates += [[cargo, f"+{ln.split()[0]}"] for ln in listed.splitlines() if ln.strip()]
    have = []
    for c in candidates:
        v = rust_of(c)
        if v is not None and v >= rust:
            return c
        if v is not None:
            have.append(f"{v[0]}.{v[1]}")
    found = ", ".join(dict.fromkeys(have)) or "none that runs"
    return f"it needs Rust {rust[0]}.{rust[1]} or newer; this machine has {found}"


def install_peer(root: Path, peer: Peer) -> Path | str:
    """The peer's binary, installed first if needed; or why it cannot be had."""
    root = root / peer.version
    binary = root / "bin" / PEER_BIN
    if installed(root, peer.version):
        return binary
    cargo = cargo_for(peer.rust)
    if isinstance(cargo, str):
        return cargo
    print(
        f"installing {PEER_CRATE} {peer.version} into {root} (once; a few minutes)",
        file=sys.stderr,
        flush=True,
    )
    target = root / "target"
    cmd = [
        *cargo,
        "install",
        "--locked",
        PEER_CRATE,
        "--version",
        peer.version,
        "--no-default-features",
        "--features",
        ",".join(PEER_FEATURES),
        "--root",
        str(root),
        "--target-dir",
        str(target),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error")] or lines[-1:]
        return f"`cargo install {PEER_CRATE}` failed ({errors[0] if errors else f'exit {proc.returncode}'})"
    shutil.rmtree(target, ignore_errors=True)
    return binary


# -- the runs ----------------------------------------------------------------------------------


@dataclass
class Contestant:
    name: str
    does: str
    table: str
    # One per pair: the run's seconds, or None for a failed run.
    seconds: list[float | None] = field(default_factory=list)
    cpu_us: list[dict[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def timed(self) -> list[float]:
        return [t for t in self.seconds if t is not None]

    def record(self, seconds: float, cpu_us: dict[str, float]) -> None:
        self.seconds.append(seconds)
        self.cpu_us.append(cpu_us)

    def fail(self, why: str) -> None:
        self.seconds.append(None)
        self.failures.append(why)

    def last(self) -> str:
        t = self.seconds[-1]
        return f"{self.name.split(' (')[0]} " + ("failed" if t is None else f"{t:.2f} s")


def produce(s: Settings, root: Path, keys: list[str], events: int) -> None:
    """`events` events for the existing files, enqueued by filepipe's producer."""
    producer = Producer(s)
    try:
        for i in range(events):
            key = keys[i % len(keys)]
            producer.add(root / key, key=key, filename=f"photo {i}.txt")
    finally:
        producer.close()


def copy_stream(r: redis.Redis, template: str, name: str) -> None:
    """A run's own copy of the events (the consumer trims what it acknowledged)."""
    r.delete(name)
    if not r.copy(template, name):
        raise RuntimeError(f"COPY {template} {name} copied nothing")


def truncate(s: Settings, table: str) -> None:
    """Empties a run's table, and checkpoints so that no run pays for the last one's writes
    (where the role may: a throwaway server's may)."""
    with psycopg.connect(s.pg_uri, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {table}")
        with suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute("CHECKPOINT")


def peer_config(s: Settings, mode: Mode, stream_key: str, table: str) -> dict[str, Any]:
    pipeline: dict[str, Any] = {
        "source": {
            "type": "redis",
            "config": {
                "url": s.redis_url,
                "source_type": {
                    "type": "Stream",
                    "key": stream_key,
                    "group": s.group,
                    "consumer": PEER_CRATE,
                    "count": s.batch_size,
                },
                "batch_size": s.batch_size,
            },
        },
        "sink": {
            "type": "postgres",
            "config": {
                "connection_url": s.pg_uri,
                "table_name": table,
                "column_mapping": mode.column_mapping,
                "batch_size": s.batch_size,
                "max_connections": s.pool_size,
                **dict(mode.sink),
            },
        },
    }
    if mode.transforms:
        pipeline["transforms"] = list(mode.transforms)
    return {"version": 1, "name": f"filepipe_peer_{table}", "pipeline": pipeline}


def run_filepipe(s: Settings, c: Contestant, r: redis.Redis, template: str, cpu: Cpu, events: int) -> None:
    run = replace(s, stream=f"{template}:fp", table=c.table, consumer_name=f"fp-{uuid.uuid4().hex[:6]}")
    copy_stream(r, template, run.stream)
    stream.ensure_group(r, run.stream, run.group)
    truncate(s, c.table)
    before = cpu.sample()
    stats, dt = timed(lambda: Consumer(run, drain=True, write=None).run())
    spent = cpu.spent(before, events)
    rows = count_rows(run)
    r.delete(run.stream, run.dead_stream)
    if stats.inserted != events or rows != events:
        c.fail(f"{stats.inserted:,} inserted, {rows:,} rows of {events:,}")
    else:
        c.record(dt, spent)


def run_peer(
    s: Settings,
    c: Contestant,
    mode: Mode,
    binary: Path,
    r: redis.Redis,
    template: str,
    cpu: Cpu,
    events: int,
    workdir: Path,
) -> None:
    key = f"{template}:peer"
    copy_stream(r, template, key)
    truncate(s, c.table)
    config = workdir / f"{c.table}.json"
    config.write_text(json.dumps(peer_config(s, mode, key, c.table), indent=2))
    before = cpu.sample()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc, dt = timed(
        lambda: subprocess.run(
            [str(binary), "run", str(config), "--no-env-file"], capture_output=True, text=True, cwd=workdir
        )
    )
    spent = cpu.spent(before, events)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    spent["client"] = own * 1e6 / max(1, events)
    rows = count_rows(replace(s, table=c.table))
    r.delete(key)
    if proc.returncode != 0 or rows != events:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip()[:200] if lines else "no output"
        c.fail(f"exit {proc.returncode}, {rows:,} rows of {events:,}: {why}")
    else:
        c.record(dt, spent)


def make_table(s: Settings, table: str, mode: Mode | None) -> str:
    """filepipe's table (`mode` None); the same table for a peer's auto_map (its event time
    defaults to the insert's time: the peer cannot derive it from the entry id; it has no
    checksum); or one jsonb column."""
    with psycopg.connect(s.pg_uri, autocommit=True) as conn:
        if mode is None or mode.columns:
            init_db(replace(s, table=table), plain=True)
        if mode is not None and mode.columns:
            conn.execute(f"ALTER TABLE {table} ALTER COLUMN event_time SET DEFAULT now()")
            conn.execute(f"ALTER TABLE {table} ALTER COLUMN checksum_sha256 DROP NOT NULL")
        elif mode is not None:
            conn.execute(f"CREATE TABLE {table} (data jsonb NOT NULL)")
    return table


def drop_tables(s: Settings, tables: list[str]) -> None:
    with psycopg.connect(s.pg_uri, autocommit=True) as conn:
        for t in tables:
            conn.execute(f"DROP TABLE IF EXISTS {t}")


# -- report ------------------------------------------------------------------------------------


def ratios(peer: Contestant, fp: Contestant) -> list[float]:
    """peer time / filepipe time of each pair where both runs succeeded."""
    return [p / f for p, f in zip(peer.seconds, fp.seconds, strict=True) if p is not None and f is not None]


def report(contestants: list[Contestant], events: int, pairs: int, header: str) -> str:
    fp = contestants[0]
    lines = [
        header,
        "",
        "| pipeline | files/s | median s | peer time / filepipe time | CPU µs/file "
        "(client + Redis + PostgreSQL) | runs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for c in contestants:
        failed = f"{len(c.failures)} failed: {c.failures[0]}" if c.failures else ""
        if not c.timed:
            lines.append(f"| {c.name} | failed | | | | {failed} |")
            continue
        median = statistics.median(c.timed)
        cpu = {k: statistics.median(u[k] for u in c.cpu_us if k in u) for k in c.cpu_us[0]}
        cpu_text = " + ".join(f"{cpu[k]:.1f}" for k in ("client", "redis", "postgres") if k in cpu)
        cpu_cell = f"{cpu_text} = {sum(cpu.values()):.1f}" if len(cpu) > 1 else cpu_text
        rs = ratios(c, fp)
        if c is fp:
            ratio = "1.00"
        elif rs:
            ratio = f"**{statistics.median(rs):.2f}×** ({min(rs):.2f}–{max(rs):.2f})"
        else:
            ratio = ""
        runs = f"{len(c.timed)} of {pairs} timed" + (f"; {failed}" if failed else "")
        lines.append(f"| {c.name} | {events / median:,.0f} | {median:.2f} | {ratio} | {cpu_cell} | {runs} |")
    lines += ["", "What each does per event:", ""]
    lines += [f"- **{c.name}**: {c.does}." for c in contestants]
    lines += [
        "",
        f"Ratios are per pair (peer time / filepipe time, the runs of a pair alternating their order), "
        f"median (and range) of {pairs} pairs on {events:,} events. The peer's time includes its "
        "process start; filepipe's runs in the bench's own process. CPU counts clock ticks of this "
        "process (filepipe) or of the peer's process, and of the servers when they are this run's "
        "own.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--files", type=int, default=100_000, help="distinct small files")
    ap.add_argument("--batch-size", type=int, default=None, help="filepipe's batch, and the peer's")
    ap.add_argument("--out", type=Path, default=Path("artifacts"))
    args = ap.parse_args(argv)

    binaries: list[tuple[Peer, Path]] = []
    for peer in PEERS:
        found = install_peer(peer_root(), peer)
        if isinstance(found, str):
            print(f"peer bench: {PEER_CRATE} {peer.version} skipped: {found}")
        else:
            binaries.append((peer, found))
    if not binaries:
        return 0

    with ExitStack() as stack:
        redis_url, pg_uri = bench_servers(stack)
        base, root = bench_settings(redis_url, pg_uri, args.batch_size)
        keys = make_files(root, args.files)
        tag = uuid.uuid4().hex[:8]
        s = replace(base, stream=f"peer_{tag}")
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="filepipe-peer-")))
        r = redis.Redis.from_url(redis_url)
        stack.callback(r.close)
        stack.callback(r.delete, s.stream)
        tables: list[str] = []
        stack.callback(drop_tables, s, tables)
        fp = Contestant(FILEPIPE, FILEPIPE_DOES, make_table(s, f"peer_fp_{tag}", None))
        tables.append(fp.table)
        peers: list[tuple[Mode, Path, Contestant]] = []
        for peer, binary in binaries:
            for mode in peer.modes(s):
                table = make_table(s, f"peer_{len(tables)}_{tag}", mode)
                tables.append(table)
                peers.append((mode, binary, Contestant(mode.name, mode.does, table)))
        produce(s, root, keys, args.events)
        versions = " and ".join(p.version for p, _ in binaries)
        header = (
            f"filepipe and {PEER_CRATE} {versions} on {args.events:,} events "
            f"({len(keys):,} files of 1-4 KiB), batch {s.batch_size}, {args.pairs} pairs, "
            f"{os.cpu_count()} cores"
        )
        print(header, flush=True)

        cpu = Cpu.of(s)
        runs: list[Callable[[], None]] = [partial(run_filepipe, s, fp, r, s.stream, cpu, args.events)]
        runs += [
            partial(run_peer, s, c, mode, binary, r, s.stream, cpu, args.events, workdir)
            for mode, binary, c in peers
        ]
        everyone = [fp] + [c for _, _, c in peers]
        for i in range(args.pairs):
            for run in runs if i % 2 == 0 else runs[::-1]:
                run()
            done = "; ".join(c.last() for c in everyone)
            print(f"  pair {i + 1}/{args.pairs}: {done}", flush=True)

        text = report(everyone, args.events, args.pairs, header)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
