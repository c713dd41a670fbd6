"""The report: the figures, the model and the verdict of one run, as the human report
(in the guide's words: "REDIS PERFORMANCE", "DATABASE IS THE BOTTLENECK!") or one JSON
document for machines."""

import json
from dataclasses import asdict, dataclass
from typing import Any

from ..constants import MEMORY_WARN_SHARE
from ..observe.text import plural
from ..redaction import mask_url, printable, scrub
from .figures import KIB, MIB, Figures, PipelineRun, RedisFigures, StorageFigures
from .model import SEED_FAST_BATCH, Model
from .verdict import Verdict, grade_connect, grade_copy, grade_new_connection, grade_round_trip, grade_storage


@dataclass
class Report(Figures):
    """The figures of one run, with what was made of them."""

    model: Model | None = None
    verdict: Verdict | None = None
    pipeline: PipelineRun | None = None

    @property
    def exit_code(self) -> int:
        """0 when every figure was measured; 2 when a server refuses the connection for
        good (the settings must change); 1 when a service is unreachable or a measurement
        (or the end-to-end run) failed."""
        if self.refused:
            return 2
        broken = self.unreachable or self.failed or (self.pipeline is not None and self.pipeline.error)
        return 1 if broken else 0

    def to_json(self) -> dict[str, Any]:
        m, v = self.model, self.verdict
        s = self.settings

        def figures(obj: Any) -> Any:
            if obj is None:
                return None
            d = asdict(obj)
            for name in dir(type(obj)):
                if isinstance(getattr(type(obj), name, None), property):
                    d[name] = getattr(obj, name)
            d.pop("recent_s3_keys", None)
            return d

        model: dict[str, Any] | None = None
        if m is not None:
            model = {
                "batch_size": m.batch_size,
                "file_size": m.file_size,
                "old_consumer_files_per_s": m.old_rate(),
                "fast_consumer_files_per_s": m.fast_rate(),
                "filepipe_files_per_s": m.rate(),
                "read_stage_ms": m.read_stage(m.batch_size),
                "load_stage_ms": m.load_stage(m.batch_size),
                "ack_stage_ms": m.ack_stage(m.batch_size),
                "loaders": m.loaders,
                "hiding_batch_size": m.hiding_batch_size(),
                "hiding_consumers": m.hiding_consumers(),
                "inputs_ms": asdict(m),
            }
        return {
            "bottleneck": v.bottleneck if v else None,
            "alarm": v.alarm if v else None,
            "verdict": v.to_json() if v else None,
            "unreachable": self.unreachable,
            "refused": self.refused,
            "failed": self.failed,
            "settings": {
                "redis_url": mask_url(s.redis_url),
                "pg_uri": mask_url(s.pg_uri),
                "table": s.table,
                "storage_mode": s.storage_mode,
                "batch_size": m.batch_size if m else s.batch_size,
                "hash_threads": s.hash_threads,
            },
            "file_size": self.file_size,
            "file_size_source": self.file_size_source,
            "redis": figures(self.redis),
            "postgres": figures(self.postgres),
            "storage": figures(self.storage),
            "s3": figures(self.s3),
            "consumer": figures(self.host),
            "model": model,
            "pipeline": figures(self.pipeline),
        }


def render_json(report: Report) -> str:
    """The JSON document of `filepipe benchmark --json`."""
    return scrub(json.dumps(report.to_json(), indent=2, default=str))


def _size(n: float) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f} MiB".replace(".0 ", " ")
    if n >= KIB:
        return f"{n / KIB:.1f} KiB".replace(".0 ", " ")
    return f"{n:.0f} B"


def _line(label: str, value: str, mark: str = "") -> str:
    text = f"  {label + ':':<23} {value:<14}"  # a space after the longest labels too
    return (text + "  " + mark).rstrip() if mark else text.rstrip()


