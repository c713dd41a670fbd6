"""Dead letters: every one the consumer writes can be replayed into exactly the entry it
came from, byte for byte; one that cannot (no fields left, fields dropped) is named and
left in place without stopping the others; what `dlq list` and the consumer's log show of
an entry is escaped."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import Env
from tests.support.workload import consumer_env, start_consumer

from filepipe import dlq, stream
from filepipe.embedded import RedisServer
from filepipe.stream import DeadLetter

RAW_RANGE = "return redis.call('XRANGE', KEYS[1], '-', '+')"

# Names the consumer adds, or used to, or that look like its escapes.
TRICKY_NAMES = [
    b"error",
    b"reason",
    b"consumer",
    b"deliveries",
    b"source_id",
    b"orig_error",
    b"orig_reason",
    b"orig_orig_x",
    b"orig_",
    b"original_fields",
    b"fields_dropped",
    b"truncated",
    b"",
    b"\x1b[2J",
    b"\x00",
    b"\xff\xfe",
]
NAMES = st.one_of(st.sampled_from(TRICKY_NAMES), st.binary(max_size=24))
VALUES = st.one_of(
    st.sampled_from([b"", b"0", b"1", b"2", b"3", b"\x00", b"orig_error"]), st.binary(max_size=80)
)


def raw_entries(r: redis.Redis, key: str) -> list[tuple[bytes, list[bytes]]]:
    """The stream's entries as the server sends them: every field, in order."""
    return [(entry_id, list(flat)) for entry_id, flat in cast("list[Any]", r.eval(RAW_RANGE, 1, key))]


def write_dead_letter(
    r: redis.Redis, env: Env, fields: dict[bytes, bytes], reason: str = "bad_uuid"
) -> bytes:
    """One entry, read and dead-lettered as the consumer does: delivered by XREADGROUP,
    its fields taken from the reply, written and acknowledged by `stream.ack`. With no
    fields: an entry deleted while it was pending, whose redelivery has none."""
    s = env.settings
    entry_id = cast(
        bytes,
        r.execute_command("XADD", s.stream, "*", *[x for kv in fields.items() for x in kv])
        if fields
        else r.xadd(s.stream, {"placeholder": "x"}),
    )
    ((read_id, read_fields),) = stream.read_new(r, s.stream, s.group, "prop", 10, 0)
    assert read_id == entry_id
    if not fields:
        r.xdel(s.stream, entry_id)
        ((read_id, read_fields),) = stream.read_own_pending(r, s.stream, s.group, "prop", 10)
        assert read_fields is None
    dead = DeadLetter(
        entry_id, stream.fields_dict(read_fields), reason, f"entry {entry_id.decode()}: refused"
    )
    assert (
        stream.ack(r, s.stream, s.group, [entry_id], [dead], dead_stream=s.dead_stream, consumer="prop").acked
        == 1
    )
    return entry_id


def dlq_command(env: Env, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "filepipe", "dlq", *args],
        capture_output=True,
        text=True,
        env=consumer_env(env.settings),
        cwd=cwd,
        timeout=60,
        check=False,
    )


@pytest.fixture
def r(env: Env) -> Any:
    client = stream.connect(env.settings, socket_timeout=10)
    stream.ensure_group(client, env.settings.stream, env.settings.group)
    yield client
    client.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(NAMES, VALUES, max_size=12))
def test_replay_recreates_every_entry_byte_for_byte(env: Env, r: Any, fields: dict[bytes, bytes]) -> None:
    s = env.settings
    r.delete(s.stream, s.dead_stream)
    stream.ensure_group(r, s.stream, s.group)
    write_dead_letter(r, env, fields)
    assert r.xlen(s.dead_stream) == 1
    (letter,) = dlq.scan(r, s.dead_stream)
    assert letter.reason == "bad_uuid" and letter.fields[b"consumer"] == b"prop"  # read by name
    result = dlq.replay(r, s, dlq.scan(r, s.dead_stream))
    if not fields:
        assert result.count == 0 and [why for _, why in result.refused] == [
            "no fields to replay: the entry was deleted from the stream before it was read"
        ]
        assert r.xlen(s.dead_stream) == 1 and r.xlen(s.stream) == 0
        return
    assert result.count == 1 and result.refused == []
    (original_id, original), (replayed_id, replayed) = raw_entries(r, s.stream)
    assert replayed == original == [x for kv in fields.items() for x in kv]
    assert replayed_id != original_id and r.xlen(s.dead_stream) == 0


