"""End-to-end throughput: filepipe against the guide's two consumers and against the
limit of each component, measured in one run on the same events, files and table.

    python -m benches.e2e                  # the full table (what `make bench` runs)
    python -m benches.e2e --events 5000    # quicker

Scenarios: local services, and "cloud" (a loopback proxy adding --latency-ms each way
in front of both Redis and PostgreSQL). Then the peak RSS of a consumer process
draining a backlog of --memory entries. Uses FILEPIPE_BENCH_REDIS_URL / _PG_URI (or the
FILEPIPE_TEST_* ones); without them it starts throwaway servers.

"of limit" is filepipe over the slowest component alone. Each limit has the machine's cores
to itself, while filepipe runs the three at once on them; so, locally, the CPU each limit
takes per file (this process, and the Redis and PostgreSQL server processes when they run
on this machine) is measured too, and "of shared limit" is filepipe over what those add up
to on the cores (never more than the slowest alone). The CPU figures count clock ticks
(10 ms): they need tens of thousands of events, and servers that serve nobody else
(throwaway ones: leave the URLs unset) to be this run's alone."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import psycopg
import redis

from filepipe import _native, stream
from filepipe.config import Settings, load_settings
from filepipe.constants import dead_letter_ids_key
from filepipe.consumer import Consumer
from filepipe.db import Loader, create_pool, init_db
from filepipe.embedded import PostgresServer, RedisServer
from filepipe.guide import fast_consumer, old_consumer
from filepipe.producer import PIPELINE_CHUNK


@dataclass
class Result:
    scenario: str
    name: str
    files: int
    seconds: float
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0


def make_files(root: Path, count: int) -> list[str]:
    """`count` small files (1-4 KiB) under root/bench, made once and reused."""
    keys = [f"bench/{i // 1000:03d}/{i:06d}.txt" for i in range(count)]
    marker = root / f".bench-files-{count}"
    if marker.exists():
        return keys
    rng = random.Random(5)
    for i, key in enumerate(keys):
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"file {i}\n".encode() + rng.randbytes(rng.randrange(1024, 4096)))
    marker.touch()
    return keys


def fresh(base: Settings, keys: list[str], events: int) -> Settings:
    """A new stream (with `events` events over `keys`) and a new table."""
    tag = uuid.uuid4().hex[:8]
    s = replace(base, stream=f"bench_{tag}", table=f"bench_{tag}", consumer_name=f"bench-{tag}")
    init_db(s, plain=True)
    r = redis.Redis.from_url(s.redis_url)
    pipe = r.pipeline(transaction=False)
    for i in range(events):
        pipe.xadd(
            s.stream,
            {
                "file_id": str(uuid.uuid4()),
                "filename": f"photo {i}.txt",
                "key": keys[i % len(keys)],
                "size": "0",
                "uploaded_at": "2024-05-01T12:00:00Z",
            },
        )
        if (i + 1) % PIPELINE_CHUNK == 0:
            pipe.execute()
    pipe.execute()
    stream.ensure_group(r, s.stream, s.group)
    r.close()
    return s


def replace(s: Settings, **changes: Any) -> Settings:
    values = dict(s.__dict__)
    values.update(changes)
    return Settings(**values)


def cleanup(s: Settings) -> None:
    r = redis.Redis.from_url(s.redis_url)
    r.delete(s.stream, s.dead_stream, dead_letter_ids_key(s.stream))
    r.close()
    with psycopg.connect(s.pg_uri, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {s.table}")


def count_rows(s: Settings) -> int:
    with psycopg.connect(s.pg_uri) as conn:
        row = conn.execute(f"SELECT count(*) FROM {s.table}").fetchone()
        return int(row[0]) if row else 0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# -- CPU: what each run costs this process, Redis and PostgreSQL ----------------------------


def listener(port: int) -> psutil.Process | None:
    """The local process listening on `port` (None if there is none this user can see)."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return psutil.Process(c.pid)
    except psutil.Error:
        pass
    return None


