"""Where the end-to-end time goes: one drain of the e2e workload, with the CPU of every
process (the consumer per thread, Redis, PostgreSQL's postmaster and backends) and the
busy time of each stage of the consumer, per file and as a share of the wall time.

    python -m benches.e2e_breakdown --events 50000
    FILEPIPE_POOL_SIZE=1 python -m benches.e2e_breakdown --events 50000   # one COPY stream

Uses FILEPIPE_BENCH_REDIS_URL / _PG_URI (or the FILEPIPE_TEST_* ones) like benches.e2e;
with --private (or without them) it starts throwaway servers, so that their CPU is this
run's alone. A 2-core machine shared by the three: the sum of the CPU per file over the
cores is the floor of the wall time per file, whatever the stages overlap."""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from filepipe import stream
from filepipe.consumer import Consumer

from .e2e import (
    bench_servers,
    bench_settings,
    cleanup,
    count_rows,
    cpu_of,
    fresh,
    make_files,
    port_of,
    replace,
)


def listener(port: int) -> psutil.Process:
    """The process listening on 127.0.0.1:`port`."""
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid)
    raise RuntimeError(f"no process listens on port {port}")


comms: dict[int, str] = {}  # thread names as the kernel knows them (the extension's too)


def thread_cpu() -> dict[int, tuple[float, float]]:
    """Seconds on a CPU, and runnable but waiting for one, of every thread of this process,
    by native id (schedstat: ns)."""
    out: dict[int, tuple[float, float]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            on, waiting = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[:2]
            out[int(tid)] = (int(on) / 1e9, int(waiting) / 1e9)
            if int(tid) not in comms:
                comms[int(tid)] = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue
    return out


class Clock:
    """Busy seconds per named activity, summed over threads."""

    def __init__(self) -> None:
        self.busy: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.spans: list[tuple[str, float, float]] = []
        self._lock = threading.Lock()

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.spans.append((name, t0, t0 + dt))
                    self.busy[name] += dt
                    self.calls[name] += 1

        return timed


@contextmanager
def patched(obj: Any, attr: str, clock: Clock, name: str) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, clock.wrap(name, old))
    try:
        yield
    finally:
        setattr(obj, attr, old)


