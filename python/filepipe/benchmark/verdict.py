"""The verdict: each figure graded, the one component that limits throughput named, and
the fix that would help most, with what the model expects of it."""

from dataclasses import dataclass, field, replace
from typing import Any

from .figures import COMPONENTS, Figures, StorageFigures
from .model import Model

NAMES = {"redis": "Redis", "postgres": "PostgreSQL", "storage": "storage", "consumer": "the consumer"}
ALARMS = {
    "redis": "REDIS IS THE BOTTLENECK!",
    "postgres": "DATABASE IS THE BOTTLENECK!",
    "storage": "STORAGE IS THE BOTTLENECK!",
    "consumer": "THE CONSUMER IS THE BOTTLENECK!",
}


# -- grades ---------------------------------------------------------------------------------


def grade_round_trip(ms: float) -> tuple[str, bool]:
    """(mark, slow) for a network round trip."""
    if ms < 2:
        return "✓ Excellent (local)", False
    if ms < 25:
        return "✓ Good for cloud", False
    if ms < 50:
        return "⚠ High latency", True
    return "⚠ SLOW!", True


def grade_connect(ms: float) -> tuple[str, bool]:
    if ms < 50:
        return "✓ Fast", False
    if ms < 150:
        return "✓ Good for cloud", False
    return "⚠ SLOW!", True


def grade_new_connection(ms: float) -> tuple[str, bool]:
    if ms < 100:
        return "✓ Cheap (and filepipe pools them)", False
    return "⚠ Creating connections is expensive!", True


def grade_copy(rows_per_s: float) -> tuple[str, bool]:
    if rows_per_s >= 20_000:
        return "✓ Good", False
    return "⚠ SLOW!", True


def grade_storage(st: StorageFigures) -> tuple[str, bool]:
    if st.kind == "s3":
        one = st.one_file.p50 if st.one_file else 0.0
        if one >= 150 or (st.mb_per_s < 20 and st.files_per_s < 200):
            return "⚠ SLOW!", True
        return ("✓ Good", False) if one < 50 else ("✓ Good for cloud", False)
    if st.mb_per_s >= 100 or st.files_per_s >= 2000:
        return "✓ Good", False
    if st.mb_per_s >= 30 or st.files_per_s >= 500:
        return "⚠ Slow disk", True
    return "⚠ SLOW!", True


def slow_components(figures: Figures) -> dict[str, list[str]]:
    """Each component's figures graded slow, by name."""
    out: dict[str, list[str]] = {c: [] for c in COMPONENTS}
    r, pg = figures.redis, figures.postgres
    if r.status == "ok" and grade_round_trip(r.rtt_ms)[1]:
        out["redis"].append(f"round trip {r.rtt_ms:.1f} ms")
    if pg.status == "ok":
        if grade_round_trip(pg.rtt_ms)[1]:
            out["postgres"].append(f"round trip {pg.rtt_ms:.1f} ms")
        if grade_connect(pg.connect_ms)[1]:
            out["postgres"].append(f"connection {pg.connect_ms:.0f} ms")
        if pg.copy_s > 0 and grade_copy(pg.copy_rows_per_s)[1]:
            out["postgres"].append(f"COPY {pg.copy_rows_per_s:,.0f} rows/s")
    st = figures.storage
    if st is not None and st.status == "ok" and grade_storage(st)[1]:
        out["storage"].append(f"{st.mb_per_s:.0f} MB/s" if st.kind == "local" else "GET latency")
    return out


# -- the verdict ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fix:
    """What to change, and what the model expects of it."""

    solution: str
    factor: float | None = None  # the expected speed-up, when the model can tell
    improvement: str = ""  # the same in words: "2.0x faster (1,000 → 2,000 files/sec)"


@dataclass
class Verdict:
    bottleneck: str
    alarm: bool
    headline: str
    reason: str
    fix: Fix
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "bottleneck": self.bottleneck,
            "alarm": self.alarm,
            "headline": self.headline,
            "reason": self.reason,
            "solution": self.fix.solution,
            "improvement": self.fix.improvement,
            "factor": self.fix.factor,
            "notes": list(self.notes),
        }


