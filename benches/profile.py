"""Where the consumer's CPU goes: per stage, per file, for `filepipe consume --drain`
of a backlog of small files (what `make bench` writes to artifacts/profile.md).

    python -m benches.profile                       # 200,000 events
    python -m benches.profile --events 1000000
    python -m benches.profile --python /other/venv/bin/python   # another build, same run
    python -m benches.profile --python .venv/bin/python --python "FILEPIPE_IO_URING=0 .venv/bin/python"

Three runs of the same drain, each on a fresh stream of --events entries over the
benches' small files (1-4 KiB), read once before each drain (in the page cache):
1. plain: the process's user and system CPU (rusage) and peak RSS; minus the CPU of a
   drain of an empty stream (start-up), over the files: CPU µs per file.
2. under py-spy (--native, every thread): the on-CPU samples, classified by thread and
   frame into stages; a stage's µs per file is its share of the samples times (1).
3. under perf (cpu-clock) if it can record here: the share of the kernel, the
   interpreter, the extension and each library, and the top kernel symbols.
And, with strace present, the system calls per file of a smaller drain.

Uses FILEPIPE_BENCH_REDIS_URL / _PG_URI (or the FILEPIPE_TEST_* ones)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benches.e2e import bench_settings, bench_urls, cleanup, count_rows, fresh, make_files
from filepipe.config import Settings


@dataclass
class Drain:
    """One `consume --drain` process."""

    files: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_mb: float

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def split_build(build: str) -> tuple[dict[str, str], str]:
    """A build as given to --python: an interpreter, after any NAME=VALUE settings for
    its runs (`FILEPIPE_IO_URING=0 .venv/bin/python`)."""
    words = build.split()
    settings = dict(w.split("=", 1) for w in words[:-1] if "=" in w)
    return settings, os.path.abspath(words[-1])


def consumer_command(build: str) -> list[str]:
    return [split_build(build)[1], "-m", "filepipe", "consume", "--drain", "-q"]


def build_env(s: Settings, build: str) -> dict[str, str]:
    from tests.support.workload import consumer_env

    return {**consumer_env(s), **split_build(build)[0]}


def drain(s: Settings, files: int, python: str, wrap: list[str] | None = None) -> Drain:
    """Runs one drain (under `wrap`, a profiler, if given) and returns its rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*(wrap or []), *consumer_command(python)],
        env=build_env(s, python),
        cwd=s.local_storage_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"the drain failed ({proc.returncode}): {err.strip()[-400:]}")
    rows = count_rows(s)
    if rows != files:
        raise SystemExit(f"the drain loaded {rows} rows of {files}")
    return Drain(files, wall, ru.ru_utime, ru.ru_stime, ru.ru_maxrss / 1024)


def warm(root: Path, keys: list[str]) -> None:
    """Reads every file once, so that each drain finds them all in the page cache: a
    file evicted meanwhile (memory pressure from other work on the machine) would be
    read from disk, and the kernel's share would measure the disk, not the consumer."""
    for key in keys:
        with open(root / key, "rb") as f:
            f.read()


def on_fresh(
    base: Settings, keys: list[str], events: int, python: str, wrap: list[str] | None = None
) -> Drain:
    s = fresh(base, keys, events)
    warm(Path(s.local_storage_dir), keys)
    try:
        return drain(s, events, python, wrap)
    finally:
        cleanup(s)


@dataclass
class Profile:
    events: int
    python: str
    startup: Drain
    plain: Drain
    cpu_us_per_file: float
    user_us_per_file: float
    sys_us_per_file: float
    # stage -> what the CPU does there -> µs per file
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    kernel_symbols: dict[str, float] = field(default_factory=dict)
    syscalls_per_file: dict[str, float] = field(default_factory=dict)
    note: list[str] = field(default_factory=list)


# -- stages --------------------------------------------------------------------------------

