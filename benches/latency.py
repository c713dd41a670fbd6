"""How long a drain takes behind a slow network: `filepipe consume --drain` as a real
subprocess, through a proxy adding --delay-ms each way in front of both Redis and
PostgreSQL, on 1 event (the start and the stop alone) and on --events events. With
--pythonpath, each other build (a checkout's `python/` directory, its extension built in
place) runs too, the runs of a pair alternating their order; the medians and their ratio
are printed.

    python -m benches.latency                                   # this build
    python -m benches.latency --pythonpath /other/checkout/python --pairs 8

Starts throwaway servers unless FILEPIPE_BENCH_REDIS_URL / _PG_URI (or the FILEPIPE_TEST_*
ones) are set."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack

from benches.e2e import (
    bench_servers,
    bench_settings,
    cleanup,
    count_rows,
    fresh,
    latency,
    make_files,
    port_of,
    with_port,
)
from filepipe.config import Settings


def drain(s: Settings, pythonpath: str, redis_port: int, pg_port: int) -> float:
    """Wall seconds of one `consume --drain` of `s`'s stream, through the proxies."""
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "REDIS_URL": with_port(s.redis_url, redis_port),
        "PG_URI": with_port(s.pg_uri, pg_port),
        "STREAM_NAME": s.stream,
        "FILEPIPE_TABLE": s.table,
        "LOCAL_STORAGE_DIR": s.local_storage_dir,
    }
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "filepipe", "consume", "--drain", "-q"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"consume --drain exited {done.returncode}: {done.stderr.strip()}")
    return wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--pairs", type=int, default=4, help="runs of each build per event count")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (20 ms round trips)")
    ap.add_argument("--pythonpath", action="append", default=[], help="another build to compare")
    args = ap.parse_args(argv)
    builds = ["", *args.pythonpath]  # "": this build (the installed package)

    with ExitStack() as stack:
        redis_url, pg_uri = bench_servers(stack)
        base, root = bench_settings(redis_url, pg_uri, None)
        keys = make_files(root, min(args.events, 20_000))
        rp = stack.enter_context(latency(port_of(redis_url), args.delay_ms))
        pp = stack.enter_context(latency(port_of(pg_uri), args.delay_ms))
        print(
            f"latency bench: consume --drain behind {args.delay_ms:g} ms each way, "
            f"{args.pairs} runs of each build, alternating",
            flush=True,
        )
        for events in (1, args.events):
            times: dict[str, list[float]] = {b: [] for b in builds}
            for i in range(args.pairs):
                for build in builds if i % 2 == 0 else builds[::-1]:
                    s = fresh(base, keys, events)
                    try:
                        times[build].append(drain(s, build, rp, pp))
                        if count_rows(s) != events:
                            raise SystemExit(f"{build or 'this build'}: {count_rows(s)} rows of {events}")
                    finally:
                        cleanup(s)
            mine = statistics.median(times[""])
            for build in builds:
                median = statistics.median(times[build])
                runs = " ".join(f"{t:.3f}" for t in times[build])
                ratio = "" if not build else f"  ({median / mine:.2f}× this build's time)"
                label = build or "this build"
                print(f"  {events:>7,} events  {label:<40} median {median:.3f} s{ratio}  [{runs}]")


if __name__ == "__main__":
    main()