def test_an_unreplayable_dead_letter_does_not_stop_the_others(env: Env, r: Any, tmp_path: Path) -> None:
    """Through the command: one deleted entry's dead letter, the excerpt of a very wide
    entry, one from a consumer before this format, and one of those that could not keep
    every field, among good ones."""
    s = env.settings
    good = [{b"file_id": f"g{i}".encode(), b"error": b"the user's own", b"orig_x": b"1"} for i in range(4)]
    write_dead_letter(r, env, good[0])
    deleted = write_dead_letter(r, env, {})
    write_dead_letter(r, env, good[1])
    wide = write_dead_letter(r, env, {f"f{i}".encode(): b"v" for i in range(4000)})
    # A dead letter as consumers before `original_fields` wrote it: the entry's own
    # `reason` renamed to `orig_reason`, its `orig_x` as it was.
    old = r.xadd(
        s.dead_stream,
        {
            b"file_id": b"old",
            b"orig_reason": b"mine",
            b"orig_x": b"kept",
            b"error": b"e",
            b"reason": b"bad_uuid",
            b"consumer": b"c0",
            b"deliveries": b"1",
            b"source_id": b"1-1",
        },
    )
    # An older consumer's dead letter of an entry too wide for Lua's unpack(): its last
    # field said how many of the entry's fields it left out.
    r.xadd(
        s.dead_stream,
        {
            b"f0": b"v",
            b"error": b"e",
            b"reason": b"missing_field",
            b"consumer": b"c0",
            b"deliveries": b"1",
            b"source_id": b"1-2",
            b"fields_dropped": b"2007",
        },
    )
    write_dead_letter(r, env, good[2])
    r.delete(s.stream)
    result = dlq_command(env, tmp_path, "replay")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"✓ Replayed 4 dead letters onto {s.stream}" in result.stdout
    assert "✗ Left 3 dead letters that cannot be replayed:" in result.stderr
    assert f"(source {deleted.decode()}): no fields to replay: the entry was deleted" in result.stderr
    assert (
        f"(source {wide.decode()}): incomplete: it holds an excerpt of the entry "
        "(kept 1,000 of its 4,000 fields (22,890 bytes))" in result.stderr
    )
    assert "(source 1-2): incomplete: 2007 of the entry's fields were left out of it (fields_dropped)" in (
        result.stderr
    )
    replayed = [flat for _, flat in raw_entries(r, s.stream)]
    assert replayed == [
        [x for kv in good[0].items() for x in kv],
        [x for kv in good[1].items() for x in kv],
        [b"file_id", b"old", b"reason", b"mine", b"orig_x", b"kept"],
        [x for kv in good[2].items() for x in kv],
    ]
    left = [d.fields[b"source_id"] for d in dlq.scan(r, s.dead_stream)]
    assert left == [deleted, wide, b"1-2"] and old not in [d.id for d in dlq.scan(r, s.dead_stream)]


