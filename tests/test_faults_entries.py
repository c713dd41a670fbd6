"""Hostile entries: one with a huge number of fields, one with huge values. Each hurts
only itself: it is dead-lettered by the per-entry caps, the rest of its batch loads, and
the consumer stays alive (its heartbeat never stalls) while it parses."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path

import redis
from tests.conftest import Env
from tests.support.processes import reap
from tests.support.workload import start_consumer, wait_for, wait_ready

from filepipe.constants import HEARTBEAT_TTL_S, heartbeat_key


def good_fields() -> dict[str, str]:
    return {"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt"}


def add_wide(r: redis.Redis, stream: str, fields: int) -> bytes:
    """An entry with `fields` fields: the contract's three and the rest attributes."""
    flat: list[bytes | str] = [x for kv in good_fields().items() for x in kv]
    for i in range(fields - 3):
        flat += [b"attr_%d" % i, b"v%d" % i]
    return r.execute_command("XADD", stream, "*", *flat)  # type: ignore[no-any-return]


class HeartbeatWatch:
    """Samples a consumer's heartbeat from another process's point of view: the longest
    time its `updated` stamp went without moving."""

    def __init__(self, r: redis.Redis, key: str) -> None:
        self.r, self.key = r, key
        self.longest = 0.0
        self.missing = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last_change, last_value = time.monotonic(), None
        while not self._stop.is_set():
            raw = self.r.get(self.key)
            now = time.monotonic()
            if raw is None:
                self.missing += 1
            else:
                updated = json.loads(raw)["updated"]
                if updated != last_value:
                    last_change, last_value = now, updated
            self.longest = max(self.longest, now - last_change)
            self._stop.wait(0.05)

    def __enter__(self) -> HeartbeatWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_entries_over_the_caps_are_dead_lettered_and_the_rest_loads(env: Env) -> None:
    env.write_file("a.txt", b"hello")
    good = [env.xadd(good_fields()) for _ in range(3)]
    wide = add_wide(env.redis, env.settings.stream, 200_000)
    big = env.xadd({**good_fields(), "note": "x" * (2 * 1024 * 1024)})
    good.append(env.xadd(good_fields()))
    stats = env.drain()
    assert stats.inserted == 4 and stats.dead_lettered == 2 and env.pending() == 0
    assert env.rows() == 4
    dead = {f[b"source_id"]: f for _, f in env.dead()}
    assert dead[wide][b"reason"] == b"too_many_fields"
    assert dead[wide][b"error"].decode() == (
        f"entry {wide.decode()}: has 200000 fields, more than FILEPIPE_MAX_ENTRY_FIELDS=1000"
    )
    assert dead[big][b"reason"] == b"entry_too_large"
    assert dead[big][b"error"].decode().startswith(f"entry {big.decode()}: is 2097")
    assert dead[big][b"error"].decode().endswith("more than FILEPIPE_MAX_ENTRY_BYTES=1048576")
    # Their dead letters are bounded excerpts, marked as such.
    assert int(dead[wide][b"original_fields"]) == 1000 and len(dead[wide]) == 1000 + 7
    assert json.loads(dead[wide][b"truncated"])["fields"] == 200_000
    assert dead[big][b"note"].endswith(b"(cut: 2097152 bytes)") and len(dead[big][b"note"]) < 1100
    assert json.loads(dead[big][b"truncated"])["cut"] == [["note", 2 * 1024 * 1024]]
    assert sum(len(k) + len(v) for k, v in dead[big].items()) < 4096


def test_a_consumer_parsing_a_wide_entry_keeps_its_heartbeat(env: Env, tmp_path: Path) -> None:
    """With the field cap raised above it, a 200,000-field entry is parsed and loaded; the
    parse runs without the GIL, so the reader keeps publishing the heartbeat meanwhile
    (before, it held the GIL for about half a minute: every thread, heartbeat included,
    stopped)."""
    env.write_file("a.txt", b"hello")
    name = f"wide-{uuid.uuid4().hex[:6]}"
    proc = start_consumer(
        env.settings,
        name,
        log=tmp_path / "consumer.log",
        FILEPIPE_MAX_ENTRY_FIELDS="300000",
        FILEPIPE_MAX_ENTRY_BYTES=str(64 << 20),
    )
    try:
        wait_ready(env.redis, env.settings, name, proc)
        with HeartbeatWatch(env.redis, heartbeat_key(env.settings.stream, name)) as watch:
            time.sleep(2.5)  # a heartbeat or two before the entry arrives
            add_wide(env.redis, env.settings.stream, 200_000)
            env.xadd(good_fields())
            wait_for(lambda: env.rows() == 2, timeout=120, what="both rows")
            time.sleep(2.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "consumer.log").read_text()
    finally:
        reap(proc)
    assert watch.missing == 0
    # Refreshed every 2 s: a third of its TTL is a stall, whatever the machine's load.
    assert watch.longest < HEARTBEAT_TTL_S / 3, f"the heartbeat stood still for {watch.longest:.1f} s"
    ((attributes,),) = env.sql(f"SELECT count(*) FROM {env.settings.table}, jsonb_object_keys(attributes)")
    assert attributes == 200_000 - 3