def decide(figures: Figures, m: Model | None) -> Verdict:
    """Names the component that limits throughput, and the fix: the first service that
    refuses the connection or is unreachable when one does or is, else the one the model `m`
    says costs each batch the most."""
    down = [c for c in COMPONENTS if c in figures.refused or c in figures.unreachable]
    if down:
        if down[0] in figures.refused:
            return _refused(figures, down[0])
        return _unreachable(figures, down[0])
    assert m is not None
    b = m.batch_size
    costs = {c: m.cost(c) for c in COMPONENTS}
    comp = max(COMPONENTS, key=lambda c: costs[c])
    slow = slow_components(figures)
    rate = m.rate()
    fix = _fix(figures, m, comp, m.latency_share(comp) >= 0.5)
    spent = m.time_in(comp)
    share = f"{costs[comp]:.0%} of each batch's time"
    if comp == "redis":
        reason = f"each batch of {b} waits {spent:.1f} ms on Redis (round trip {m.redis_rtt:.1f} ms): {share}"
    elif comp == "postgres":
        reason = (
            f"each batch of {b} waits {spent:.1f} ms on PostgreSQL (round trip {m.pg_rtt:.1f} ms, "
            f"{m.pg_load_per * 1000:.1f} µs per row): {share}"
        )
    elif comp == "storage":
        s3 = figures.storage is not None and figures.storage.kind == "s3"
        what = "fetching and hashing the objects" if s3 else "reading and hashing the files"
        reason = f"{what} takes {spent:.1f} ms per batch of {b}: {share}"
    else:
        reason = f"parsing and encoding take {spent:.1f} ms per batch of {b}: {share}"

    alarm = bool(slow[comp])
    others_slow = [c for c in COMPONENTS if c != comp and slow[c]]
    if alarm:
        headline = f"⚠️  {ALARMS[comp]}"
    elif others_slow:
        headline = f"Throughput is limited by {NAMES[comp]}."
    else:
        headline = "✓ No slow service: Redis, the database and storage keep up."
        reason = f"Throughput is limited by {NAMES[comp]}: {reason}"
    notes: list[str] = []
    for other in others_slow:
        found = ", ".join(slow[other])
        if other == "postgres" and not any(f.startswith("round trip") for f in slow[other]):
            notes.append(
                f"PostgreSQL is slow to connect ({found}), but filepipe pools its connections: "
                "that costs nothing per batch."
            )
            continue
        name = NAMES[other][:1].upper() + NAMES[other][1:]
        if costs[other] < 0.01:
            notes.append(f"{name} is slow too ({found}), but at batch {b} the other stages hide it.")
            continue
        note = f"{name} is slow too ({found}): {costs[other]:.0%} of each batch's time"
        hide = m.hiding_batch_size()
        if other in ("redis", "postgres") and m.latency_share(other) >= 0.5 and hide > b:
            note += f"; CONSUMER_BATCH_SIZE={hide} would hide it"
        notes.append(note + ".")
    old = m.old_rate()
    notes.append(
        f"filepipe (batch {b}): {rate:,.0f} files/sec per consumer, "
        f"{rate / old:,.0f}x the old consumer ({old:,.1f} files/sec)."
    )
    return Verdict(comp, alarm, headline, reason, fix, notes)


def _unreachable(figures: Figures, first: str) -> Verdict:
    what = {"redis": "REDIS", "postgres": "THE DATABASE", "storage": "STORAGE"}.get(first, first.upper())
    where = {
        "redis": f"REDIS_URL ({figures.redis.url})",
        "postgres": f"PG_URI ({figures.postgres.uri})",
        "storage": figures.storage.where if figures.storage else "the storage settings",
    }.get(first, first)
    if first == "redis":
        error = figures.redis.error
    elif first == "postgres":
        error = figures.postgres.error
    else:
        error = figures.storage.error if figures.storage else ""
    return Verdict(
        bottleneck=first,
        alarm=True,
        headline=f"✗ {what} IS UNREACHABLE",
        reason=error,
        fix=Fix(
            f"create LOCAL_STORAGE_DIR {figures.settings.local_storage_dir} or point it at the files"
            if first == "storage" and figures.storage is not None and figures.storage.kind == "local"
            else f"check {where}: nothing moves until it answers"
        ),
    )


