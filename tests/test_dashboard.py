"""The dashboard as its users see it: a real Chromium on a real HTTP server, real
Redis and PostgreSQL, a real consumer. Screenshots go to `artifacts/`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import httpx
import hypothesis
import pytest
import redis
import uvicorn
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from playwright.sync_api import Browser, Page, sync_playwright
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route
from tests.conftest import Env, both_tables
from tests.support.workload import consumer_env, wait_for

from filepipe.config import Settings
from filepipe.constants import heartbeat_key, partition_stream
from filepipe.consumer import Consumer
from filepipe.dashboard.app import create_app
from filepipe.dashboard.monitor import Monitor
from filepipe.dashboard.upload import STAGING_DIR, clean_filename
from filepipe.db import init_db
from filepipe.embedded import PostgresServer, RedisServer, free_port
from filepipe.partitions import partitions, stream_for

CHROMIUM = os.environ.get("FILEPIPE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TOKEN = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


# -- serving ------------------------------------------------------------------------


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Runs `app` on uvicorn in a thread on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the server stopped before it started"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@contextlib.contextmanager
def running_consumer(settings: Settings) -> Iterator[Consumer]:
    """A consumer running (not draining) in a thread, as `filepipe consume` would."""
    consumer = Consumer(settings, write=None)
    thread = threading.Thread(target=consumer.run, name="test-consumer", daemon=True)
    thread.start()
    try:
        yield consumer
    finally:
        consumer.stop()
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture
def web(env: Env) -> Iterator[str]:
    app = create_app(env.settings, allow_upload=True, max_upload_bytes=256 * 1024, interval=0.25)
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def watch_console(page: Page) -> list[str]:
    """Collects console errors and uncaught exceptions (a CSP violation is one)."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


def figure(page: Page, element_id: str) -> str:
    return str(page.get_attribute(f"#{element_id}", "data-value") or "")


def upload_token(client: httpx.Client) -> str:
    page = client.get("/upload")
    assert page.status_code == 200
    found = TOKEN.search(page.text)
    assert found, "no token in the form"
    return found.group(1)


def staged_files(env: Env) -> list[Path]:
    staging = env.storage / STAGING_DIR
    return list(staging.iterdir()) if staging.exists() else []


# -- the user's path: upload in the browser, watch the dashboard count them ------------