def render(report: Report) -> str:
    """The human report, in the guide's words."""
    out: list[str] = []
    s = report.settings
    out.append(f"filepipe benchmark · Redis {mask_url(s.redis_url)} · PostgreSQL {mask_url(s.pg_uri)}")
    out.append("")
    r = report.redis
    out.append("REDIS PERFORMANCE")
    if r.status != "ok":
        out.append(f"  ✗ {r.error}")
    else:
        assert r.ping and r.xadd and r.xreadgroup
        out.append(_line("Connection time", f"{r.connect_ms:.2f} ms"))
        out.append(_line("PING (avg)", f"{r.ping.avg:.2f} ms", grade_round_trip(r.ping.p50)[0]))
        out.append(_line("PING (p50 / p99)", f"{r.ping.p50:.2f} / {r.ping.p99:.2f} ms"))
        out.append(_line("XADD (avg)", f"{r.xadd.avg:.2f} ms"))
        out.append(_line("XREADGROUP (avg)", f"{r.xreadgroup.avg:.2f} ms"))
        out.append(
            _line(
                f"XREADGROUP {r.batch}",
                f"{r.batch_read_ms:.2f} ms",
                f"({r.read_per_entry_ms * 1000:.1f} µs per entry)",
            )
        )
        out.append(_line(f"XACK {r.batch}", f"{r.batch_ack_ms:.2f} ms"))
        out += _render_memory(r, s.stream)
    out.append("")

    pg = report.postgres
    # The guide's title where TimescaleDB is in the database; PostgreSQL's where it is not
    # (or the server did not say).
    out.append("TIMESCALEDB PERFORMANCE" if pg.timescaledb else "POSTGRESQL PERFORMANCE")
    if pg.status == "unreachable" or not pg.server_version:
        out.append(f"  ✗ {pg.error}")
    else:
        ts = (
            f"TimescaleDB {pg.timescaledb}"
            if pg.timescaledb
            else (
                "TimescaleDB available, not installed"
                if pg.timescaledb_available
                else "TimescaleDB not installed"
            )
        )
        out.append(_line("Server", f"PostgreSQL {pg.server_version}, {ts}"))
        if not pg.table_exists:
            out.append(_line(f"Table {pg.table}", "does not exist (run `filepipe init-db`)"))
        out += [
            _line(f"Table {pg.table}" if label == "Kind" else label, value, detail)
            for label, value, detail in pg.timescale_lines
        ]
        out.append(_line("Connection time", f"{pg.connect_ms:.2f} ms", grade_connect(pg.connect_ms)[0]))
        if pg.new_connection:
            out.append(
                _line(
                    "New connection (avg)",
                    f"{pg.new_connection.avg:.2f} ms",
                    grade_new_connection(pg.new_connection.avg)[0],
                )
            )
        if pg.round_trip:
            out.append(
                _line(
                    "Pooled round trip", f"{pg.round_trip.avg:.2f} ms", grade_round_trip(pg.round_trip.p50)[0]
                )
            )
            out.append(
                _line("Round trip (p50 / p99)", f"{pg.round_trip.p50:.2f} / {pg.round_trip.p99:.2f} ms")
            )
        if pg.copy_s > 0:
            out.append(
                _line(
                    "COPY throughput",
                    f"{pg.copy_rows_per_s:,.0f} rows/s",
                    f"{pg.copy_mb_per_s:.1f} MB/s  {grade_copy(pg.copy_rows_per_s)[0]}",
                )
            )
        if pg.load_rows:
            how = " (estimated)" if pg.load_estimated else ""
            out.append(
                _line(
                    f"Batch load ({pg.load_rows})",
                    f"{pg.load_batch_ms:.2f} ms",
                    f"{pg.load_fixed_ms:.2f} ms per batch + {pg.load_per_row_ms * 1000:.1f} µs per row{how}",
                )
            )
        if pg.other_kind and pg.load_batch_ms > 0:
            here = "hypertable" if pg.hypertable else "plain table"
            ratio = pg.other_load_batch_ms / pg.load_batch_ms
            out.append(
                _line(
                    f"Same batch, {pg.other_kind}",
                    f"{pg.other_load_batch_ms:.2f} ms",
                    f"{ratio:.2f}x the {here}'s (scratch tables of both kinds, loaded in turn)",
                )
            )
        if pg.status == "error":
            out.append(f"  ✗ {pg.error}")
        for note in pg.notes:
            out.append(f"  note: {note}")
    out.append("")

    out.append("STORAGE PERFORMANCE")
    out.append(_line("File size", _size(report.file_size), f"({report.file_size_source})"))
    if report.storage is not None:
        _render_storage(out, report.storage)
    if report.settings.storage_mode != "local":
        out.append(_line("Local read+hash", f"not used (STORAGE_MODE={report.settings.storage_mode})"))
    if report.s3 is not None and report.s3 is not report.storage:
        _render_storage(out, report.s3)
    if report.s3 is None:
        out.append(_line("S3", "not configured (skipped)"))
    out.append("")

    if report.host:
        out.append("CONSUMER (this host)")
        out.append(_line("Parse + encode", f"{report.host.parse_encode_us:.2f} µs per event"))
        out.append(_line("CPU cores", str(report.host.cpus)))
        out.append("")

    m = report.model
    if m is not None:
        b = m.batch_size
        out.append(f"ESTIMATED THROUGHPUT ({_size(m.file_size)} files, one consumer)")
        out.append(
            f"  Old consumer (new connection per file):  {m.old_rate():>10,.1f} files/sec"
            f"   ({m.old_consumer_ms():.1f} ms per file)"
        )
        out.append(
            f"  Fast consumer (pooled, batch of {SEED_FAST_BATCH}):      {m.fast_rate():>10,.1f} files/sec"
        )
        out.append(f"  filepipe (batch {b}):{' ' * max(1, 23 - len(str(b)))}{m.rate():>10,.1f} files/sec")
        read, load, ack = m.read_stage(b), m.load_ms(b), m.ack_stage(b)["redis"]
        out.append(f"  Per batch of {b} (three stages overlap; the slowest sets the pace):")
        out.append(
            f"    read stage  {sum(read.values()):9.2f} ms = Redis {read['redis']:.2f} + storage "
            f"{read['storage']:.2f} + consumer {read['consumer']:.2f}"
        )
        per_conn = f" ÷ {m.loaders} connections" if m.loaders > 1 else ""
        out.append(f"    load stage  {load / max(1, m.loaders):9.2f} ms = PostgreSQL {load:.2f}{per_conn}")
        out.append(f"    ack stage   {ack:9.2f} ms = Redis {ack:.2f}")
        hide_b, n = m.hiding_batch_size(), m.hiding_consumers()
        out.append(
            f"  To hide the latency: CONSUMER_BATCH_SIZE ≥ {hide_b}, or {n} consumer"
            f"{'s' if n > 1 else ''} at batch {b}"
        )
        out.append("")

    p = report.pipeline
    if p is not None:
        out.append(f"END-TO-END RUN (--pipeline {p.events})")
        if p.produce_s:
            out.append(_line("Produced", f"{p.events:,} {plural(p.events, 'event')} in {p.produce_s:.2f} s"))
        if p.consume_s:
            out.append(
                _line(
                    "Consumed",
                    f"{p.inserted:,} {plural(p.inserted, 'row')} in {p.consume_s:.2f} s",
                    f"→ {p.files_per_s:,.1f} files/sec, start to finish",
                )
            )
            out.append(
                _line(
                    "Model",
                    f"{p.model_files_per_s:,.1f} files/sec",
                    f"for this run; {p.model_steady_files_per_s:,.1f} once running",
                )
            )
        if p.error:
            out.append(f"  ✗ {p.error}")
        out.append("")

    v = report.verdict
    if v is not None:
        out.append(v.headline)
        if v.reason:
            out.append(f"   {v.reason[:1].upper() + v.reason[1:]}")
        out.append(f"   SOLUTION: {v.fix.solution}")
        if v.fix.improvement:
            out.append(f"   Expected improvement: {v.fix.improvement}")
        for note in v.notes:
            out.append(f"   {note}")
    elif not report.unreachable and not report.refused:
        out.append("✗ Not enough figures for a verdict: see the errors above.")
    return scrub("\n".join(printable(line) for line in out))