def _refused(figures: Figures, first: str) -> Verdict:
    if first == "redis":
        what, where, error = "REDIS", f"REDIS_URL ({figures.redis.url})", figures.redis.error
    else:
        what, where, error = "THE DATABASE", f"PG_URI ({figures.postgres.uri})", figures.postgres.error
    return Verdict(
        bottleneck=first,
        alarm=True,
        headline=f"✗ {what} REFUSES THE CONNECTION",
        reason=error,
        fix=Fix(f"fix {where}: waiting will not change the server's answer"),
    )


def _fix(figures: Figures, m: Model, comp: str, latency_bound: bool) -> Fix:
    b = m.batch_size
    rate = m.rate()
    cpus = figures.host.cpus if figures.host else 1

    def faster(solution: str, new_rate: float, *, up_to: bool = False) -> Fix:
        f = new_rate / rate if rate > 0 else 1.0
        text = f"{f:.1f}x faster ({rate:,.0f} → {new_rate:,.0f} files/sec)"
        return Fix(solution, f, "up to " + text if up_to else text)

    if comp in ("redis", "postgres") and latency_bound:
        hide_b = m.hiding_batch_size()
        n = m.hiding_consumers()
        if hide_b > b:
            alt = f", or run {n} consumers at batch {b}" if n > 1 else ""
            pool = m.loaders_to_hide()
            if comp == "postgres" and pool > m.loaders:
                alt = f", or FILEPIPE_POOL_SIZE={pool} ({pool} batches loading at once)"
            return faster(
                f"CONSUMER_BATCH_SIZE={hide_b} (round trips are paid per batch, not per file){alt}",
                m.rate(hide_b),
            )
        if n > 1:
            return faster(f"run {n} consumers (each waits on the network while the others work)", rate * n)
    if comp == "postgres":
        more = m.loaders * 2
        return faster(
            f"PostgreSQL's write speed is the limit: load on more connections at once "
            f"(FILEPIPE_POOL_SIZE={more}, or more consumers) while the database has idle CPU and disk; "
            "beyond that, a bigger database",
            replace(m, loaders=more).rate(),
            up_to=True,
        )
    if comp == "redis":
        return Fix(
            "Redis spends most of each batch per entry: keep entries small (no file contents in the "
            "stream); beyond one Redis node, partition the stream (Redis Cluster)"
        )
    st = figures.storage
    if comp == "storage" and st is not None and st.kind == "s3":
        if st.effective_concurrency < 0.5 * st.threads:
            return Fix(
                f"S3 serves only {st.mb_per_s:.1f} MB/s with {st.effective_concurrency:.1f} of "
                f"{st.threads} requests in flight: the endpoint or the network to it is the limit, "
                "not latency. Run the consumers close to the bucket (same region) or use a faster "
                "endpoint; more concurrency will not help"
            )
        n = max(2, m.hiding_consumers())
        return faster(
            f"S3 GETs wait on the network: run {n} consumers (or raise S3_MAX_CONCURRENCY above "
            f"{st.threads}), and run them in the bucket's region",
            rate * n,
            up_to=True,
        )
    if comp == "storage":
        threads = st.threads if st else 1
        if threads < cpus:
            return faster(
                f"FILEPIPE_HASH_THREADS={cpus} (read and hash on every core)",
                rate * min(cpus / threads, 4.0),
                up_to=True,
            )
        return Fix(
            "run consumers on more hosts, close to the files (or use faster disks): "
            "this host reads and hashes as fast as it can"
        )
    n = max(2, cpus)
    return faster(f"run {n} consumers on this host (one per core), then more hosts", rate * n, up_to=True)
