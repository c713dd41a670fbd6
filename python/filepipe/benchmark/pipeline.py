"""`filepipe benchmark --pipeline N`: the model checked against a real run, N synthetic
events through a scratch stream into a scratch table by a real consumer in drain mode."""

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import redis

from .. import db, stream
from ..config import Settings
from ..constants import dead_letter_ids_key, heartbeat_key, trim_keys
from ..errors import FilepipeError
from ..observe.text import plural
from ..partitions import partitions
from ..redaction import error_line, mask_url
from .figures import MIB, PipelineRun
from .model import Model
from .scratch import (
    SCRATCH_DIR_PREFIX,
    SCRATCH_KEY_PREFIX,
    delete_objects,
    drop_table,
    scratch_table,
    write_files,
)


def run_pipeline(
    settings: Settings,
    events: int,
    file_size: int,
    tag: str,
    model: Model | None,
    *,
    hypertable: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PipelineRun:
    """Produces `events` synthetic events into a scratch stream and consumes them into a
    scratch table with a real consumer in drain mode; everything is removed afterwards,
    on an interrupt (KeyboardInterrupt) too, which `progress` hears of first."""
    from ..consumer import Consumer
    from ..producer import Producer, event_for
    from ..storage import open_storage

    result = PipelineRun(events=events)
    if model is not None:
        result.model_files_per_s = events / model.run_seconds(events)
        result.model_steady_files_per_s = model.rate(min(model.batch_size, events))
    scratch = replace(
        settings,
        stream=f"{SCRATCH_KEY_PREFIX}{tag}:pipeline",
        dead_letter_stream="",
        table=scratch_table(settings, tag + "_pipeline"),
        consumer_name=f"benchmark-{tag}",
        block_ms=0,
    )
    distinct = min(events, max(500, (512 * MIB) // max(file_size, 1)))
    folder = f"{SCRATCH_DIR_PREFIX}{tag}-pipeline"
    mode = settings.storage_mode
    local_dir = Path(settings.local_storage_dir) / folder
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / folder
    storage: Any = None
    written: list[str] = []
    r = stream.connect(scratch)
    try:
        db.init_db(scratch, plain=not hypertable)  # the events table's kind
        storage = open_storage(scratch, mode)
        if mode == "local":
            write_files(local_dir, distinct, file_size, evict=True)
            keys = [f"{folder}/{i}.bin" for i in range(distinct)]
        else:
            write_files(workdir, distinct, file_size, evict=False)
            keys = []
            for i in range(distinct):
                storage.put_file(workdir / f"{i}.bin", f"{folder}/{i}.bin")
                written.append(f"{folder}/{i}.bin")
                keys.append(f"{folder}/{i}.bin")
        producer = Producer(scratch, storage=storage, r=r)
        t0 = time.perf_counter()
        for i in range(events):
            now = datetime.now(timezone.utc)
            producer.enqueue(
                event_for(
                    str(uuid.uuid4()), f"benchmark file {i}.bin", keys[i % distinct], file_size, mode, now
                )
            )
        producer.flush()
        result.produce_s = time.perf_counter() - t0
        consumer = Consumer(scratch, drain=True, write=None)
        t0 = time.perf_counter()
        stats = consumer.run()
        result.consume_s = time.perf_counter() - t0
        result.inserted, result.dead_lettered = stats.inserted, stats.dead_lettered
        if stats.dead_lettered:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.reasons.items()))
            n = stats.dead_lettered
            result.error = f"{n} {plural(n, 'event was', 'events were')} dead-lettered ({reasons})"
    except KeyboardInterrupt:
        if progress is not None:  # removing many files takes a while: say what is going on
            progress(
                f"Interrupted: removing stream {scratch.stream}, table {scratch.table} and files {folder} ..."
            )
        raise
    except (redis.ConnectionError, redis.TimeoutError) as e:
        result.error = f"cannot reach Redis at {mask_url(settings.redis_url)}: {error_line(e)}"
    except (FilepipeError, psycopg.Error, redis.RedisError, OSError) as e:
        result.error = error_line(e)
    finally:
        with contextlib.suppress(redis.RedisError):
            for part in partitions(scratch):  # one key at a time: they may live on different cluster nodes
                keys = [
                    part.stream,
                    part.dead_stream,
                    dead_letter_ids_key(part.stream),
                    heartbeat_key(part.stream, scratch.consumer_name),
                ]
                for key in keys + trim_keys(part.stream):
                    r.delete(key)
        r.close()
        drop_table(scratch)
        shutil.rmtree(local_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        if storage is not None:
            delete_objects(storage, written)
            storage.close()
    return result