def _render_memory(r: RedisFigures, stream_name: str) -> list[str]:
    out = []
    if r.memory_used_bytes is not None:
        if r.memory_max_bytes:
            share = r.memory_used_bytes / r.memory_max_bytes
            mark = "⚠ nearly full" if share >= MEMORY_WARN_SHARE else "✓"
            limit = f"of {_size(r.memory_max_bytes)} maxmemory ({share:.0%}, {r.memory_policy})  {mark}"
        else:
            limit = "(no maxmemory)"
        out.append(_line("Memory", _size(r.memory_used_bytes), limit))
    if r.stream_entries is not None:
        out.append(
            _line(
                f"Stream {stream_name}",
                f"{r.stream_entries:,} entries",
                f"{_size(r.stream_memory_bytes or 0)}; kept: {r.kept}",
            )
        )
    return out


def _render_storage(out: list[str], st: StorageFigures) -> None:
    label = "Local read+hash" if st.kind == "local" else "S3 GET+hash"
    if st.status != "ok":
        out.append(_line(label, "✗ " + st.error))
        return
    mark, _slow = grade_storage(st)
    detail = (
        f"{st.files_per_s:,.0f} files/s, {st.threads} {'threads' if st.kind == 'local' else 'concurrent'}"
    )
    out.append(_line(label, f"{st.mb_per_s:,.1f} MB/s", f"{detail}{', cold' if st.cold else ''}  {mark}"))
    if st.kind == "local" and st.warm_batch_s > 0:
        out.append(_line("Local (cached)", f"{st.warm_mb_per_s:,.1f} MB/s", f"read {st.reads}"))
    if st.one_file:
        label_one = "One file" if st.kind == "local" else "GET latency (p50)"
        out.append(_line(label_one, f"{st.one_file.p50:.2f} ms", f"({st.files} {st.source})"))
