"""`filepipe demo`: the whole pipeline once, on sample files, end to end, beside the two
consumers of the performance guide on the same kind of events."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import redis
from redis.exceptions import RedisClusterException

from .config import Settings, load_settings, mask_url
from .constants import dead_letter_ids_key
from .errors import FilepipeError, TransientError
from .observe.text import plural
from .redaction import error_line

SAMPLE_NAMES = [
    "report {i}.pdf",
    "photo_{i}.jpg",
    "notes-{i}.txt",
    "data {i}.json",
    "über straße {i}.txt",
    "tab\there {i}.txt",
    "emoji 🚀 {i}.txt",
    'quote\'s "{i}".txt',
    "back\\slash {i}.txt",
]
HEADERS = {".pdf": b"%PDF-1.7\n", ".jpg": b"\xff\xd8\xff\xe0", ".json": b'{"n": ', ".txt": b""}
PRINTABLE = range(32, 127)
# At most this many distinct sample files: more events than that share them (each event is
# its own upload, with its own file id), so that a big run does not spend its time writing files.
MAX_SAMPLE_FILES = 2000
GUIDE_OLD = "the guide's consumer.py (a connection per file)"
GUIDE_FAST = "the guide's consumer_fast.py (a pool, batches of 50)"
FILEPIPE = "filepipe consume --drain"


@dataclass(frozen=True)
class Sample:
    """One sample file and where the demo stored it."""

    path: Path
    name: str
    key: str


@dataclass(frozen=True)
class Run:
    """One consumer's drain: how many files, and the seconds from its start to its last
    acknowledgement. Its rate is the one rate the demo shows."""

    label: str
    files: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0


def make_samples(directory: Path, count: int, seed: int = 7) -> list[tuple[Path, str]]:
    """Writes `count` small files (1-4 KiB) with varied names; returns (path, name) of each."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        name = SAMPLE_NAMES[i % len(SAMPLE_NAMES)].format(i=i)
        ext = Path(name).suffix
        size = rng.randrange(1024, 4096)
        body = rng.randbytes(size) if ext == ".jpg" else bytes(rng.choices(PRINTABLE, k=size))
        path = directory / f"{i:05d}{ext}"
        path.write_bytes(HEADERS.get(ext, b"") + body)
        made.append((path, name))
    return made