@dataclass
class Cpu:
    """CPU seconds of this process and of the local Redis and PostgreSQL servers (the
    postmaster with its backends, live or exited), sampled around a run."""

    redis: psutil.Process | None
    pg: psutil.Process | None

    @classmethod
    def of(cls, s: Settings) -> Cpu:
        return cls(listener(port_of(s.redis_url)), listener(port_of(s.pg_uri)))

    @property
    def known(self) -> bool:
        return self.redis is not None and self.pg is not None

    def sample(self) -> tuple[float, float, float]:
        def of(p: psutil.Process | None, children: bool) -> float:
            return 0.0 if p is None else cpu_of(p, children=children)

        return time.process_time(), of(self.redis, False), of(self.pg, True)

    def extra(self, spent: dict[str, float]) -> dict[str, Any]:
        """A result's `extra` for the CPU `spent` (nothing when the servers are not known:
        remote, or behind the latency proxy)."""
        return {"cpu_us": spent} if self.known else {}

    def spent(
        self, before: tuple[float, float, float], files: int, uses: tuple[str, ...] = ("redis", "postgres")
    ) -> dict[str, float]:
        """µs of CPU per file since `before`: this process, and the servers the run `uses`
        (a server's CPU while a run does not use it is other clients')."""
        time.sleep(0.2)  # backends of a closed pool exit and are reaped (their CPU counts then)
        after = self.sample()
        us = [(b - a) * 1e6 / max(1, files) for a, b in zip(before, after, strict=True)]
        spent = {"client": us[0], "redis": us[1], "postgres": us[2]}
        return {k: v for k, v in spent.items() if k == "client" or k in uses}


# -- the limits: each component alone, on the same entries ------------------------------------


def limit_redis(s: Settings, cpu: Cpu) -> tuple[float, dict[str, float]]:
    """XREADGROUP + XACK of every entry, nothing else."""
    r = stream.connect(s)
    n = 0
    before = cpu.sample()
    t0 = time.perf_counter()
    while True:
        entries = stream.read_new(r, s.stream, s.group, "limit", s.batch_size, 0)
        if not entries:
            break
        r.xack(s.stream, s.group, *[e[0] for e in entries])
        n += len(entries)
    dt = time.perf_counter() - t0
    spent = cpu.spent(before, n, ("redis",))
    r.close()
    return n / dt, spent


def batches_of(s: Settings) -> Iterator[_native.EntryBatch]:
    r = redis.Redis.from_url(s.redis_url)
    start = b"-"
    while True:
        rows = r.xrange(s.stream, min=start, max="+", count=s.batch_size)
        if not rows:
            break
        yield _native.parse_entries(rows)
        start = b"(" + rows[-1][0]
    r.close()


def limit_files(s: Settings) -> tuple[float, dict[str, float], list[tuple[bytes, int]]]:
    """Measuring every entry's file (size, SHA-256, type) in batches, as the consumer does;
    also returns the COPY buffers of the measured batches for the PostgreSQL limit."""
    batches = list(batches_of(s))
    # One untimed pass first: a consumer reads files the producer has just written, which
    # are in the page cache; the timed pass measures that, not the disk.
    for b in batches:
        _native.measure_local(b, s.local_storage_dir, s.max_file_bytes, s.hash_threads)
    n, spent, cpu, bufs = 0, 0.0, 0.0, []
    for b in batches:
        c0 = time.process_time()
        t0 = time.perf_counter()
        m = _native.measure_local(b, s.local_storage_dir, s.max_file_bytes, s.hash_threads)
        spent += time.perf_counter() - t0
        cpu += time.process_time() - c0
        n += len(b)
        bufs.append((_native.encode_copy(b, m, "limit", stream="limit"), len(b)))
    return n / spent, {"client": cpu * 1e6 / max(1, n)}, bufs


def limit_postgres(
    s: Settings, bufs: list[tuple[bytes, int]], cpu: Cpu, *, direct: bool
) -> tuple[float, dict[str, float]]:
    """COPY of the same rows, as filepipe loads them (one loader per pooled connection)."""
    table_settings = replace(s, table=s.table + ("_d" if direct else "_m"))
    init_db(table_settings, plain=True)
    pool = create_pool(table_settings, min_size=table_settings.pool_size)
    pool.wait()
    loader = Loader(pool, table_settings)
    todo = list(bufs)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                buf, rows = todo.pop()
            loader.load(buf, rows, direct=direct)

    threads = [threading.Thread(target=work) for _ in range(table_settings.pool_size)]
    before = cpu.sample()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    pool.close()
    rows = count_rows(table_settings)
    spent = cpu.spent(before, rows, ("postgres",))
    cleanup(table_settings)
    return rows / dt, spent