@pytest.mark.parametrize(
    ("width", "reason"), [(3_000, "missing"), (20_000, "missing"), (20_000, "max_deliveries")]
)
def test_an_entry_the_raised_caps_admit_is_dead_lettered_whole_and_replayed(
    env: Env, tmp_path: Path, width: int, reason: str
) -> None:
    """With FILEPIPE_MAX_ENTRY_FIELDS / FILEPIPE_MAX_ENTRY_BYTES raised, an entry over the
    default caps (3,000 fields and 2.4 MiB; 20,000 fields, past what one Lua call takes) is
    admitted, names a file that is not there (or was delivered too often), and is
    dead-lettered whole: acknowledged, then replayed byte for byte."""
    s = env.settings
    flat = [b"file_id", str(uuid.uuid4()).encode(), b"filename", b"gone.txt", b"key", b"gone.txt"]
    for i in range(width - 3):
        flat += [b"attr_%d" % i, b"%d:" % i + b"x" * (2_400_000 // width)]
    env.redis.execute_command("XADD", s.stream, "*", *flat)
    caps: dict[str, Any] = {"max_entry_fields": 50_000, "max_entry_bytes": 8 << 20}
    if reason == "max_deliveries":
        # Delivered to a consumer that went away, claimed by the drain: its second delivery.
        stream.ensure_group(env.redis, s.stream, s.group)
        env.redis.xreadgroup(s.group, "gone", {s.stream: ">"})
        caps |= {"max_deliveries": 1, "claim_idle_ms": 1}
    stats = env.drain(**caps)
    assert stats.dead_lettered == 1 and env.pending() == 0
    ((_, letter),) = raw_entries(env.redis, s.dead_stream)
    added = dict(zip(letter[2 * width + 2 :: 2], letter[2 * width + 3 :: 2], strict=True))
    assert letter[2 * width : 2 * width + 2] == [b"original_fields", str(width).encode()]
    assert (
        added[b"reason"] == reason.encode() and b"truncated" not in added and b"fields_dropped" not in added
    )
    env.redis.delete(s.stream)
    result = dlq_command(env, tmp_path, "replay")
    assert result.returncode == 0, result.stderr
    ((_, replayed),) = raw_entries(env.redis, s.stream)
    assert replayed == flat and env.redis.xlen(s.dead_stream) == 0


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_dead_letter_too_wide_for_the_script_waits_while_redis_refuses_writes(env: Env, fault: str) -> None:
    """Written in a transaction of its own, a 10,000-field dead letter is held back by a
    full Redis (its entry stays pending, the other entries are acknowledged) and raises on
    a replica, as the script does; once Redis takes writes, it is written once, whole."""
    from tests.test_faults_redis import FAULTS

    start, end, _ = FAULTS[fault]
    s = env.settings
    wide = {b"file_id": b"w", **{b"f%d" % i: b"v" for i in range(9_999)}}
    with RedisServer(extra_args=["--maxmemory-policy", "noeviction"]) as server:
        r = redis.Redis.from_url(server.url)
        try:
            stream.ensure_group(r, s.stream, s.group)
            wide_id = r.execute_command("XADD", s.stream, "*", *[x for kv in wide.items() for x in kv])
            other = r.xadd(s.stream, {"file_id": "o"})
            stream.read_new(r, s.stream, s.group, "c", 10, 0)
            letter = DeadLetter(wide_id, wide, "missing", "gone")

            def ack() -> stream.AckResult:
                return stream.ack(
                    r,
                    s.stream,
                    s.group,
                    [wide_id, other],
                    [letter],
                    dead_stream=s.dead_stream,
                    consumer="c",
                    max_fields=20_000,
                    max_bytes=1 << 20,
                )

            start(r)
            if fault == "full":
                held = ack()
                assert held.held == [letter] and held.acked == 1 and held.refusal.startswith("OOM ")
            else:
                with pytest.raises(redis.exceptions.ReadOnlyError):
                    ack()
            assert r.xlen(s.dead_stream) == 0 and r.xpending(s.stream, s.group)["pending"] == (
                1 if fault == "full" else 2
            )
            end(r)
            done = ack()
            assert done.written == [letter] and done.acked == (1 if fault == "full" else 2)
            assert ack().acked == 0 and r.xlen(s.dead_stream) == 1
            ((_, flat),) = raw_entries(r, s.dead_stream)
            assert flat[: 2 * len(wide)] == [x for kv in wide.items() for x in kv]
        finally:
            r.close()


def test_dlq_list_and_the_log_escape_what_an_entry_holds(env: Env, tmp_path: Path) -> None:
    """A field name holding terminal escapes (set the title, clear the screen) reaches the
    dead letter's error and the consumer's log; neither the terminal nor the log gets it raw."""
    s = env.settings
    evil = "\x1b]0;owned\x07\x1b[2Jevil"
    env.write_file("a.txt", b"a")
    env.xadd({"file_id": str(uuid.uuid4()), "filename": "a", "key": "a.txt", evil: "nul\x00"})
    # A trigger that quotes the file name in its error: the consumer logs the server's reason.
    env.sql(f"""CREATE FUNCTION {s.table}_refuse() RETURNS trigger AS $$
        BEGIN IF NEW.filename LIKE 'refuse%' THEN
            RAISE check_violation USING MESSAGE = 'will not take ' || NEW.filename;
        END IF;
        RETURN NEW; END $$ LANGUAGE plpgsql""")
    try:
        env.sql(
            f"CREATE TRIGGER refuse BEFORE INSERT ON {s.table} FOR EACH ROW "
            f"EXECUTE FUNCTION {s.table}_refuse()"
        )
        env.xadd({"file_id": str(uuid.uuid4()), "filename": f"refuse {evil}", "key": "a.txt"})
        env.xadd({"file_id": str(uuid.uuid4()), "filename": "fine", "key": "a.txt"})
        log = tmp_path / "consumer.log"
        assert start_consumer(s, "escapes", "--drain", log=log).wait(60) == 0
    finally:
        env.sql(f"DROP FUNCTION {s.table}_refuse() CASCADE")
    assert env.rows() == 1
    assert sorted(f[b"reason"] for _, f in env.dead()) == [b"db_rejected", b"nul_byte"]
    logged = log.read_text()
    assert "will not take refuse \\x1b]0;owned\\x07\\x1b[2Jevil" in logged
    listed = dlq_command(env, tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    assert "field '\\x1b]0;owned\\x07\\x1b[2Jevil' contains a NUL byte" in listed.stdout
    for text in (logged, listed.stdout, listed.stderr):
        assert "\x1b" not in text and "\x07" not in text
