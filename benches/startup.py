"""How long `filepipe` takes to start: `consume --drain` on an empty stream (the start-up a
short batch job or a restarted `--processes` worker pays), and `--help` (the command line
alone). Each is run `--runs` times as a real subprocess; best and median wall time, and CPU
time (user + sys) of the best, are printed. A shared machine makes the median noisy: the best
is the figure to compare.

    python -m benches.startup --runs 15

Uses FILEPIPE_BENCH_REDIS_URL / _PG_URI (or the FILEPIPE_TEST_* ones): a scratch stream and
a scratch plain table, dropped at the end."""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid


def timed(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one `python -m filepipe ARGS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "filepipe", *args], env=env, capture_output=True, check=False
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"filepipe {' '.join(args)} exited {done.returncode}: {done.stderr.decode()}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(label: str, args: list[str], env: dict[str, str], runs: int) -> None:
    timed(args, env)  # warm the page cache and the bytecode
    results = [timed(args, env) for _ in range(runs)]
    walls = sorted(w for w, _ in results)
    best = min(results)
    print(
        f"{label:<32} best {best[0]:.3f} s (CPU {best[1]:.3f} s), median {statistics.median(walls):.3f} s, "
        f"{runs} runs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    redis_url = os.environ.get("FILEPIPE_BENCH_REDIS_URL") or os.environ.get("FILEPIPE_TEST_REDIS_URL")
    pg_uri = os.environ.get("FILEPIPE_BENCH_PG_URI") or os.environ.get("FILEPIPE_TEST_PG_URI")
    if not redis_url or not pg_uri:
        raise SystemExit(
            "set FILEPIPE_BENCH_REDIS_URL and FILEPIPE_BENCH_PG_URI (or the FILEPIPE_TEST_* ones)"
        )
    name = f"startup_{uuid.uuid4().hex[:8]}"
    # As installed: with the bytecode cached (PYTHONDONTWRITEBYTECODE would have every run
    # compile the package's sources again, a tenth of a second and more).
    env = {
        **{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
        "REDIS_URL": redis_url,
        "PG_URI": pg_uri,
        "STREAM_NAME": name,
        "FILEPIPE_TABLE": name,
    }
    subprocess.run(
        [sys.executable, "-m", "filepipe", "init-db", "--plain"], env=env, check=True, capture_output=True
    )
    try:
        measure("filepipe --help", ["--help"], env, args.runs)
        measure("filepipe consume --help", ["consume", "--help"], env, args.runs)
        measure("consume --drain (empty stream)", ["consume", "--drain", "-q"], env, args.runs)
    finally:
        import psycopg
        import redis

        r = redis.Redis.from_url(redis_url)
        keys = list(r.scan_iter(match=f"*{name}*", count=1000))
        if keys:
            r.delete(*keys)
        with psycopg.connect(pg_uri, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {name}")


if __name__ == "__main__":
    main()