def guide_counts(files: int) -> tuple[int, int]:
    """Events for the guide's old and fast consumers: a 500th and a tenth of filepipe's, so
    that none of the three runs for much longer than the others (at least 10, at most `files`)."""
    return min(files, max(10, files // 500)), min(files, max(10, files // 10))


def run_demo(files: int, echo: Callable[[str], None] = print, *, serve: bool | None = None) -> None:
    """Drains `files` sample events with filepipe, and a share of that with each of the
    guide's consumers, printing each step, their rates side by side and the status view.
    With `serve` (default: when stdin is a terminal), keeps the servers up and serves the
    dashboard until Enter or Ctrl-C."""
    from . import db, timescale
    from .embedded import PostgresServer, RedisServer, timescaledb_installed
    from .errors import NotPreloadedError

    base = load_settings()
    work = Path(tempfile.mkdtemp(prefix="filepipe-demo-"))
    stack = contextlib.ExitStack()
    left: list[str] = []  # what the cleanup could not remove
    settings = base
    try:
        redis_url, pg_uri = base.redis_url, base.pg_uri
        env_redis = os.environ.get("REDIS_URL") or _dotenv("REDIS_URL")
        env_pg = os.environ.get("PG_URI") or os.environ.get("DATABASE_URL") or _dotenv("PG_URI")
        if not env_redis:
            echo("Starting a throwaway Redis ...")
            redis_url = stack.enter_context(RedisServer()).url
        if not env_pg:
            # With TimescaleDB installed, the throwaway server preloads it: a hypertable.
            preload = ("timescaledb",) if timescaledb_installed() else ()
            echo(f"Starting a throwaway PostgreSQL{' with TimescaleDB' if preload else ''} ...")
            pg_uri = stack.enter_context(PostgresServer(preload=preload)).uri
        stream = f"filepipe_demo_{os.getpid()}" if env_redis else base.stream
        table = f"filepipe_demo_{os.getpid()}" if env_pg else base.table
        settings = load_settings(
            {
                "redis_url": redis_url,
                "pg_uri": pg_uri,
                "stream": stream,
                "table": table,
                "storage_mode": "local",
                "local_storage_dir": str(work / "storage"),
                "consumer_name": f"demo-{os.getpid()}",
            }
        )
        echo(f"  Redis:      {mask_url(settings.redis_url)} (stream {settings.stream})")
        echo(f"  PostgreSQL: {mask_url(settings.pg_uri)} (table {settings.table})")
        echo(f"  Storage:    {settings.local_storage_dir}")
        _check_redis(settings)

        plain = False
        try:
            info = db.init_db(settings)
        except NotPreloadedError:
            with db.connect(settings) as conn:
                ext = timescale.read_extension(conn)
            echo(
                "! TimescaleDB is installed there but not preloaded, so the demo uses a plain table; "
                f"for a hypertable, {ext.preload_advice()}"
            )
            info = db.init_db(settings, plain=True)
            plain = True
        if env_pg:
            stack.callback(_drop_table, settings)
        if env_redis:
            stack.callback(_delete_stream, settings, left)
        echo(f"✓ Table {info.table} ready ({'hypertable' if info.hypertable else 'plain table'})")

        samples = store_samples(settings, work / "samples", min(files, MAX_SAMPLE_FILES))
        size = sum(s.path.stat().st_size for s in samples)
        echo(f"✓ Stored {len(samples)} sample {plural(len(samples), 'file')} ({size / 1e6:.1f} MB)")

        old_n, fast_n = guide_counts(files)
        echo(
            "Draining events with the guide's two consumers and with filepipe, one after the other, "
            "each from its own stream into its own table:"
        )
        runs = [
            guide_run(settings, samples, old_n, "old", plain=plain or not info.hypertable, echo=echo),
            guide_run(settings, samples, fast_n, "fast", plain=plain or not info.hypertable, echo=echo),
        ]
        echo(f"  … {FILEPIPE}: {files:,} {plural(files, 'event')}")
        enqueue(settings, samples, files)
        runs.append(filepipe_run(settings, files))
        echo("")
        for line in comparison(runs):
            echo(line)
        echo("")

        with db.connect(settings) as conn:
            count = conn.execute(f"SELECT count(*) FROM {settings.table}").fetchone()
            rows = conn.execute(
                f"SELECT filename, size_bytes, content_type, left(checksum_sha256, 12) FROM {settings.table} "
                "ORDER BY event_time, stream_id LIMIT 5"
            ).fetchall()
        n = count[0] if count else 0
        echo(f"✓ {n:,} {plural(n, 'row')} in {settings.table}; the first five:")
        for filename, size_bytes, ctype, digest in rows:
            echo(f"    {filename:<40} {size_bytes:>6} B  {ctype:<18} sha256 {digest}…")
        echo("")
        echo(f"$ filepipe status --stream {settings.stream} --table {settings.table}")
        for line in status_lines(settings):
            echo(line)
        if serve if serve is not None else sys.stdin.isatty():
            serve_dashboard(settings, echo)
        else:
            echo(
                "Dashboard: `filepipe dashboard` serves it at http://127.0.0.1:8000/dashboard "
                "(run the demo on a terminal to keep these servers up and see it)."
            )
    except (redis.RedisError, RedisClusterException) as e:
        raise stream_failure(settings, e) from e
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)
        echo(f"! Cleaned up, except {'; '.join(left)}" if left else "✓ Cleaned up")


def store_samples(settings: Settings, directory: Path, count: int) -> list[Sample]:
    """Makes the sample files and stores each in the demo's storage."""
    from .storage import safe_key_name
    from .storage.local import LocalStorage

    storage = LocalStorage(Path(settings.local_storage_dir))
    storage.ensure_root()
    samples = []
    for i, (path, name) in enumerate(make_samples(directory, count)):
        key = f"demo/{i:05d}/{safe_key_name(name)}"
        storage.put_file(path, key)
        samples.append(Sample(path, name, key))
    return samples


def enqueue(settings: Settings, samples: list[Sample], events: int) -> None:
    """`events` upload events on the settings' stream, over the stored samples in turn."""
    from .producer import Producer
    from .storage.local import LocalStorage

    producer = Producer(settings, storage=LocalStorage(Path(settings.local_storage_dir)))
    try:
        for i in range(events):
            s = samples[i % len(samples)]
            producer.add(s.path, filename=s.name, key=s.key)
    finally:
        producer.close()


def guide_run(
    settings: Settings,
    samples: list[Sample],
    events: int,
    which: str,
    *,
    plain: bool,
    echo: Callable[[str], None],
) -> Run:
    """One of the guide's consumers on its own stream and table, both removed afterwards."""
    from . import db, guide, stream

    name = "consumer" if which == "old" else "consumer_fast"
    s = replace(
        settings,
        stream=f"{settings.stream}_guide_{name}",
        table=f"{settings.table}_guide_{name}",
        dead_letter_stream="",
    )
    db.init_db(s, plain=plain)
    try:
        enqueue(s, samples, events)
        r = stream.connect(s)
        stream.ensure_group(r, s.stream, s.group)
        r.close()
        label = GUIDE_OLD if which == "old" else GUIDE_FAST
        echo(f"  … {label.split(' (')[0]}: {events:,} {plural(events, 'event')}")
        consume = guide.old_consumer if which == "old" else guide.fast_consumer
        done, seconds = consume(s, events)
        return Run(label, done, seconds)
    finally:
        _drop_table(s)
        _delete_stream(s)


def filepipe_run(settings: Settings, events: int) -> Run:
    """`filepipe consume --drain`, timed from its start to its last acknowledgement."""
    from .consumer import Consumer

    t0 = time.perf_counter()
    stats = Consumer(settings, drain=True, write=None).run()
    return Run(FILEPIPE, stats.inserted, time.perf_counter() - t0)


def comparison(runs: list[Run]) -> Iterator[str]:
    """The three runs side by side: files/s is files over seconds from start to the last
    acknowledgement, and each rate against the guide's fast consumer."""
    fast = next((r for r in runs if r.label == GUIDE_FAST), None)
    width = max(len(r.label) for r in runs)
    yield f"  {'':<{width}} {'files':>7} {'seconds':>8} {'files/s':>9}  vs the guide's fast consumer"
    for run in runs:
        ratio = _times(run.rate / fast.rate) if fast and fast.rate else "-"
        yield f"  {run.label:<{width}} {run.files:>7,} {run.seconds:>8.2f} {run.rate:>9,.0f}  {ratio}"


def _times(ratio: float) -> str:
    """`0.08×`, `1.0×`, `24×`: two significant figures where they matter."""
    return f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.1f}×" if ratio >= 1 else f"{ratio:.2f}×"