# A consumer thread's name (its Python name, or the name the extension gives its own
# threads) -> the stage it runs.
THREADS: list[tuple[str, str]] = [
    ("MainThread", "read (XREADGROUP, reply parsing, hand-over)"),
    ("filepipe-preparer", "prepare (parse_entries, encode_copy, dead letters; its share of measuring)"),
    ("filepipe-measur", "measure files (the extension's pooled threads: openat2, fstat, read, SHA-256)"),
    ("filepipe-loader", "load (COPY)"),
    ("filepipe-acker", "ack (XACK)"),
]
OTHER_THREADS = "other threads (housekeeping, heartbeat, pool)"
MEASURE = THREADS[2][1]

# What the CPU does, from a perf sample's symbol and object, first match wins.
KINDS: list[tuple[str, re.Pattern[str]]] = [
    ("kernel", re.compile(r"\[kernel")),
    (
        "garbage collector",
        re.compile(
            r"^(gc_collect_main|visit_decref|visit_reachable|move_unreachable|"
            r"\w+_traverse|subtract_refs|update_refs|deduce_unreachable|"
            r"gc_collect_\w+|_PyGC_\w+|move_legacy_finalizers|"
            r"handle_legacy_finalizers|finalize_garbage|delete_garbage) "
        ),
    ),
    ("hiredis (reply → objects)", re.compile(r"hiredis")),
    ("reply in place (extension)", re.compile(r"filepipe::resp::|ReplyReader|filepipe::python::Reply")),
    ("SHA-256", re.compile(r"sha2::")),
    ("extension (other)", re.compile(r"_native")),
    ("interpreter", re.compile(r"libpython|/python3")),
    ("libc, allocator", re.compile(r"libc\.so|ld-linux|libm\.so")),
    ("libpq, psycopg, TLS", re.compile(r"libpq|psycopg|pq\.|libssl|libcrypto")),
]


def kind_of(sym: str, dso: str) -> str:
    text = f"{sym} ({dso})"
    for kind, pattern in KINDS:
        if pattern.search(text):
            return kind
    return "other"


def stage_of(name: str) -> str:
    for prefix, stage in THREADS:
        if name.startswith(prefix):
            return stage
    return OTHER_THREADS


def thread_names(pid: int, py_spy: str) -> dict[int, str]:
    """os thread id -> Python thread name, from one py-spy dump (a pause of a few ms)."""
    out = subprocess.run([py_spy, "dump", "--pid", str(pid), "--json"], capture_output=True, text=True)
    try:
        threads = json.loads(out.stdout)
        return {
            t["os_thread_id"]: t["thread_name"] or ("MainThread" if t["os_thread_id"] == pid else "")
            for t in threads
        }
    except (ValueError, KeyError, TypeError):
        return {}


