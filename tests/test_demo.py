"""`filepipe demo` as a newcomer runs it: the guide's two consumers and filepipe on the
same kind of events, their rates side by side, the status view, and nothing left behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import redis
from tests.support.processes import reap


def test_the_demo_compares_the_guides_consumers_and_cleans_up(
    redis_url: str, pg_uri: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEPIPE_", "STREAM_", "CONSUMER_"))}
    env.update(REDIS_URL=redis_url, PG_URI=pg_uri)
    env.pop("DATABASE_URL", None)
    out = subprocess.run(
        [sys.executable, "-m", "filepipe", "demo", "--files", "6000"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "Traceback" not in out.stdout + out.stderr
    rates = {}
    for label in (
        "the guide's consumer.py (a connection per file)",
        "the guide's consumer_fast.py (a pool, batches of 50)",
        "filepipe consume --drain",
    ):
        row = next(line for line in lines if line.startswith(f"  {label} "))
        files, seconds, rate = re.findall(r"[\d,.]+", row[len(label) + 2 :])[:3]
        rates[label] = float(rate.replace(",", ""))
        # The one rate shown is files over seconds (as rounded on screen: to 0.01 s and to 1 file/s).
        n, t = float(files.replace(",", "")), float(seconds)
        assert n / (t + 0.005) - 1 <= rates[label] <= n / max(t - 0.005, 0.0001) + 1, row
    assert re.search(r"^  filepipe consume --drain +6,000 ", out.stdout, re.M), out.stdout
    assert re.search(r"^  the guide's consumer.py \(a connection per file\) +12 ", out.stdout, re.M)
    assert re.search(r"^  the guide's consumer_fast.py \(a pool, batches of 50\) +600 ", out.stdout, re.M)
    table = next(line for line in lines if line.startswith("✓ 6,000 rows in ")).split()[4].rstrip(";")
    assert table.startswith("filepipe_demo_")
    # The status view of the demo's own stream and table follows.
    status_at = lines.index(next(line for line in lines if line.startswith("$ filepipe status")))
    assert any(line.startswith("STREAM filepipe_demo_") for line in lines[status_at:]), out.stdout
    assert any(line.startswith(f"EVENTS TABLE {table}") for line in lines[status_at:]), out.stdout
    assert "Dashboard: `filepipe dashboard` serves it" in out.stdout and lines[-1] == "✓ Cleaned up"
    # Names are shown as they are, not as Python reprs.
    assert any(line.startswith("    report 0.pdf ") for line in lines), out.stdout
    assert "'report 0.pdf'" not in out.stdout
    # Nothing of the demo is left on the configured servers.
    with psycopg.connect(pg_uri) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE starts_with(tablename, %s)", [table]
        ).fetchone()
    assert left == (0,)
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.keys(f"{table}*") == []
    finally:
        r.close()


def test_on_a_terminal_the_demo_serves_its_dashboard_until_enter(
    redis_url: str, pg_uri: str, tmp_path: Path
) -> None:
    import pty
    import select
    import time
    import urllib.request

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FILEPIPE_", "STREAM_", "CONSUMER_"))}
    env.update(REDIS_URL=redis_url, PG_URI=pg_uri, PYTHONUNBUFFERED="1")
    env.pop("DATABASE_URL", None)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "filepipe", "demo", "--files", "300"],
        cwd=tmp_path,
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 120
        while b"press Enter" not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
        text = seen.decode(errors="replace")
        url = re.search(r"Dashboard: (http://127\.0\.0\.1:\d+/dashboard) \(press Enter", text)
        assert url, text
        with urllib.request.urlopen(url.group(1), timeout=10) as page:
            assert page.status == 200
        api = url.group(1).removesuffix("/dashboard") + "/api/status"
        with urllib.request.urlopen(api, timeout=10) as reply:
            assert f"filepipe_demo_{proc.pid}" in reply.read().decode()  # the demo's own stream
        os.write(leader, b"\n")
        assert proc.wait(timeout=30) == 0, text
        while select.select([leader], [], [], 0.2)[0]:
            try:
                seen += os.read(leader, 65536)
            except OSError:
                break
        assert seen.decode(errors="replace").rstrip().endswith("✓ Cleaned up")
    finally:
        reap(proc)
        os.close(leader)