def status_lines(settings: Settings) -> list[str]:
    """What `filepipe status` prints for the demo's stream and table (run as the command)."""
    env = dict(os.environ, REDIS_URL=settings.redis_url, PG_URI=settings.pg_uri)
    env.pop("DATABASE_URL", None)
    out = subprocess.run(
        [sys.executable, "-m", "filepipe", "status", "--stream", settings.stream, "--table", settings.table],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return (out.stdout + out.stderr).rstrip("\n").splitlines()


def serve_dashboard(settings: Settings, echo: Callable[[str], None]) -> None:
    """Serves the dashboard on a free loopback port until Enter or Ctrl-C."""
    import uvicorn

    from .dashboard.app import create_app

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=_free_port(),
            log_level="warning",
            log_config=None,
            lifespan="on",
        )
    )
    thread = threading.Thread(target=server.run, name="demo-dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        echo("! the dashboard did not start; `filepipe dashboard` serves it against your own servers")
        return
    port = server.servers[0].sockets[0].getsockname()[1]
    echo(
        f"Dashboard: http://127.0.0.1:{port}/dashboard (press Enter to stop the demo and remove its servers)"
    )
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        input()
    server.should_exit = True
    thread.join(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _drop_table(settings: Settings) -> None:
    import psycopg

    with psycopg.connect(settings.pg_uri, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {settings.table}")


def _check_redis(settings: Settings) -> None:
    """Fails in one line, before anything is made, when Redis cannot be used."""
    from . import stream

    r = stream.connect(settings)
    try:
        r.ping()
    finally:
        r.close()


def stream_failure(settings: Settings, e: Exception) -> FilepipeError:
    """What the demo says when Redis failed it: a refusal for good (exit 2) or an outage."""
    from . import stream

    if isinstance(e, redis.RedisError):
        return stream.failure(settings, e)
    return TransientError(f"cannot reach Redis at {mask_url(settings.redis_url)}: {error_line(e)}")


def _delete_stream(settings: Settings, left: list[str] | None = None) -> None:
    """Removes the stream and its keys; what it could not remove goes to `left` (raises
    without one)."""
    from . import stream
    from .constants import trim_keys

    r = stream.connect(settings)
    try:
        r.delete(
            settings.stream,
            settings.dead_stream,
            dead_letter_ids_key(settings.stream),
            *trim_keys(settings.stream),
        )
    except redis.RedisError as e:
        if left is None:
            raise
        left.append(f"stream {settings.stream} in Redis ({error_line(e)})")
    finally:
        r.close()


def _dotenv(name: str) -> str | None:
    """`name` in the `.env` every command reads (the first from the working directory up)."""
    from .config import find_dotenv

    found = find_dotenv()
    if found is None or not found.is_file():
        return None
    from dotenv import dotenv_values

    return dotenv_values(found).get(name)