def profiled(base: Settings, keys: list[str], events: int, python: str, prof: Profile) -> None:
    """One drain under perf (attached after start-up) with its threads named by py-spy:
    the CPU of each stage, by what it does."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not shutil.which("perf") or not py_spy:
        prof.note.append("perf or py-spy is not installed: no per-stage breakdown")
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        probe = subprocess.run(
            ["perf", "record", "-q", "-e", "cpu-clock", "-o", str(data), "--", "true"],
            capture_output=True,
            text=True,
        )
        if probe.returncode != 0:
            prof.note.append(f"perf cannot record here: {probe.stderr.strip()[:200]}")
            return
        s = fresh(base, keys, events)
        warm(Path(s.local_storage_dir), keys)
        names: dict[int, str] = {}
        try:
            proc = subprocess.Popen(
                consumer_command(python),
                env=build_env(s, python),
                cwd=s.local_storage_dir,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # Attached once the consumer has started its threads: the start-up is left out, as
            # it is from the CPU per file.
            while proc.poll() is None and not any(
                n.startswith("filepipe-loader") for n in thread_names(proc.pid, py_spy).values()
            ):
                time.sleep(0.05)
            rec = subprocess.Popen(
                [
                    "perf",
                    "record",
                    "-q",
                    "-e",
                    "cpu-clock",
                    "-F",
                    "999",
                    "-p",
                    str(proc.pid),
                    "-o",
                    str(data),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            while proc.poll() is None:
                names.update(thread_names(proc.pid, py_spy))
                time.sleep(0.5)
            rec.wait(60)
            if proc.returncode != 0 or count_rows(s) != events:
                prof.note.append("the profiled drain failed")
                return
        finally:
            cleanup(s)
        script = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "comm,tid,ip,sym,dso"], capture_output=True, text=True
        ).stdout
    cells: Counter[tuple[str, str]] = Counter()
    symbols: Counter[str] = Counter()
    for line in script.splitlines():
        m = re.match(r"\s*(.+?)\s+(\d+)\s+[0-9a-f]+\s+(.*?)\s+\(([^)]*)\)\s*$", line)
        if not m:
            continue
        comm, tid, sym, dso = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        name = names.get(tid) or comm
        # A thread py-spy does not know and perf calls by the interpreter's name is the
        # extension's (measuring) or the interpreter's own (none run here).
        stage = stage_of(name) if tid in names or comm.startswith("filepipe") else MEASURE
        kind = kind_of(sym, dso)
        cells[(stage, kind)] += 1
        if kind == "kernel":
            symbols[sym.split("+")[0]] += 1
    total = sum(cells.values())
    if not total:
        prof.note.append("perf recorded no sample")
        return
    per = prof.cpu_us_per_file / total
    for (stage, kind), n in cells.items():
        prof.stages[stage] = prof.stages.get(stage, {})
        prof.stages[stage][kind] = round(n * per, 3)
    kernel = sum(n for (_, k), n in cells.items() if k == "kernel")
    prof.kernel_symbols = (
        {k: round(100 * v / kernel, 1) for k, v in symbols.most_common(12)} if kernel else {}
    )
    prof.note.append(
        f"perf: {total} samples at 999 Hz after start-up ({total / 999:.2f} s of CPU; the plain "
        f"drain's CPU minus start-up: {prof.plain.cpu_s - prof.startup.cpu_s:.2f} s)"
    )


def strace(base: Settings, keys: list[str], events: int, python: str, prof: Profile) -> None:
    if not shutil.which("strace"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "strace.txt"
        on_fresh(base, keys, events, python, ["strace", "-f", "-c", "-o", str(out)])
        empty = Path(tmp) / "strace-empty.txt"
        on_fresh(base, keys, 0, python, ["strace", "-f", "-c", "-o", str(empty)])

        def calls(p: Path) -> Counter[str]:
            c: Counter[str] = Counter()
            for line in p.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    c[parts[-1]] += int(parts[3])
            return c

        per = calls(out)
        per.subtract(calls(empty))
        prof.syscalls_per_file = {k: round(v / events, 2) for k, v in per.most_common(12) if v > 0}
        prof.syscalls_per_file["total"] = round(sum(v for v in per.values() if v > 0) / events, 2)


def profile(base: Settings, keys: list[str], events: int, python: str, strace_events: int) -> Profile:
    startups = sorted((on_fresh(base, keys, 0, python) for _ in range(3)), key=lambda d: d.cpu_s)
    startup = startups[1]
    plain = on_fresh(base, keys, events, python)
    cpu = plain.cpu_s - startup.cpu_s
    prof = Profile(
        events,
        python,
        startup,
        plain,
        cpu_us_per_file=round(cpu / events * 1e6, 2),
        user_us_per_file=round((plain.user_s - startup.user_s) / events * 1e6, 2),
        sys_us_per_file=round((plain.sys_s - startup.sys_s) / events * 1e6, 2),
    )
    profiled(base, keys, events, python, prof)
    if strace_events:
        strace(base, keys, strace_events, python, prof)
    return prof


def render(profiles: list[Profile]) -> str:
    """The profiles as markdown; with two, the second's ratios against the first."""
    head = profiles[0]
    lines = [f"# Where the consumer's CPU goes ({head.events:,} small files, `consume --drain`)", ""]
    lines += [
        "| build | CPU µs/file | user | sys | × first | wall s | files/s | peak RSS MB | start-up CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in profiles:
        ratio = f"{p.cpu_us_per_file / head.cpu_us_per_file:.2f}" if head.cpu_us_per_file else ""
        lines.append(
            f"| {p.python} | {p.cpu_us_per_file:.1f} | {p.user_us_per_file:.1f} | "
            f"{p.sys_us_per_file:.1f} | {ratio} | {p.plain.wall_s:.2f} | "
            f"{p.events / p.plain.wall_s:,.0f} | {p.plain.peak_rss_mb:.0f} | {p.startup.cpu_s:.2f} |"
        )
    kinds = [k for k, _ in KINDS] + ["other"]
    for p in profiles:
        if not p.stages:
            continue
        used = [k for k in kinds if any(k in v for v in p.stages.values())]
        lines += [
            "",
            f"Per stage, µs of CPU per file ({p.python}; perf samples after start-up, by thread, "
            "scaled to the CPU per file):",
            "",
            "| stage | total | " + " | ".join(used) + " |",
            "|---|---:|" + "---:|" * len(used),
        ]
        order = sorted(p.stages.items(), key=lambda kv: -sum(kv[1].values()))
        for stage, by_kind in order:
            lines.append(
                f"| {stage} | {sum(by_kind.values()):.2f} | "
                + " | ".join(f"{by_kind.get(k, 0):.2f}" for k in used)
                + " |"
            )
        lines.append(
            "| all | "
            + f"{sum(sum(v.values()) for v in p.stages.values()):.2f} | "
            + " | ".join(f"{sum(v.get(k, 0) for v in p.stages.values()):.2f}" for k in used)
            + " |"
        )
        if p.kernel_symbols:
            top = ", ".join(f"{k} {v:.0f}" for k, v in list(p.kernel_symbols.items())[:10])
            lines.append(f"\nKernel time by symbol, % of the kernel's: {top}")
    sys_calls = list(dict.fromkeys(k for p in profiles for k in p.syscalls_per_file))
    if sys_calls:
        lines += [
            "",
            "System calls per file (strace -c -f, minus an empty drain's):",
            "",
            "| call | " + " | ".join(p.python for p in profiles) + " |",
            "|---|" + "---:|" * len(profiles),
        ]
        for k in sys_calls:
            lines.append(
                f"| {k} | " + " | ".join(f"{p.syscalls_per_file.get(k, 0):.2f}" for p in profiles) + " |"
            )
    for p in profiles:
        for n in p.note:
            lines.append(f"\n- {p.python}: {n}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Profile]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--files", type=int, default=100_000, help="distinct small files")
    ap.add_argument(
        "--python",
        action="append",
        default=[],
        help="interpreter of a build to profile, after any NAME=VALUE settings for its runs "
        "(repeatable; default: this one)",
    )
    ap.add_argument("--strace-events", type=int, default=20_000, help="events of the strace run (0: skip)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("artifacts"))
    args = ap.parse_args(argv)

    redis_url, pg_uri = bench_urls()
    if not redis_url or not pg_uri:
        raise SystemExit(
            "set FILEPIPE_BENCH_REDIS_URL and FILEPIPE_BENCH_PG_URI (or the FILEPIPE_TEST_* ones)"
        )
    base, root = bench_settings(redis_url, pg_uri, args.batch_size)
    keys = make_files(root, args.files)
    profiles = [
        profile(base, keys, args.events, py, args.strace_events) for py in (args.python or [sys.executable])
    ]
    report = render(profiles)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.md").write_text(report)
    (args.out / "profile.json").write_text(json.dumps([asdict(p) for p in profiles], indent=2))
    return profiles


if __name__ == "__main__":
    main()