# -- one scenario ----------------------------------------------------------------------------


SHARED_LIMIT = "shared limit: the three limits' CPU per file on"


def scenario(
    name: str, base: Settings, keys: list[str], events: int, fast_n: int, old_n: int, cpu: Cpu | None = None
) -> list[Result]:
    """The limits, filepipe and the guide's consumers on `events` events. With `cpu` (the
    local servers' processes), the CPU per file of each run too, and the shared limit."""
    results: list[Result] = []
    cpu = cpu or Cpu(None, None)

    s = fresh(base, keys, events)
    try:
        redis_rate, redis_cpu = limit_redis(s, cpu)
        files_rate, files_cpu, bufs = limit_files(s)
        pg_direct, pg_cpu = limit_postgres(s, bufs, cpu, direct=True)
        pg_merge, merge_cpu = limit_postgres(s, bufs, cpu, direct=False)
    finally:
        cleanup(s)
    results += [
        Result(
            name, "limit: Redis XREADGROUP + XACK", events, events / redis_rate, extra=cpu.extra(redis_cpu)
        ),
        Result(
            name,
            "limit: files (size, SHA-256, type)",
            events,
            events / files_rate,
            extra=cpu.extra(files_cpu),
        ),
        Result(name, "limit: PostgreSQL COPY (direct)", events, events / pg_direct, extra=cpu.extra(pg_cpu)),
        Result(name, "limit: PostgreSQL COPY + merge", events, events / pg_merge, extra=cpu.extra(merge_cpu)),
    ]
    if cpu.known:
        # Each limit above has the cores to itself; filepipe runs all three at once on them. The
        # most the three can do together is the cores over the CPU they need per file, each
        # as measured alone (and never more than the slowest alone).
        cores = os.cpu_count() or 1
        need = sum(sum(c.values()) for c in (redis_cpu, files_cpu, pg_cpu))
        shared = min(cores * 1e6 / need, redis_rate, files_rate, pg_direct)
        results.append(
            Result(
                name,
                f"{SHARED_LIMIT} {cores} cores",
                events,
                events / shared,
                f"{need:.1f} µs of CPU per file",
            )
        )

    s = fresh(base, keys, events)
    try:
        before = cpu.sample()
        stats, dt = timed(lambda: Consumer(s, drain=True, write=None).run())
        spent = cpu.spent(before, events)
        assert stats.inserted == events == count_rows(s), (stats, events)
        results.append(Result(name, "filepipe", events, dt, f"batch {s.batch_size}", cpu.extra(spent)))
    finally:
        cleanup(s)

    for label, fn, n in (
        ("fast consumer (pool, executemany 50)", fast_consumer, fast_n),
        ("old consumer (connection per file)", old_consumer, old_n),
    ):
        if n <= 0:
            continue
        s = fresh(base, keys, n)
        try:
            done, dt = fn(s, n)
            assert done == n == count_rows(s), (label, done, n)
            results.append(Result(name, label, n, dt))
        finally:
            cleanup(s)
    return results


def sweep_point(base: Settings, keys: list[str], events: int) -> Result:
    """filepipe alone at one batch size."""
    s = fresh(base, keys, events)
    try:
        stats, dt = timed(lambda: Consumer(s, drain=True, write=None).run())
        assert stats.inserted == events == count_rows(s)
    finally:
        cleanup(s)
    return Result("batch-size sweep", f"filepipe, batch {s.batch_size}", events, dt)


