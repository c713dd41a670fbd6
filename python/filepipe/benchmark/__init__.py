"""`filepipe benchmark`: where the time goes, and what to do about it.

The guide's `python benchmark.py` measured Redis and the database and said which one
was the bottleneck. This does the same with more figures (Redis, PostgreSQL, the
storage, this host's CPU), then models what each consumer design would do with
them and names the one component that limits throughput, with a fix.

`--pipeline N` checks the model against a real run through a scratch stream and a
scratch table.

In the order a run goes: `figures` (what is measured), the probes (`redis_probe`,
`postgres_probe`, `storage_probe`, `host_probe`, with `scratch` for what they measure
with), `model`, `verdict` (grades and the `Fix`), `pipeline` (the end-to-end run) and
`report` (the human report and the JSON document). `run` does them all.
"""

import uuid
from collections.abc import Callable

from .. import db
from ..config import Settings
from .figures import COMPONENTS, DEFAULT_FILE_SIZE
from .host_probe import measure_host
from .model import build_model
from .pipeline import run_pipeline
from .postgres_probe import COPY_ROWS, measure_postgres
from .redis_probe import measure_redis
from .report import Report, render, render_json
from .scratch import SCRATCH_DIR_PREFIX, SCRATCH_KEY_PREFIX, SCRATCH_TABLE_PREFIX
from .storage_probe import measure_local, measure_s3
from .verdict import Fix, Verdict, decide

__all__ = [
    "COMPONENTS",
    "COPY_ROWS",
    "SCRATCH_DIR_PREFIX",
    "SCRATCH_KEY_PREFIX",
    "SCRATCH_TABLE_PREFIX",
    "Fix",
    "Report",
    "Verdict",
    "render",
    "render_json",
    "run",
]


def run(
    settings: Settings,
    *,
    samples: int = 20,
    connections: int = 5,
    file_size: int | None = None,
    pipeline: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Measures everything, builds the model and decides the verdict. Raises ConfigError
    when PG_URI cannot be parsed."""
    db.check_conninfo(settings)
    say = progress or (lambda _msg: None)
    tag = uuid.uuid4().hex[:10]
    batch = settings.batch_size
    probe = max(1000, min(batch, 5000))  # rows per timed batch: enough for a per-row slope
    say("Measuring Redis ...")
    r = measure_redis(settings, samples, 1000, tag)
    say("Measuring PostgreSQL ...")
    pg = measure_postgres(settings, samples, connections, probe, tag, want_s3_keys=bool(settings.s3_bucket))
    if file_size is not None:
        size, source = file_size, "--file-size"
    elif pg.recent_file_size:
        size, source = pg.recent_file_size, f"average of the latest events in {settings.table}"
    elif r.recent_file_size:
        size, source = r.recent_file_size, f"declared sizes of the latest entries of {settings.stream}"
    else:
        size, source = DEFAULT_FILE_SIZE, "default: no events yet"
    size = max(1, min(size, settings.max_file_bytes))
    say("Measuring storage ...")
    local = measure_local(settings, size, tag) if settings.storage_mode == "local" else None
    s3 = measure_s3(settings, size, tag, pg.recent_s3_keys) if settings.s3_bucket else None
    host = measure_host(settings)
    report = Report(
        settings=settings,
        redis=r,
        postgres=pg,
        storage=local if local is not None else s3,
        s3=s3,
        host=host,
        file_size=size,
        file_size_source=source,
        tag=tag,
    )
    st = report.storage
    if r.status == "ok" and pg.status == "ok" and st is not None and st.status == "ok":
        report.model = build_model(batch, size, r, pg, st, host, loaders=settings.pool_size)
    if report.model is not None or report.unreachable or report.refused:
        report.verdict = decide(report, report.model)
    if pipeline > 0 and not report.unreachable and not report.refused:
        say(f"Running {pipeline} events end to end ...")
        report.pipeline = run_pipeline(
            settings, pipeline, size, tag, report.model, hypertable=pg.hypertable, progress=progress
        )
    return report