def test_upload_in_browser_then_dashboard_counts_them_live(
    env: Env, web: str, browser: Browser, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    names = ["report 1.pdf", 'über "quoted" name.txt', "photo_2.jpg"]
    bodies = [
        b"%PDF-1.7\n" + os.urandom(3000),
        "grüße\n".encode() * 50,
        b"\xff\xd8\xff\xe0" + os.urandom(5000),
    ]
    picks = []
    for name, body in zip(names, bodies, strict=True):
        p = tmp_path / "pick" / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(body)
        picks.append(p)

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = watch_console(page)
    page.goto(f"{web}/upload")
    page.set_input_files("#files", [str(p) for p in picks])
    assert page.locator("#chosen li").count() == 3
    page.click("#submit")
    page.wait_for_selector("#result")
    assert page.inner_text("#result-count") == "3"
    assert env.redis.xlen(env.settings.stream) == 3
    page.screenshot(path=str(ARTIFACTS / "upload-desktop.png"), full_page=True)

    # The dashboard, open before any consumer runs: nothing processed, 3 waiting.
    page.goto(f"{web}/dashboard")
    page.evaluate("window.__notReloaded = true")
    page.wait_for_function("() => document.getElementById('live').dataset.state === 'live'")
    page.wait_for_function("() => document.getElementById('lag').dataset.value === '3'")
    assert figure(page, "rows") == "0"

    with running_consumer(env.settings) as consumer:
        page.wait_for_function("() => document.getElementById('rows').dataset.value === '3'", timeout=20_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#consumers tbody tr')]"
            ".some(r => r.innerText.includes('live'))",
            timeout=20_000,
        )
        page.wait_for_function("() => document.querySelectorAll('#chart svg path.line').length === 1")
        assert page.evaluate("window.__notReloaded") is True  # updated in place
        assert figure(page, "lag") == "0" and figure(page, "pending") == "0"
        consumers = page.inner_text("#consumers")
        assert consumer.name in consumers
        latest = page.inner_text("#latest")
        for name in names:
            assert name in latest
        page.screenshot(path=str(ARTIFACTS / "dashboard-desktop.png"), full_page=True)

        phone = browser.new_context(
            viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
        )
        mobile = phone.new_page()
        mobile_problems = watch_console(mobile)
        mobile.goto(f"{web}/dashboard")
        mobile.wait_for_function("() => document.getElementById('rows').dataset.value === '3'")
        mobile.wait_for_function("() => document.querySelectorAll('#latest tbody tr').length === 3")
        # Readable on a phone: nothing wider than the screen but the scrollable tables.
        assert mobile.evaluate("document.documentElement.scrollWidth") <= 390
        mobile.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
        mobile.goto(f"{web}/upload")
        assert mobile.evaluate("document.documentElement.scrollWidth") <= 390
        mobile.screenshot(path=str(ARTIFACTS / "upload-phone.png"), full_page=True)
        phone.close()
    context.close()
    assert problems == [] and mobile_problems == []

    # Stored and recorded exactly as `filepipe produce` + `consume` do.
    rows = env.sql(f"SELECT filename, size_bytes, checksum_sha256, storage_key FROM {env.settings.table}")
    by_name = {r[0]: r for r in rows}
    assert sorted(by_name) == sorted(names)
    for name, body in zip(names, bodies, strict=True):
        _, size, checksum, key = by_name[name]
        assert size == len(body) and checksum == hashlib.sha256(body).hexdigest()
        assert (env.storage / key).read_bytes() == body
        assert re.fullmatch(r"\d{4}/\d{2}/\d{2}/[0-9a-f-]{36}/[A-Za-z0-9._-]+", key)
    assert staged_files(env) == []


def test_a_cross_site_page_cannot_upload(env: Env, web: str, browser: Browser) -> None:
    """A page on another origin posts a form to /upload in the same browser, after the
    user has opened the upload page (so the browser holds the cookie)."""
    evil_html = f"""<!doctype html><form id=f method=post action="{web}/upload" enctype="multipart/form-data">
      <input type=hidden name=csrf_token value="{"0" * 64}"><input type=file name=files id=files></form>"""
    evil = Starlette(routes=[Route("/", lambda request: HTMLResponse(evil_html))])
    with serve(evil) as evil_url:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{web}/upload")  # the user's own session
        cookies = context.cookies()
        assert [c["name"] for c in cookies] == ["filepipe_csrf"]
        page.goto(evil_url.replace("127.0.0.1", "localhost"))
        page.set_input_files(
            "#files", files=[{"name": "x.txt", "mimeType": "text/plain", "buffer": b"pwned"}]
        )
        with page.expect_navigation():
            page.evaluate("document.getElementById('f').submit()")
        assert "security token" in page.content() or "Cross-site" in page.content()
        assert context.cookies() == cookies  # the refusal does not void the user's session
        context.close()
    assert env.redis.xlen(env.settings.stream) == 0
    assert staged_files(env) == []


# -- cross-site request protection, over plain HTTP --------------------------------------


def multipart(token: str | None, files: list[tuple[str, bytes]]) -> dict[str, Any]:
    data = {"csrf_token": token} if token is not None else {}
    return {
        "data": data,
        "files": [("files", (name, body, "application/octet-stream")) for name, body in files],
    }


def test_upload_needs_the_token_of_its_own_cookie_and_same_origin(env: Env, web: str) -> None:
    with httpx.Client(base_url=web) as client:
        token = upload_token(client)
        cookie = client.cookies.get("filepipe_csrf")
        assert cookie and token
        with httpx.Client(base_url=web) as fresh:
            set_cookie = fresh.get("/upload").headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "path=/" in set_cookie

        refused = [
            client.post("/upload", **multipart(None, [("a.txt", b"a")])),  # no token
            client.post("/upload", **multipart("f" * 64, [("a.txt", b"a")])),  # wrong token
            client.post(
                "/upload", **multipart(token, [("a.txt", b"a")]), headers={"origin": "http://evil.example"}
            ),
            client.post("/upload", **multipart(token, [("a.txt", b"a")]), headers={"origin": "null"}),
            client.post(
                "/upload", **multipart(token, [("a.txt", b"a")]), headers={"sec-fetch-site": "cross-site"}
            ),
            client.post(
                "/upload",
                **multipart(token, [("a.txt", b"a")]),
                headers={"referer": "http://evil.example/page"},
            ),
        ]
        assert [r.status_code for r in refused] == [403] * len(refused)
        # The token belongs to one browser's cookie: another cookie makes it worthless.
        with httpx.Client(base_url=web) as other:
            upload_token(other)
            assert other.post("/upload", **multipart(token, [("a.txt", b"a")])).status_code == 403
        assert env.redis.xlen(env.settings.stream) == 0

        ok = client.post("/upload", **multipart(token, [("a.txt", b"hello")]), headers={"origin": web})
        assert ok.status_code == 303 and ok.headers["location"] == "/upload?enqueued=1&bytes=5"
        # A script may send the token as a header instead; JSON in, JSON out.
        js = client.post(
            "/upload",
            files=[("files", ("b.txt", b"hi"))],
            headers={"x-csrf-token": token, "accept": "application/json"},
        )
        assert js.status_code == 200 and js.json()["enqueued"] == 1
        assert js.json()["files"][0]["filename"] == "b.txt"
    assert env.redis.xlen(env.settings.stream) == 2
    assert staged_files(env) == []


def test_unknown_host_names_are_refused(web: str) -> None:
    """DNS rebinding: a page served as evil.example resolving to 127.0.0.1 gets nothing."""
    with httpx.Client(base_url=web) as client:
        assert client.get("/dashboard", headers={"host": "evil.example"}).status_code == 400
        assert client.get("/dashboard", headers={"host": "localhost"}).status_code == 200


def test_pages_forbid_inline_script_and_framing(web: str) -> None:
    with httpx.Client(base_url=web) as client:
        r = client.get("/dashboard")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in r.text and not re.search(r"<[^>]*\son[a-z]+\s*=", r.text)


# -- limits -------------------------------------------------------------------------------


def test_upload_size_limit_is_enforced_while_streaming(env: Env, web: str) -> None:
    limit = 256 * 1024
    with httpx.Client(base_url=web, timeout=30) as client:
        token = upload_token(client)
        # Declared too large: refused before the body is read.
        big = client.post("/upload", **multipart(token, [("big.bin", b"x" * (limit + 1))]))
        assert big.status_code == 413 and "larger than" in big.text

        # Not declared (chunked): refused as soon as the count passes the limit.
        boundary = "fpboundary"
        sent = {"bytes": 0}

        def body() -> Iterator[bytes]:
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n{token}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="huge.bin"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            yield head
            chunk = b"y" * 65536
            for _ in range(12):  # 768 KiB
                sent["bytes"] += len(chunk)
                yield chunk
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = client.post(
            "/upload",
            content=body(),
            headers={
                "content-type": f"multipart/form-data; boundary={boundary}",
                "accept": "application/json",
            },
        )
        assert streamed.status_code == 413, streamed.text
        assert streamed.json()["reason"] in ("too_large", "file_too_large")
        assert "content-length" not in streamed.request.headers

        # Many small files within the limit are fine.
        ok = client.post("/upload", **multipart(token, [(f"f{i}.txt", b"z" * 1000) for i in range(20)]))
        assert ok.status_code == 303
    assert env.redis.xlen(env.settings.stream) == 20
    assert staged_files(env) == []


def test_per_file_limit_follows_max_file_bytes(env: Env) -> None:
    app = create_app(env.settings_with(max_file_bytes=1000), allow_upload=True, interval=0.25)
    with serve(app) as url, httpx.Client(base_url=url) as client:
        token = upload_token(client)
        r = client.post("/upload", **multipart(token, [("ok.txt", b"a" * 999), ("too big.txt", b"b" * 1001)]))
        assert r.status_code == 413 and "too big.txt is larger than" in r.text
        assert env.redis.xlen(env.settings.stream) == 0  # all of the request, or none of it
        assert staged_files(env) == []


def test_names_are_made_safe(env: Env, web: str) -> None:
    with httpx.Client(base_url=web) as client:
        token = upload_token(client)
        files = [("../../../etc/passwd", b"1"), ("..", b"2"), ("a\\b\\c.txt", b"3"), ("x\x7fy.txt", b"4")]
        r = client.post("/upload", **multipart(token, files), headers={"accept": "application/json"})
        assert r.status_code == 200, r.text
        assert [f["filename"] for f in r.json()["files"]] == ["passwd", "upload", "c.txt", "xy.txt"]
    entries = env.redis.xrange(env.settings.stream)
    keys = [fields[b"key"].decode() for _, fields in entries]
    for key in keys:
        path = (env.storage / key).resolve()
        assert path.is_relative_to(env.storage.resolve()) and path.is_file()
        assert ".." not in key.split("/")
    assert not (env.storage.parent / "etc").exists()
    assert clean_filename("a\x00b.txt") == "ab.txt" and len(clean_filename("n" * 1000)) == 255


def test_upload_is_off_unless_enabled(env: Env) -> None:
    with serve(create_app(env.settings, interval=0.25)) as url, httpx.Client(base_url=url) as client:
        assert client.get("/upload").status_code == 404
        assert client.post("/upload", files=[("files", ("a.txt", b"a"))]).status_code in (404, 405)
        assert 'href="/upload"' not in client.get("/dashboard").text
    assert env.redis.xlen(env.settings.stream) == 0


# -- the figures --------------------------------------------------------------------------


@both_tables
def test_status_figures_dead_letters_consumers_lag(env: Env, web: str, browser: Browser) -> None:
    s = env.settings
    for i in range(4):
        env.write_file(f"ok/{i}.txt", f"file {i}".encode())
        env.xadd(
            {
                "file_id": f"00000000-0000-4000-8000-00000000000{i}",
                "filename": f"{i}.txt",
                "key": f"ok/{i}.txt",
            }
        )
    env.xadd({"filename": "no id", "key": "ok/0.txt"})
    env.xadd(
        {"file_id": "00000000-0000-4000-8000-0000000000aa", "filename": "gone.txt", "key": "missing.txt"}
    )
    env.xadd({"file_id": "not-a-uuid", "filename": "x", "key": "ok/1.txt"})
    env.drain()
    expected = Counter(f[b"reason"].decode() for _, f in env.dead())
    assert sum(expected.values()) == 3

    # A consumer that died holding two entries, and two entries nobody has read yet.
    env.xadd({"file_id": "00000000-0000-4000-8000-0000000000b1", "filename": "a", "key": "ok/1.txt"})
    env.xadd({"file_id": "00000000-0000-4000-8000-0000000000b2", "filename": "b", "key": "ok/2.txt"})
    env.redis.xreadgroup(s.group, "crashed-consumer", {s.stream: ">"}, count=2)
    env.xadd({"file_id": "00000000-0000-4000-8000-0000000000b3", "filename": "c", "key": "ok/3.txt"})
    env.xadd({"file_id": "00000000-0000-4000-8000-0000000000b4", "filename": "d", "key": "ok/3.txt"})

    with httpx.Client(base_url=web) as client:

        def settled() -> dict[str, Any] | None:
            snap: dict[str, Any] = client.get("/api/status").json()
            return (
                snap
                if snap["lag"] == 2 and snap["totals"].get("rows") == 4 and snap["dead_by_reason"]
                else None
            )

        snap = wait_for(settled, what="the sampler to see the stream")
        assert snap["errors"] == {"redis": None, "postgresql": None}
        assert snap["pending"] == 2
        # The seven entries loaded or dead-lettered first were trimmed by the consumer.
        assert snap["totals"]["dead_letters"] == 3 and snap["totals"]["stream_length"] == 4
        assert {r["reason"]: r["count"] for r in snap["dead_by_reason"]} == dict(expected)
        crashed = [c for c in snap["consumers"] if c["name"] == "crashed-consumer"]
        assert crashed and crashed[0]["health"] == "dead" and crashed[0]["pending"] == 2
        assert [e["filename"] for e in snap["latest"]][:1] == ["3.txt"]
        assert len(snap["series"]["t"]) >= 2
        # One rate per window, named: the card is the chart's last point (both the last 10 s).
        windows = {"rate": "last 10 s", "rate_minute": "last minute", "consumer_rate": "last 10 s"}
        assert snap["windows"] == windows
        assert snap["rate"] == snap["series"]["processed"][-1]
        assert snap["dead_rate"] == snap["series"]["dead"][-1]
        figures = wait_for(
            lambda: (lambda f: f if f and f["history"]["summary"].startswith("4 files") else None)(
                client.get("/api/status").json()["table_figures"]
            ),
            what="the table's figures",
        )
        assert figures["hypertable"] == env.hypertable and figures["estimated_rows"] >= 0
        assert figures["history"]["source"] == "table"
        assert sum(m["files"] for m in figures["history"]["minutes"]) == 4
        if env.hypertable:
            assert figures["license"] == "apache" and figures["chunks"] == 1

        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
        values = {
            (smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for f in families.values()
            for smp in f.samples
        }
        group_labels = (("group", s.group), ("stream", s.stream))
        assert values[("filepipe_lag_entries", group_labels)] == 2
        assert values[("filepipe_pending_entries", group_labels)] == 2
        assert values[("filepipe_table_rows", (("table", s.table),))] == 4
        assert values[("filepipe_group_acked_total", group_labels)] == 7
        for reason, n in expected.items():
            assert (
                values[("filepipe_dead_letter_entries", (("reason", reason), ("stream", s.dead_stream)))] == n
            )
        assert values[("filepipe_service_up", (("service", "postgresql"),))] == 1
        assert families["filepipe_group_acked"].type == "counter"

    # The same figures on the page.
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{web}/dashboard")
    page.wait_for_function(f"() => document.querySelectorAll('#reasons li').length === {len(expected)}")
    shown = {
        li.get_attribute("data-reason"): int(li.get_attribute("data-count") or 0)
        for li in page.query_selector_all("#reasons li")
    }
    assert shown == dict(expected)
    assert figure(page, "lag") == "2" and figure(page, "pending") == "2" and figure(page, "dead") == "3"
    assert "dead" in page.inner_text("#consumers")
    page.wait_for_function("() => document.getElementById('table-history').textContent.includes('4 files')")
    kind = page.inner_text("#table-kind")
    assert kind.startswith("hypertable (TimescaleDB ") if env.hypertable else kind.startswith("plain table")
    if env.hypertable:
        assert "Chunks: 1 of 1 day" in page.inner_text("#table-chunks")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = "dashboard-dead-letters-hypertable.png" if env.hypertable else "dashboard-dead-letters.png"
    page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
    page.close()


def test_health_and_readiness(env: Env, web: str) -> None:
    with httpx.Client(base_url=web) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {
            "ready": True,
            "checks": {"redis": "ok", "postgresql": "ok", "table": "ok"},
        }


def test_not_ready_and_flagged_when_postgres_is_unreachable(env: Env) -> None:
    settings = env.settings_with(
        pg_uri=f"postgresql://postgres@127.0.0.1:{free_port()}/none", connect_timeout_s=1
    )
    with serve(create_app(settings, interval=0.25)) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"] == "ok" and ready.json()["checks"]["postgresql"] != "ok"
        snap = client.get("/api/status").json()
        assert snap["errors"]["postgresql"] and snap["errors"]["redis"] is None
        assert client.get("/dashboard").status_code == 200


def test_not_ready_while_the_table_is_missing(env: Env) -> None:
    settings = env.settings_with(table=f"{env.settings.table}_missing")
    with serve(create_app(settings, interval=0.25)) as url, httpx.Client(base_url=url, timeout=30) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {
            "redis": "ok",
            "postgresql": "ok",
            "table": f"table {settings.table} does not exist (run `filepipe init-db`)",
        }
        error = client.get("/api/status").json()["errors"]["postgresql"]  # the first sample is taken at start
        assert error and "does not exist" in error and "run `filepipe init-db`" in error, error


def test_dashboard_shows_an_outage_in_the_browser(env: Env, browser: Browser) -> None:
    settings = env.settings_with(redis_url=f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=1)
    with serve(create_app(settings, interval=0.5)) as url:
        page = browser.new_page()
        page.goto(f"{url}/dashboard")
        page.wait_for_selector("#banner:not([hidden])")
        assert "Redis unreachable" in page.inner_text("#banner")
        page.close()


def live_dot(page: Page) -> tuple[str, str]:
    return page.evaluate(
        "(() => { const e = document.getElementById('live'); return [e.dataset.state, e.textContent]; })()"
    )


def consumer_health(page: Page, name: str) -> str | None:
    return page.evaluate(  # type: ignore[no-any-return]
        "(n) => { const r = [...document.querySelectorAll('#consumers tbody tr')]"
        ".find(r => r.querySelector('td.name').firstChild.textContent === n); "
        "return r ? r.dataset.health : null; }",
        name,
    )


def row_is(page: Page, name: str, health: str, timeout: float = 20.0) -> None:
    try:
        wait_for(lambda: consumer_health(page, name) == health, timeout=timeout, what=f"the row, {health}")
    except AssertionError as e:
        shown = page.inner_text("#consumers")
        raise AssertionError(f"{e}: {consumer_health(page, name)} in {shown!r}") from None


def test_an_outage_shows_on_the_consumer_row_and_the_live_dot(env: Env, browser: Browser) -> None:
    """On private servers the test stops: PostgreSQL down, the consumer's row says it waits
    and the dot turns red; Redis down, the row turns stale (last seen) and the dot red;
    each back, live again. A consumer that stopped (departed) leaves the list."""
    with RedisServer() as red, PostgresServer() as pg:
        settings = env.settings_with(redis_url=red.url, pg_uri=pg.uri, connect_timeout_s=1)
        init_db(settings, plain=True)
        with serve(create_app(settings, interval=0.25)) as url, running_consumer(settings) as consumer:
            page = browser.new_page()
            page.goto(f"{url}/dashboard")
            name = consumer.name
            page.wait_for_function("() => document.getElementById('live').dataset.state === 'live'")
            row_is(page, name, "live")
            with httpx.Client(base_url=url, timeout=30) as client:
                ready = client.get("/readyz").json()["checks"]
                assert ready == {"redis": "ok", "postgresql": "ok", "table": "ok"}

                pg.stop()
                env.write_file("outage/1.txt", b"one")
                redis_client = redis.Redis.from_url(red.url)
                redis_client.xadd(
                    settings.stream,
                    {"file_id": str(uuid.uuid4()), "filename": "1.txt", "key": "outage/1.txt"},
                )
                wait_for(lambda: live_dot(page) == ["stale", "PostgreSQL unreachable"], what="the dot, red")
                row_is(page, name, "waiting")
                assert "PostgreSQL" in page.inner_text("#banner")
                row = page.inner_text("#consumers")
                assert "last error: PostgreSQL unreachable" in row, row
                assert client.get("/readyz").status_code == 503
                page.screenshot(path=str(ARTIFACTS / "dashboard-postgres-down.png"), full_page=True)

                pg.start()
                wait_for(lambda: live_dot(page) == ["live", "live"], what="the dot, live again", timeout=60)
                row_is(page, name, "live", timeout=60)
                # A consumer that ran and stopped (no heartbeat, nothing pending) is not listed.
                Consumer(replace(settings, consumer_name="brief"), drain=True, write=None).run()
                snap = lambda: client.get("/api/status").json()  # noqa: E731
                wait_for(lambda: snap()["consumers_departed"] == 1, what="one departed")
                page.wait_for_function(
                    "() => document.getElementById('consumer-health').textContent.includes('1 departed')"
                )
                assert consumer_health(page, "brief") is None and consumer_health(page, name) == "live"

                red.stop()
                wait_for(lambda: live_dot(page) == ["stale", "Redis unreachable"], what="the dot, red")
                row_is(page, name, "stale")
                assert "Redis unreachable" in page.inner_text("#banner")
                heartbeat = page.inner_text("#consumers tbody tr td:last-child")
                assert heartbeat.startswith("seen ") and heartbeat.endswith(" ago"), heartbeat
                assert client.get("/readyz").status_code == 503
                page.screenshot(path=str(ARTIFACTS / "dashboard-redis-down.png"), full_page=True)
                red.start()  # empty
                wait_for(lambda: live_dot(page) == ["live", "live"], what="the dot, live again", timeout=60)
                page.wait_for_selector("#banner", state="hidden")
                assert consumer_health(page, name) != "stale"
                redis_client.close()
        page.close()


def test_a_password_in_a_broken_pg_uri_never_reaches_a_page(env: Env, browser: Browser) -> None:
    """psycopg quotes a connection string it cannot parse, password and all."""
    settings = env.settings_with(pg_uri="postgresql://app:Tr0ub4dor%zz3@127.0.0.1:5432/test")
    with serve(create_app(settings, interval=0.25)) as url, httpx.Client(base_url=url, timeout=30) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["postgresql"] == 'invalid percent-encoded token: "***"'
        snap = client.get("/api/status")
        assert snap.json()["errors"]["postgresql"] == 'invalid percent-encoded token: "***"'
        page = browser.new_page()
        page.goto(f"{url}/dashboard")
        page.wait_for_selector("#banner:not([hidden])")
        assert "invalid percent-encoded token" in page.inner_text("#banner")
        for text in (ready.text, snap.text, page.content(), client.get("/metrics").text):
            assert "Tr0ub4dor" not in text
        page.close()


# -- the command ----------------------------------------------------------------------------


def dashboard_command(env: Env, tmp_path: Path, *args: str, **extra: str) -> subprocess.Popen[str]:
    """`filepipe dashboard` as a real subprocess, on this test's stream and table."""
    return subprocess.Popen(
        [sys.executable, "-m", "filepipe", "dashboard", *args],
        env=consumer_env(env.settings, **extra),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_listening(proc: subprocess.Popen[str], client: httpx.Client) -> None:
    def up() -> bool:
        assert proc.poll() is None, proc.communicate()
        with contextlib.suppress(httpx.TransportError):
            return client.get("/healthz").status_code == 200
        return False

    wait_for(up, timeout=30, what="the dashboard to listen")


def test_dashboard_command_serves_until_sigterm(env: Env, tmp_path: Path) -> None:
    s = env.settings
    port = free_port()
    proc = dashboard_command(env, tmp_path, "--port", str(port), "--allow-upload")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            wait_listening(proc, client)
            assert client.get("/readyz").status_code == 200
            assert client.get("/upload").status_code == 200
            assert s.stream in client.get("/dashboard").text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/dashboard" in out


# -- partitioned streams ------------------------------------------------------------------


def entries(r: Any, name: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return cast("list[tuple[bytes, dict[bytes, bytes]]]", r.xrange(name))


def write_heartbeat(r: Any, settings: Settings, name: str, **figures: Any) -> None:
    """The heartbeat a consumer of every partition writes, beside each partition."""
    beat = {"name": name, "host": "test-host", "pid": 1, "updated": time.time(), **figures}
    for part in partitions(settings):
        r.set(heartbeat_key(part.stream, name), json.dumps(beat), ex=30)


def test_partitioned_stream_is_one_view(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    settings = env.settings_with(partitions=3)
    names = [partition_stream(settings.stream, i) for i in range(3)]
    r = env.redis
    with (
        serve(create_app(settings, allow_upload=True, interval=0.25)) as url,
        httpx.Client(base_url=url) as client,
    ):
        # Uploaded: the producer spreads the events over the partitions by file id.
        assert "one of the 3 partitions of" in client.get("/upload").text
        token = upload_token(client)
        with caplog.at_level(logging.INFO, logger="filepipe"):
            up = client.post(
                "/upload",
                files=[("files", (f"p{i}.txt", f"part {i}".encode())) for i in range(9)],
                headers={"x-csrf-token": token, "accept": "application/json"},
            )
        assert up.status_code == 200, up.text
        body = up.json()
        assert body["enqueued"] == 9 and body["stream"] == settings.stream and body["partitions"] == 3
        uploaded = Counter(f["stream"] for f in body["files"])
        assert all(f["stream"] == stream_for(settings, f["file_id"]) for f in body["files"])
        assert {n: int(r.xlen(n)) for n in names} == {n: uploaded[n] for n in names}
        assert f"enqueued to {settings.stream} ({len(uploaded)} of its 3 partitions)" in caplog.text

        # Poison in two partitions, then everything consumed.
        r.xadd(names[0], {"file_id": "not-a-uuid", "filename": "x", "key": "x.txt"})
        for i in range(2):
            r.xadd(names[2], {"file_id": str(uuid.uuid4()), "filename": f"gone {i}", "key": f"gone/{i}.txt"})
        stats = Consumer(settings, drain=True, write=None).run()
        assert (stats.inserted, stats.dead_lettered) == (9, 3)
        dead = {n: Counter(f[b"reason"].decode() for _, f in entries(r, n + ":dead")) for n in names}
        assert [sum(c.values()) for c in dead.values()] == [1, 0, 2]
        expected_reasons = dict(sum(dead.values(), Counter()))

        # Then: a consumer of every partition holding three entries in two of them, one
        # that died holding one, and two entries nobody has read.
        for name, n in zip(names, (3, 1, 2), strict=True):
            for _ in range(n):
                r.xadd(name, {"file_id": str(uuid.uuid4()), "filename": "later", "key": "later.txt"})
        r.xreadgroup(settings.group, "crashed-consumer", {names[0]: ">"}, count=1)
        r.xreadgroup(settings.group, "reader", {names[1]: ">", names[2]: ">"})
        write_heartbeat(r, settings, "reader", inserted=7, dead_lettered=1, batches=2, rate=1.5)
        lengths = [3, 1, 2]  # what was consumed before was trimmed

        def settled() -> dict[str, Any] | None:
            snap: dict[str, Any] = client.get("/api/status").json()
            reasons = {row["reason"]: row["count"] for row in snap["dead_by_reason"]}
            done = snap["lag"] == 2 and snap["pending"] == 4 and snap["totals"].get("rows") == 9
            return snap if done and reasons == expected_reasons else None

        snap = wait_for(settled, what="the sampler to see every partition")
        assert snap["errors"] == {"redis": None, "postgresql": None}
        assert snap["stream"] == settings.stream and snap["dead_stream"] == f"{settings.stream}:{{i}}:dead"
        assert snap["totals"]["stream_length"] == sum(lengths) == 6
        assert snap["totals"]["dead_letters"] == 3 and not snap["dead_counting"]
        assert snap["totals"]["acked"] == 9 + 3  # read by the group, minus the 4 pending
        assert [
            (p["stream"], p["length"], p["lag"], p["pending"], p["dead_total"]) for p in snap["partitions"]
        ] == [
            (names[0], lengths[0], 2, 1, 1),
            (names[1], lengths[1], 0, 1, 0),
            (names[2], lengths[2], 0, 2, 2),
        ]
        # Each consumer once: the reader's pending summed over its two partitions.
        by_name = {c["name"]: c for c in snap["consumers"]}
        assert sorted(by_name) == ["crashed-consumer", "reader"]
        assert (by_name["reader"]["pending"], by_name["reader"]["health"]) == (3, "live")
        assert (by_name["reader"]["host"], by_name["reader"]["inserted"]) == ("test-host", 7)
        crashed = by_name["crashed-consumer"]
        assert (crashed["pending"], crashed["health"]) == (1, "dead")
        assert snap["consumers_summary"] == {"live": 1, "waiting": 0, "stale": 0, "dead": 1}
        assert {e["filename"] for e in snap["latest"]} == {f"p{i}.txt" for i in range(9)}

        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        values = {
            (smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for f in families.values()
            for smp in f.samples
        }
        group_labels = (("group", settings.group), ("stream", settings.stream))
        assert values[("filepipe_lag_entries", group_labels)] == 2
        assert values[("filepipe_pending_entries", group_labels)] == 4
        assert values[("filepipe_group_acked_total", group_labels)] == 12
        assert values[("filepipe_stream_entries", (("stream", settings.stream),))] == sum(lengths)
        dead_metrics = {
            dict(labels)["reason"]: v
            for (metric, labels), v in values.items()
            if metric == "filepipe_dead_letter_entries"
        }
        assert dead_metrics == expected_reasons
        assert values[("filepipe_consumers", (("health", "live"),))] == 1

        page = client.get("/dashboard").text
        assert "(3 partitions)" in page and f"in {settings.stream}:{{i}}:dead" in page


def test_partitioned_dead_letters_are_counted_per_partition_between_samples(env: Env) -> None:
    """Each partition's dead letters are read from its own cursor: only new ones are
    read, and a partition whose dead letters were deleted is counted again."""
    settings = env.settings_with(partitions=3)
    dead = [partition_stream(settings.stream, i) + ":dead" for i in range(3)]
    r = env.redis
    for reason in ("bad_uuid", "missing", "missing"):
        r.xadd(dead[0], {"reason": reason})
    r.xadd(dead[2], {"reason": "too_large"})
    monitor = Monitor(settings, interval=0.25)
    try:

        def reasons() -> dict[str, int]:
            snap = monitor.sample()
            assert snap["errors"]["redis"] is None, snap["errors"]
            return {row["reason"]: row["count"] for row in snap["dead_by_reason"]}

        assert reasons() == {"missing": 2, "bad_uuid": 1, "too_large": 1}
        r.xadd(dead[1], {"reason": "too_large"})
        r.xadd(dead[2], {"reason": "bad_uuid"})
        assert reasons() == {"missing": 2, "bad_uuid": 2, "too_large": 2}
        # Deleted from one partition (a replay): that partition starts over, the others stand.
        r.xdel(dead[0], *[entry_id for entry_id, _ in entries(r, dead[0])[:2]])
        wait_for(lambda: reasons() == {"too_large": 2, "missing": 1, "bad_uuid": 1}, what="a recount")
        snap = monitor.snapshot()
        assert snap["totals"]["dead_letters"] == 4 and not snap["dead_counting"]
        assert [p["dead_total"] for p in snap["partitions"]] == [1, 1, 2]
        assert (snap["lag"], snap["pending"], snap["totals"]["stream_length"]) == (0, 0, 0)
    finally:
        monitor.stop()


def test_unpartitioned_snapshot_has_no_partitions(env: Env) -> None:
    monitor = Monitor(env.settings, interval=0.25)
    try:
        snap = monitor.sample()
    finally:
        monitor.stop()
    assert "partitions" not in snap and snap["dead_stream"] == env.settings.dead_stream


def test_partitions_on_a_redis_cluster(env: Env) -> None:
    from tests.support.cluster import RedisClusterServers

    from filepipe.stream import connect, ensure_group

    with RedisClusterServers() as cluster:
        settings = env.settings_with(redis_url=cluster.url, redis_cluster=True, partitions=3)
        names = [partition_stream(settings.stream, i) for i in range(3)]
        r = connect(settings)
        monitor = Monitor(settings, interval=0.25)
        try:
            for i, name in enumerate(names):
                for _ in range(i + 1):
                    r.xadd(name, {"file_id": str(uuid.uuid4()), "filename": "f", "key": "f.txt"})
                ensure_group(r, name, settings.group)
            r.xreadgroup(settings.group, "reader", {names[1]: ">"}, count=1)
            r.xreadgroup(settings.group, "reader", {names[2]: ">"}, count=2)
            r.xadd(names[0] + ":dead", {"reason": "missing"})
            r.xadd(names[2] + ":dead", {"reason": "bad_uuid"})
            write_heartbeat(r, settings, "reader", inserted=3)
            first = monitor.sample()
            r.xadd(names[1] + ":dead", {"reason": "missing"})
            snap = monitor.sample()
        finally:
            monitor.stop()
            r.close()
    assert first["errors"]["redis"] is None, first["errors"]
    assert snap["errors"]["redis"] is None, snap["errors"]
    assert [(p["length"], p["lag"], p["pending"], p["dead_total"]) for p in snap["partitions"]] == [
        (1, 1, 0, 1),
        (2, 1, 1, 1),
        (3, 1, 2, 1),
    ]
    assert (snap["totals"]["stream_length"], snap["lag"], snap["pending"]) == (6, 3, 3)
    assert [(c["name"], c["pending"], c["health"]) for c in snap["consumers"]] == [("reader", 3, "live")]
    assert {row["reason"]: row["count"] for row in snap["dead_by_reason"]} == {"missing": 2, "bad_uuid": 1}
    assert snap["totals"]["acked"] == 0


# -- exposure: who may reach the page, and how much they may send -------------------------

LOGIN = ("ops", "correct horse battery")


def test_a_login_guards_every_path_but_healthz(env: Env, browser: Browser) -> None:
    app = create_app(env.settings, allow_upload=True, interval=0.25, login=LOGIN)
    with serve(app) as url:
        with httpx.Client(base_url=url) as anyone:
            assert anyone.get("/healthz").status_code == 200
            for path in (
                "/dashboard",
                "/api/status",
                "/metrics",
                "/readyz",
                "/upload",
                "/static/dashboard.js",
            ):
                r = anyone.get(path)
                assert r.status_code == 401, path
                assert r.headers["www-authenticate"] == 'Basic realm="filepipe", charset="UTF-8"'
                assert env.settings.stream not in r.text
            assert anyone.post("/upload", files=[("files", ("a.txt", b"a"))]).status_code == 401
            assert anyone.get("/api/status", auth=("ops", "wrong")).status_code == 401
            assert anyone.get("/api/status", headers={"authorization": "Basic !!!"}).status_code == 401
        with httpx.Client(base_url=url, auth=LOGIN) as ops:
            assert ops.get("/api/status").json()["stream"] == env.settings.stream
            token = upload_token(ops)
            assert ops.post("/upload", **multipart(token, [("a.txt", b"a")])).status_code == 303
        assert env.redis.xlen(env.settings.stream) == 1

        # The browser asks once, then its polls carry the login.
        context = browser.new_context(http_credentials={"username": LOGIN[0], "password": LOGIN[1]})
        page = context.new_page()
        problems = watch_console(page)
        page.goto(f"{url}/dashboard")
        page.wait_for_function("() => document.getElementById('live').dataset.state === 'live'")
        page.wait_for_function("() => document.getElementById('lag').dataset.value === '1'")
        assert problems == []
        context.close()


def test_failed_logins_are_limited_per_client(env: Env) -> None:
    with serve(create_app(env.settings, interval=0.25, login=LOGIN)) as url, httpx.Client(base_url=url) as c:
        codes = [c.get("/api/status", auth=("ops", f"guess {i}")).status_code for i in range(12)]
        assert codes == [401] * 10 + [429] * 2
        # Even the right password waits now: guessing gains nothing.
        r = c.get("/api/status", auth=LOGIN)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert c.get("/healthz").status_code == 200


def test_uploads_are_limited_per_client(env: Env) -> None:
    app = create_app(
        env.settings, allow_upload=True, interval=0.25, uploads_per_minute=3, upload_quota_bytes=100 * 1024
    )
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        token = upload_token(client)
        js = {"accept": "application/json"}
        ok = [
            client.post("/upload", **multipart(token, [(f"{i}.txt", b"x" * 30_000)]), headers=js)
            for i in range(3)
        ]
        assert [r.status_code for r in ok] == [200, 200, 200]
        fourth = client.post("/upload", **multipart(token, [("3.txt", b"x")]), headers=js)
        assert fourth.status_code == 429 and fourth.json()["reason"] == "rate_limited"
        # 3 a minute: the next upload is allowed when the bucket's next token comes, 20 s after
        # the first (less the few seconds the three took), not in a second or a minute.
        assert 15 <= int(fourth.headers["retry-after"]) <= 60 / 3 + 1
        metrics = client.get("/metrics").text
        assert 'filepipe_upload_rejected_total{reason="rate_limited"} 1.0' in metrics
    assert env.redis.xlen(env.settings.stream) == 3

    app = create_app(env.settings, allow_upload=True, interval=0.25, upload_quota_bytes=100 * 1024)
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        token = upload_token(client)
        first = client.post("/upload", **multipart(token, [("a.bin", b"a" * 60_000)]))
        assert first.status_code == 303
        # Declared beyond what is left of the quota: refused before the body is read.
        second = client.post("/upload", **multipart(token, [("b.bin", b"b" * 60_000)]))
        assert second.status_code == 429 and "Upload quota reached: 100.0 KiB an hour" in second.text

        # Not declared (chunked): refused once the bytes received pass the quota.
        boundary = "fpquota"

        def body() -> Iterator[bytes]:
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n{token}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="c.bin"\r\n\r\n'
            ).encode()
            for _ in range(10):
                yield b"c" * 8192
            yield f"\r\n--{boundary}--\r\n".encode()

        third = client.post(
            "/upload",
            content=body(),
            headers={
                "content-type": f"multipart/form-data; boundary={boundary}",
                "accept": "application/json",
            },
        )
        assert third.status_code == 429 and third.json()["reason"] == "quota"
    assert env.redis.xlen(env.settings.stream) == 4
    assert staged_files(env) == []


def test_oversized_part_headers_and_too_many_parts_are_refused(env: Env, web: str) -> None:
    with httpx.Client(base_url=web, timeout=30) as client:
        token = upload_token(client)
        boundary = "fpparts"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n{token}\r\n'
        file_part = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\nabc\r\n'
        )
        headers = {"content-type": f"multipart/form-data; boundary={boundary}", "accept": "application/json"}
        long_header = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="b.txt"\r\n'
            f"X-Padding: {'p' * 10_000}\r\n\r\nabc\r\n"
        )
        many_headers = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="c.txt"\r\n'
            + "".join(f"X-H{i}: v\r\n" for i in range(20))
            + "\r\nabc\r\n"
        )
        for part in (long_header, many_headers):
            r = client.post(
                "/upload", content=(head + file_part + part + f"--{boundary}--\r\n").encode(), headers=headers
            )
            assert r.status_code == 400 and "headers" in r.json()["error"], r.text
        fields = "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n' for i in range(1100)
        )
        r = client.post(
            "/upload", content=(head + file_part + fields + f"--{boundary}--\r\n").encode(), headers=headers
        )
        assert r.status_code == 413 and r.json()["reason"] == "too_many_parts"
        assert client.get("/healthz").status_code == 200
    assert env.redis.xlen(env.settings.stream) == 0
    assert staged_files(env) == []


@hypothesis.settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(query=st.dictionaries(st.sampled_from(["enqueued", "bytes", "x"]), st.text(max_size=30), max_size=3))
def test_any_query_on_the_upload_page_gives_a_page(web: str, query: dict[str, str]) -> None:
    with httpx.Client(base_url=web) as client:
        for q in ({"enqueued": "²"}, {"enqueued": "1", "bytes": "²"}, query):
            r = client.get("/upload", params=q)
            assert r.status_code == 200, (q, r.text[:200])
            shown = 'id="result"' in r.text
            assert shown == bool(re.fullmatch(r"[0-9]{1,15}", q.get("enqueued", "")))


def test_dns_rebinding_is_refused_on_every_bind(env: Env) -> None:
    app = create_app(env.settings, interval=0.25, allowed_hosts=["dash.example.com", "*.ops.example"])
    with serve(app) as url, httpx.Client(base_url=url) as client:
        for host in (
            "dash.example.com",
            "a.ops.example",
            "localhost:8080",
            "127.0.0.1",
            "[::1]:1",
            "10.1.2.3",
        ):
            assert client.get("/api/status", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "dash.example.com.evil.example", "ops.example.evil", ""):
            assert client.get("/api/status", headers={"host": host}).status_code == 400, host
        assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 400


def test_a_public_address_needs_a_login(env: Env, tmp_path: Path) -> None:
    port = free_port()
    refused = dashboard_command(env, tmp_path, "--host", "0.0.0.0", "--port", str(port))
    try:
        out, err = refused.communicate(timeout=30)
    finally:
        if refused.poll() is None:
            refused.kill()
            refused.communicate()
    assert refused.returncode == 2
    assert err.strip().splitlines() == [
        "error: the dashboard on 0.0.0.0 would be open to anyone who can reach it: set "
        "FILEPIPE_DASHBOARD_PASSWORD (and FILEPIPE_DASHBOARD_USER, default filepipe) to require a login, "
        "or listen on 127.0.0.1"
    ]
    proc = dashboard_command(
        env,
        tmp_path,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--allow-upload",
        FILEPIPE_DASHBOARD_USER="ops",
        FILEPIPE_DASHBOARD_PASSWORD="s3cret-Dash-77",
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            wait_listening(proc, client)
            assert client.get("/api/status").status_code == 401
            assert client.post("/upload", files=[("files", ("a.txt", b"a"))]).status_code == 401
            assert client.get("/api/status", auth=("ops", "s3cret-Dash-77")).status_code == 200
            # Bound to every interface, a name not given is still refused.
            assert (
                client.get(
                    "/api/status", auth=("ops", "s3cret-Dash-77"), headers={"host": "evil.example"}
                ).status_code
                == 400
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "behind a login" in err and "s3cret-Dash-77" not in out + err


@pytest.mark.parametrize("parts", [0, 2])
def test_live_consumers_show_among_hundreds_departed(env: Env, parts: int) -> None:
    """Restarts leave a group entry per departed consumer (no heartbeat, nothing pending).
    The live ones, whatever their names, are never cut off by them."""
    settings = env.settings_with(partitions=parts)
    for part in partitions(settings):
        env.redis.xgroup_create(part.stream, settings.group, id="0", mkstream=True)
        pipe = env.redis.pipeline(transaction=False)
        for i in range(600):
            pipe.xgroup_createconsumer(part.stream, settings.group, f"departed-{i:04d}")
        pipe.xgroup_createconsumer(part.stream, settings.group, "zz-live")
        pipe.execute()
    write_heartbeat(env.redis, settings, "zz-live", inserted=7)
    monitor = Monitor(settings, interval=0.25)
    try:
        snap = monitor.sample()
    finally:
        monitor.stop()
        for part in partitions(settings):
            env.redis.delete(part.stream, heartbeat_key(part.stream, "zz-live"))
    assert [(c["name"], c["health"], c["inserted"]) for c in snap["consumers"]] == [("zz-live", "live", 7)]
    assert snap["consumers_summary"] == {"live": 1, "waiting": 0, "stale": 0, "dead": 0}
    assert snap["consumers_departed"] == 600


def test_redis_memory_and_what_holds_it(env: Env, browser: Browser) -> None:
    """On its own Redis, 85 % full, the stream held back by another application's group."""
    from tests.support.workload import seed

    from filepipe.embedded import RedisServer

    with RedisServer() as server:
        settings = env.settings_with(redis_url=server.url)
        import redis as redis_lib

        r = redis_lib.Redis.from_url(server.url)
        seed(r, settings, env.storage, 20_000)
        r.xgroup_create(settings.stream, "slow_app", id="0")
        Consumer(settings, drain=True, write=None).run()
        with serve(create_app(settings, interval=0.25)) as url, httpx.Client(base_url=url) as client:

            def sampled(max_bytes: int, after: float = 0.0) -> Callable[[], dict[str, Any] | None]:
                def found() -> dict[str, Any] | None:
                    snap: dict[str, Any] = client.get("/api/status").json()
                    kept, updated = snap["retention"], snap["updated"] or 0.0
                    fits = kept and kept["memory"]["max_bytes"] == max_bytes and updated > after
                    return snap if fits else None

                return found

            # The dashboard's own reads (its samples, /metrics) take some 200 KB of this small
            # Redis's memory, for good, once they have run: 5 points of the share at a 4 MiB
            # maxmemory. It is set after they have, at 85 % of the memory used then.
            first = wait_for(sampled(0), what="a first sample")
            client.get("/metrics")
            wait_for(sampled(0, after=first["updated"]), what="a later sample")
            maxmemory = int(int(r.info("memory")["used_memory"]) / 0.85)
            r.config_set("maxmemory", str(maxmemory))
            kept = wait_for(sampled(maxmemory), what="a sample with the new maxmemory")["retention"]
            assert kept["length"] == 20_000 and kept["memory_bytes"] > 1_000_000
            assert kept["held"] == {"stream": settings.stream, "why": "unread", "group": "slow_app"}
            assert kept["reason"] == "group slow_app has not read 20,000 entries"
            assert 0.8 < kept["memory"]["share"] < 0.9
            values = {
                (smp.name, tuple(sorted(smp.labels.items()))): smp.value
                for f in text_string_to_metric_families(client.get("/metrics").text)
                for smp in f.samples
            }
            labels = (("group", "slow_app"), ("reason", "unread"), ("stream", settings.stream))
            assert values[("filepipe_stream_kept_entries", labels)] == 20_000
            assert values[("filepipe_redis_memory_max_bytes", (("node", ""),))] > 0

            page = browser.new_page(viewport={"width": 390, "height": 844})
            page.goto(f"{url}/dashboard")
            page.wait_for_function("() => document.getElementById('kept').textContent.includes('slow_app')")
            assert "group slow_app has not read 20,000 entries" in page.inner_text("#kept")
            # "3.6 MiB of 4.2 MiB maxmemory (85%)": the share between 80 and 89 %, as set.
            assert re.search(r"maxmemory \(8\d%\)", page.inner_text("#memory")), page.inner_text("#memory")
            assert int(figure(page, "memory")) > 0
            assert "warn" in (page.get_attribute("#memory-fill", "class") or "")
            assert "20,000 entries" in page.inner_text("#stream-size")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-redis-memory.png"), full_page=True)
            page.close()
        r.close()