@contextmanager
def latency(url_port: int, delay_ms: float) -> Iterator[int]:
    """A delaying proxy in its own process; yields its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.proxy", str(url_port), str(delay_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()


def cpu_of(p: psutil.Process, *, children: bool) -> float:
    """User + system seconds of `p` (and, with `children`, of its children, live or reaped)."""
    t = p.cpu_times()
    total = t.user + t.system
    if children:
        total += t.children_user + t.children_system
        for ch in p.children(recursive=True):
            try:
                ct = ch.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass
    return total


def bench_urls() -> tuple[str | None, str | None]:
    """The servers a bench runs against (FILEPIPE_BENCH_*, else the test suite's FILEPIPE_TEST_*)."""
    return (
        os.environ.get("FILEPIPE_BENCH_REDIS_URL") or os.environ.get("FILEPIPE_TEST_REDIS_URL"),
        os.environ.get("FILEPIPE_BENCH_PG_URI") or os.environ.get("FILEPIPE_TEST_PG_URI"),
    )


def bench_servers(stack: ExitStack, *, private: bool = False) -> tuple[str, str]:
    """The servers a bench runs against (`bench_urls`), else (or, `private`, always)
    throwaway ones that `stack` stops."""
    redis_url, pg_uri = bench_urls()
    if private or not redis_url:
        redis_url = stack.enter_context(RedisServer()).url
    if private or not pg_uri:
        pg_uri = stack.enter_context(PostgresServer(durable=True)).uri
    return redis_url, pg_uri


def bench_settings(
    redis_url: str, pg_uri: str, batch_size: int | None, environ: dict[str, str] | None = None
) -> tuple[Settings, Path]:
    """A bench's settings (`environ` over the defaults) and its files' root (FILEPIPE_BENCH_DIR)."""
    root = Path(os.environ.get("FILEPIPE_BENCH_DIR", "/tmp/filepipe-bench"))
    root.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {
        "redis_url": redis_url,
        "pg_uri": pg_uri,
        "local_storage_dir": str(root),
        "block_ms": 100,
    }
    if batch_size:
        overrides["batch_size"] = batch_size
    return load_settings(overrides, environ=environ or {}, dotenv_path=None), root


def port_of(url: str) -> int:
    return urlsplit(url).port or (6379 if url.startswith("redis") else 5432)


def with_port(url: str, port: int) -> str:
    from urllib.parse import urlunsplit

    p = urlsplit(url)
    host = p.netloc.rsplit("@", 1)
    userinfo = host[0] + "@" if len(host) == 2 else ""
    return urlunsplit((p.scheme, f"{userinfo}127.0.0.1:{port}", p.path, p.query, p.fragment))


# -- memory ----------------------------------------------------------------------------------


def memory(base: Settings, keys: list[str], events: int) -> Result:
    """Peak RSS of a `filepipe consume --drain` process draining `events` entries."""
    from tests.support.workload import consumer_env

    s = fresh(base, keys, events)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "filepipe", "consume", "--drain", "-q"],
            env=consumer_env(s),
            cwd=s.local_storage_dir,
        )
        ps = psutil.Process(proc.pid)
        samples: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        while proc.poll() is None:
            try:
                samples.append((time.perf_counter() - t0, ps.memory_info().rss))
            except psutil.Error:
                break
            time.sleep(0.1)
        dt = time.perf_counter() - t0
        assert proc.returncode == 0
        rows = count_rows(s)
        assert rows == events, (rows, events)
    finally:
        cleanup(s)
    peak = max(r for _, r in samples)
    quarters = {
        f"rss_at_{q}pct_mb": round(samples[min(len(samples) - 1, len(samples) * q // 100)][1] / 2**20, 1)
        for q in (10, 25, 50, 75, 95)
    }
    return Result(
        "memory",
        f"filepipe consume --drain, {events:,} backlog",
        events,
        dt,
        f"peak RSS {peak / 2**20:.0f} MB",
        {"peak_rss_mb": round(peak / 2**20, 1), **quarters},
    )


# -- report ----------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    """The results; "of limit" is filepipe over the slowest component alone, "of shared
    limit" over what the three components' CPU per file allows on this machine's cores."""
    lines = [
        "| scenario | pipeline | files | files/s | × fast consumer | × old consumer | of limit | "
        "of shared limit | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    by: dict[str, dict[str, Result]] = {}
    for r in results:
        by.setdefault(r.scenario, {})[r.name] = r
    for r in results:
        group = by[r.scenario]
        fast = group.get("fast consumer (pool, executemany 50)")
        old = group.get("old consumer (connection per file)")
        limits = [x.rate for k, x in group.items() if k.startswith("limit:") and "merge" not in k]
        ceiling = min(limits) if limits else 0.0
        shared = next((x.rate for k, x in group.items() if k.startswith(SHARED_LIMIT)), 0.0)
        is_limit = r.name.startswith(("limit:", SHARED_LIMIT))
        vs_fast = f"{r.rate / fast.rate:.1f}×" if fast and not is_limit and r.scenario != "memory" else ""
        vs_old = f"{r.rate / old.rate:.0f}×" if old and not is_limit and r.scenario != "memory" else ""
        of_limit = f"{r.rate / ceiling:.2f}" if ceiling and r.name == "filepipe" else ""
        of_shared = f"{r.rate / shared:.2f}" if shared and r.name == "filepipe" else ""
        lines.append(
            f"| {r.scenario} | {r.name} | {r.files:,} | {r.rate:,.0f} | {vs_fast} | {vs_old} | "
            f"{of_limit} | {of_shared} | {r.note} |"
        )
    return "\n".join(lines)


def cpu_table(results: list[Result]) -> str:
    """CPU per file of each run that was measured: this process (the client), and the
    Redis and PostgreSQL servers it uses."""
    rows = [r for r in results if "cpu_us" in r.extra]
    if not rows:
        return ""
    lines = [
        "| scenario | run | client µs/file | Redis µs/file | PostgreSQL µs/file | sum |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r.extra["cpu_us"]
        cells = " | ".join(f"{c[k]:.1f}" if k in c else "" for k in ("client", "redis", "postgres"))
        lines.append(f"| {r.scenario} | {r.name} | {cells} | {sum(c.values()):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--files", type=int, default=100_000, help="distinct small files")
    ap.add_argument("--fast", type=int, default=20_000, help="events for the fast-consumer baseline")
    ap.add_argument("--old", type=int, default=2_000, help="events for the old-consumer baseline")
    ap.add_argument(
        "--latency-ms", type=float, default=10.0, help="one-way delay in the cloud scenario (0: skip)"
    )
    ap.add_argument("--cloud-events", type=int, default=50_000)
    ap.add_argument("--cloud-fast", type=int, default=500)
    ap.add_argument("--cloud-old", type=int, default=60)
    ap.add_argument("--memory", type=int, default=1_000_000, help="backlog for the RSS run (0: skip)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument(
        "--sweep",
        default="500,1000,2000,5000,10000",
        help="batch sizes for the local batch-size sweep (empty: skip)",
    )
    ap.add_argument("--out", type=Path, default=Path("artifacts"))
    args = ap.parse_args(argv)

    with ExitStack() as stack:
        redis_url, pg_uri = bench_servers(stack)
        base, root = bench_settings(redis_url, pg_uri, args.batch_size)
        keys = make_files(root, args.files)
        print(
            f"filepipe bench: {args.events:,} events, {len(keys):,} files of 1-4 KiB, "
            f"batch {base.batch_size}, {os.cpu_count()} cores",
            flush=True,
        )

        local_cpu = Cpu.of(base)
        results = scenario("local", base, keys, args.events, args.fast, args.old, local_cpu)
        print(table(results) + "\n\n" + cpu_table(results), flush=True)
        for size in [int(x) for x in args.sweep.split(",") if x.strip()]:
            results.append(sweep_point(replace(base, batch_size=size), keys, args.events))
        if args.latency_ms > 0:
            rp = stack.enter_context(latency(port_of(redis_url), args.latency_ms))
            pp = stack.enter_context(latency(port_of(pg_uri), args.latency_ms))
            cloud = replace(base, redis_url=with_port(redis_url, rp), pg_uri=with_port(pg_uri, pp))
            results += scenario(
                f"cloud ({2 * args.latency_ms:.0f} ms RTT)",
                cloud,
                keys,
                args.cloud_events,
                args.cloud_fast,
                args.cloud_old,
            )
        if args.memory > 0:
            results.append(memory(base, keys, args.memory))

    report = table(results) + "\n\n" + cpu_table(results)
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-e2e.md").write_text(report + "\n")
    (args.out / "bench-e2e.json").write_text(
        json.dumps([{**asdict(r), "rate": r.rate} for r in results], indent=2)
    )
    return results


if __name__ == "__main__":
    main()