def run(s: Any, redis_proc: psutil.Process, pg_proc: psutil.Process) -> tuple[str, dict[str, float]]:
    clock = Clock()
    names: dict[int, str] = {}
    with ExitStack() as stack:
        # The Redis calls of the reader and of the acknowledger, timed where the stages call them.
        stack.enter_context(patched(stream, "read_new", clock, "reader: XREADGROUP"))
        stack.enter_context(patched(stream, "ack", clock, "acker: ack script"))
        cpu0 = (time.process_time(), cpu_of(redis_proc, children=False), cpu_of(pg_proc, children=True))
        threads0 = thread_cpu()
        machine0 = psutil.cpu_times()
        t0 = time.perf_counter()
        consumer = Consumer(s, drain=True, write=None)
        t_built = time.perf_counter()
        c = consumer
        timeline: list[tuple[float, int]] = []  # (when a batch was handed to the preparer, entries)

        def note(raw: Any, *rest: Any, submit: Callable[..., bool] = c.reader._submit_to) -> bool:
            timeline.append((time.perf_counter(), len(raw[1])))
            return submit(raw, *rest)

        c.reader._submit_to = note
        c.preparing.handle = clock.wrap("preparer: prepare (busy)", c.preparing.handle)
        c.loading.handle = clock.wrap("loaders: load + hand to acker (busy, summed)", c.loading.handle)
        c.acking.handle = clock.wrap("acker: finish_batch (busy)", c.acking.handle)
        c.reader._submit_to = clock.wrap("reader: hand to preparer (waiting for room)", c.reader._submit_to)
        c.load.loader.load = clock.wrap("loaders: COPY + COMMIT (summed)", c.load.loader.load)
        c.files.measure = clock.wrap("preparer: measure files", c.files.measure)
        c.loading.put = clock.wrap("preparer: hand to loaders (waiting for room)", c.loading.put)
        c.acking.put = clock.wrap("loaders: hand to acker (waiting for room)", c.acking.put)
        started: list[float] = []
        c.reader.run = lambda run=c.reader.run: (started.append(time.perf_counter()), run())[1]  # type: ignore[method-assign]
        done = threading.Event()
        seen: dict[int, tuple[float, float]] = {}  # the last CPU seen of each thread (they end with the run)

        def names_of_threads() -> None:
            while not done.is_set():
                for t in threading.enumerate():
                    if t.native_id is not None:
                        names[t.native_id] = t.name
                seen.update(thread_cpu())
                done.wait(0.01)

        watcher = threading.Thread(target=names_of_threads, daemon=True)
        watcher.start()
        stats = consumer.run()
        t_end = time.perf_counter()
        machine1 = psutil.cpu_times()
        done.set()
        watcher.join()
        threads1 = {**seen, **thread_cpu()}
        time.sleep(0.3)  # the backends of the closed pool exit and are reaped
        cpu1 = (time.process_time(), cpu_of(redis_proc, children=False), cpu_of(pg_proc, children=True))
    assert stats.inserted == count_rows(s), stats
    n = stats.inserted
    wall = t_end - t0
    running = t_end - (started[0] if started else t_built)
    consumer_cpu, redis_cpu, pg_cpu = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    me = threading.get_native_id()
    names[me] = "reader (main thread)"
    per_thread: dict[str, float] = defaultdict(float)
    runnable: dict[str, float] = defaultdict(float)
    threads1.pop(watcher.native_id or 0, None)
    for tid, (sec, waited) in threads1.items():
        on0, wait0 = threads0.get(tid, (0.0, 0.0))
        spent = sec - on0
        if spent > 0.0005:
            name = names.get(tid) or comms.get(tid, "?")
            name = name.rsplit("-", 1)[0] if name.startswith("filepipe-loader") else name
            per_thread[name] += spent
            runnable[name] += waited - wait0
    per_thread["(not sampled: threads' last 10 ms)"] = consumer_cpu - sum(per_thread.values())
    us = 1e6 / n
    lines = [
        f"{n:,} files, batch {s.batch_size}, pool {s.pool_size}, in flight {s.in_flight}, "
        f"hash threads {s.hash_threads}, {psutil.cpu_count()} cores",
        f"wall {wall:.3f} s ({n / wall:,.0f} files/s); from the first read {running:.3f} s "
        f"({n / running:,.0f} files/s); start {(started[0] if started else t_built) - t0:.3f} s",
        "",
        "| CPU | seconds | µs per file | of wall × cores |",
        "|---|---:|---:|---:|",
    ]
    cores = psutil.cpu_count() or 1
    for label, sec in (
        ("consumer (this process)", consumer_cpu),
        ("Redis", redis_cpu),
        ("PostgreSQL (postmaster + backends)", pg_cpu),
        ("sum", consumer_cpu + redis_cpu + pg_cpu),
    ):
        lines.append(f"| {label} | {sec:.3f} | {sec * us:.1f} | {sec / (wall * cores):.2f} |")
    busy = sum(machine1) - sum(machine0) - (machine1.idle - machine0.idle)
    idle = machine1.idle - machine0.idle
    ours = consumer_cpu + redis_cpu + pg_cpu
    lines.append(
        f"| everything else on the machine | {busy - ours:.3f} | | {(busy - ours) / (wall * cores):.2f} |"
    )
    lines.append(f"| idle | {idle:.3f} | | {idle / (wall * cores):.2f} |")
    lines += [
        "",
        "| consumer thread | CPU s | µs per file | runnable, waiting for a core, s |",
        "|---|---:|---:|---:|",
    ]
    for name, sec in sorted(per_thread.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {sec:.3f} | {sec * us:.1f} | {runnable.get(name, 0.0):.3f} |")
    lines += [
        "",
        "| stage activity (wall, summed over its threads) | seconds | of the run | calls |",
        "|---|---:|---:|---:|",
    ]
    for name in sorted(clock.busy):
        lines.append(
            f"| {name} | {clock.busy[name]:.3f} | {clock.busy[name] / running:.2f} | {clock.calls[name]} |"
        )
    first = started[0] if started else t_built
    ramp = [(when, k) for when, k in timeline if k < s.batch_size]
    if ramp:
        got = sum(k for _, k in ramp)
        lines.append(
            f"\nreads below the batch size: {len(ramp)} of {len(timeline)}, {got:,} entries, "
            f"handed over by {ramp[-1][0] - first:.3f} s after the first read ({got / n:.0%} of the entries)"
        )
    lines.append(
        "timeline (ms after the first read, entries): "
        + ", ".join(f"{(w - first) * 1000:.0f}:{k}" for w, k in timeline)
    )
    tail = timeline[-1][0]
    for label in (
        "preparer: prepare (busy)",
        "loaders: COPY + COMMIT (summed)",
        "acker: finish_batch (busy)",
    ):
        spans = [(a, b) for name, a, b in clock.spans if name == label and b > tail]
        lines.append(
            f"after the last hand-over, {label}: "
            + ", ".join(f"{(a - tail) * 1000:.0f}-{(b - tail) * 1000:.0f} ms" for a, b in spans)
        )
    lines.append(f"after the last hand-over: {t_end - timeline[-1][0]:.3f} s to the end of run()")
    summary = {
        "files/s": n / wall,
        "µs/file": ours * us,
        "ours": ours / (wall * cores),
        "others": (busy - ours) / (wall * cores),
        "idle": idle / (wall * cores),
    }
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--private", action="store_true", help="throwaway Redis and PostgreSQL servers")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument(
        "--pool-sizes",
        default="",
        help="FILEPIPE_POOL_SIZE values to alternate, run after run (one COPY stream vs two: 1,2)",
    )
    args = ap.parse_args(argv)
    with ExitStack() as stack:
        redis_url, pg_uri = bench_servers(stack, private=args.private)
        base, root = bench_settings(redis_url, pg_uri, args.batch_size, environ=dict(os.environ))
        keys = make_files(root, args.files)
        redis_proc = listener(port_of(redis_url))
        pg_proc = listener(urlsplit(pg_uri).port or 5432)
        pools = [int(x) for x in args.pool_sizes.split(",") if x.strip()] or [base.pool_size]
        summaries: list[tuple[int, dict[str, float]]] = []
        for _ in range(args.runs):
            for pool in pools:
                s = fresh(replace(base, pool_size=pool), keys, args.events)
                try:
                    text, summary = run(s, redis_proc, pg_proc)
                    print(text, "\n", flush=True)
                    summaries.append((pool, summary))
                finally:
                    cleanup(s)
        print("| pool | files/s | CPU µs/file (ours) | cores: ours | others | idle |")
        print("|---:|---:|---:|---:|---:|---:|")
        for pool, m in sorted(summaries, key=lambda x: x[0]):
            print(
                f"| {pool} | {m['files/s']:,.0f} | {m['µs/file']:.1f} | {m['ours']:.2f} | "
                f"{m['others']:.2f} | {m['idle']:.2f} |"
            )


if __name__ == "__main__":
    main()
