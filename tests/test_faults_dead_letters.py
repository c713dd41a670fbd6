"""Dead letters exactly once per entry, and entries that vanish while pending.

* The consumer group destroyed and created again (or recreated by hand) redelivers every
  entry: each poison entry still gets one dead letter, not a second.
* An entry deleted from the stream while pending (XDEL, a trim by someone else) comes back
  without its fields: it is gone, acknowledged and counted, never an empty
  `missing_field` dead letter, whichever path meets it (this consumer's own history,
  XAUTOCLAIM, the XCLAIM that keeps dead letters held back by a full Redis).
* The totals (Stats, progress lines, metrics) are what the acknowledgement script did:
  skipped dead letters and acknowledgements are not counted."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import cast

import pytest
from prometheus_client import REGISTRY
from tests.conftest import Env
from tests.support.workload import Workload, seed, start_consumer

from filepipe import stream
from filepipe.constants import dead_letter_ids_key
from filepipe.consumer import Consumer
from filepipe.stream import DeadLetter

SETTINGS = {"batch_size": 100, "claim_idle_ms": 1000, "max_file_bytes": 64 * 1024, "block_ms": 100}


@pytest.fixture
def denv(env: Env) -> Env:
    env.settings = env.settings_with(**SETTINGS)
    return env


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def rows_by_id(env: Env) -> list[bytes]:
    return [r[0].encode() for r in env.sql(f"SELECT stream_id FROM {env.settings.table}")]


def dead_by_source(env: Env) -> dict[bytes, str]:
    dead = env.dead()
    sources = [f[b"source_id"] for _, f in dead]
    assert len(sources) == len(set(sources)), "a dead letter was written twice"
    return {f[b"source_id"]: f[b"reason"].decode() for _, f in dead}


def acked(env: Env) -> int:
    """Entries delivered to the group and acknowledged since."""
    s = env.settings
    group = next(g for g in env.redis.xinfo_groups(s.stream) if g["name"] == s.group.encode())
    return int(group["entries-read"]) - int(group["pending"])


def recreate_group(env: Env) -> None:
    s = env.settings
    env.redis.xgroup_destroy(s.stream, s.group)
    stream.ensure_group(env.redis, s.stream, s.group)


def test_group_destroyed_and_recreated_dead_letters_once(denv: Env) -> None:
    w = seed(denv.redis, denv.settings, denv.storage, 1200, poison_every=2)
    assert len(w.poison) == 600
    # The entries stay in the stream after loading (STREAM_RETENTION=all), to be delivered again.
    first = denv.drain(stream_retention="all")
    assert (first.inserted, first.dead_lettered, first.acked) == (600, 600, 1200)
    rejected = metric("filepipe_rejected_total", reason="bad_uuid")
    # A second life of the group: every entry is delivered again, to a new consumer.
    recreate_group(denv)
    second = denv.drain(consumer_name=f"second-{uuid.uuid4().hex[:6]}", stream_retention="all")
    assert dead_by_source(denv) == w.poison
    assert sorted(rows_by_id(denv)) == sorted(set(w.ids) - set(w.poison))
    assert denv.pending() == 0
    # What the script did, not what was asked of it.
    assert (second.inserted, second.duplicates, second.dead_lettered, second.acked) == (0, 600, 0, 1200)
    assert not second.reasons
    assert metric("filepipe_rejected_total", reason="bad_uuid") == rejected


def test_group_recreated_mid_run_after_a_crash(denv: Env, tmp_path: Path) -> None:
    """A consumer dies with batches committed and not acknowledged, the group is
    recreated by hand, and everything is delivered again."""
    w = seed(denv.redis, denv.settings, denv.storage, 1000, poison_every=5)
    proc = start_consumer(
        denv.settings,
        "dies",
        "--drain",
        log=tmp_path / "dies.log",
        FILEPIPE_CRASH_AT="after_ack:4",
        STREAM_RETENTION="all",
    )
    assert proc.wait(60) == -signal.SIGKILL
    written_before = len(denv.dead())
    assert 0 < written_before < len(w.poison)
    recreate_group(denv)
    stats = denv.drain(consumer_name="after", stream_retention="all")
    assert dead_by_source(denv) == w.poison
    assert sorted(rows_by_id(denv)) == sorted(set(w.ids) - set(w.poison))
    assert denv.pending() == 0
    assert stats.acked == 1000 and stats.dead_lettered == len(w.poison) - written_before


def test_dead_letter_ids_stay_bounded_by_the_stream(denv: Env) -> None:
    """The ids of dead-lettered entries are kept only while their entries are in the
    stream: once the stream is trimmed past them, the next dead letter drops them."""
    s = denv.settings
    w = seed(denv.redis, s, denv.storage, 400, poison_every=4)
    denv.drain(stream_retention="all")  # trimmed by hand below
    marks = dead_letter_ids_key(s.stream)
    assert denv.redis.zcard(marks) == len(w.poison) == 100
    # Trim all but the last 40 entries (10 of them poison), then one more poison entry.
    keep = w.ids[-40:]
    denv.redis.xtrim(s.stream, minid=keep[0], approximate=False)
    late = denv.xadd({"file_id": "not-a-uuid", "filename": "late", "key": "data/0000.txt"})
    denv.drain(stream_retention="all")
    left = {padded(m) for m in cast(list[bytes], denv.redis.zrange(marks, 0, -1))}
    assert left == {i for i in keep if i in w.poison} | {late}
    # An empty stream needs none.
    denv.redis.xtrim(s.stream, maxlen=0, approximate=False)
    denv.xadd({"file_id": "not-a-uuid", "filename": "later", "key": "data/0000.txt"})
    denv.redis.xtrim(s.stream, maxlen=1, approximate=False)
    denv.drain(stream_retention="all")
    assert denv.redis.zcard(marks) == 1


def padded(member: bytes) -> bytes:
    """An entry id from its member in the dead-letter ids (zero-padded)."""
    ms, seq = member.split(b"-")
    return b"%d-%d" % (int(ms), int(seq))


def crashed_with_pending(env: Env, tmp_path: Path, w: Workload) -> tuple[set[bytes], set[bytes]]:
    """Runs a consumer that dies after its third commit: returns the entries it left
    pending and the rows committed."""
    proc = start_consumer(
        env.settings, "c1", "--drain", log=tmp_path / "c1.log", FILEPIPE_CRASH_AT="after_commit:3"
    )
    assert proc.wait(60) == -signal.SIGKILL
    s = env.settings
    pending = {r["message_id"] for r in env.redis.xpending_range(s.stream, s.group, "-", "+", 10_000)}
    rows = set(rows_by_id(env))
    assert pending and rows & pending, "the crash left no committed entry pending"
    return pending, rows


def test_entries_deleted_while_pending_are_gone_not_malformed(denv: Env, tmp_path: Path) -> None:
    """Own history: the restarted consumer reads its pending entries again, and those
    deleted meanwhile come back without fields."""
    w = seed(denv.redis, denv.settings, denv.storage, 2000, poison_every=10)
    pending, rows = crashed_with_pending(denv, tmp_path, w)
    deleted = sorted(pending, key=stream.id_key)[::3]  # committed ones, poison, and the rest
    assert set(deleted) & rows and set(deleted) & set(w.poison) and set(deleted) - rows - set(w.poison)
    assert denv.redis.xdel(denv.settings.stream, *deleted) == len(deleted)
    acked_before = acked(denv)
    before = metric("filepipe_deleted_total")
    stats = Consumer(denv.settings_with(consumer_name="c1"), drain=True, write=None).run()
    assert stats.deleted == len(deleted)
    assert metric("filepipe_deleted_total") - before == len(deleted)
    assert dead_by_source(denv) == {i: r for i, r in w.poison.items() if i not in deleted}
    loaded = (set(w.ids) - set(w.poison) - set(deleted)) | (rows & set(deleted))
    assert sorted(rows_by_id(denv)) == sorted(loaded)
    assert denv.pending() == 0
    assert stats.acked == len(w.ids) - acked_before


def test_entries_deleted_while_a_dead_consumers_are_pending(denv: Env) -> None:
    """XAUTOCLAIM: another consumer's entries, deleted while pending, are reported as
    deleted by the claim and counted."""
    s = denv.settings
    w = seed(denv.redis, s, denv.storage, 600, poison_every=10)
    stream.ensure_group(denv.redis, s.stream, s.group)
    denv.redis.xreadgroup(s.group, "ghost", {s.stream: ">"}, count=300)
    deleted = w.ids[:300:3]
    denv.redis.xdel(s.stream, *deleted)
    time.sleep(1.1)  # idle for longer than CLAIM_IDLE_MS
    stats = denv.drain()
    assert stats.deleted == len(deleted) == 100
    assert dead_by_source(denv) == {i: r for i, r in w.poison.items() if i not in deleted}
    assert sorted(rows_by_id(denv)) == sorted(set(w.ids) - set(w.poison) - set(deleted))
    assert denv.pending() == 0
    assert stats.acked == 600  # the deleted ones are acknowledged by the claim that reports them


def test_an_ack_reports_what_it_did(denv: Env) -> None:
    s = denv.settings
    r = denv.redis
    stream.ensure_group(r, s.stream, s.group)
    ids = [cast(bytes, r.xadd(s.stream, {"n": str(i)})) for i in range(10)]
    r.xreadgroup(s.group, "a", {s.stream: ">"}, count=10)
    r.xack(s.stream, s.group, ids[0])  # handled elsewhere meanwhile
    dead = [DeadLetter(i, {b"n": b"x"}, "bad_uuid", "bad") for i in ids[:3]]
    first = stream.ack(r, s.stream, s.group, ids, dead, dead_stream=s.dead_stream, consumer="a")
    assert first.acked == 9
    assert [d.source_id for d in first.written] == ids[1:3]
    assert [d.source_id for d in first.skipped] == ids[:1] and not first.held
    again = stream.ack(r, s.stream, s.group, ids, dead, dead_stream=s.dead_stream, consumer="a")
    assert again.acked == 0 and not again.written and len(again.skipped) == 3
    assert r.xlen(s.dead_stream) == 2
