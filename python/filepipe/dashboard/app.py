"""The dashboard web app (Starlette): the live page, its JSON feed, the upload page,
Prometheus metrics and the health probes.

    /dashboard     processing rate over time, totals, lag, pending, consumers,
                   dead letters by reason, latest events; polls /api/status
    /api/status    the monitor's last snapshot (JSON)
    /upload        files from the browser into storage and the stream (--allow-upload)
    /metrics       Prometheus text format
    /healthz       the process serves
    /readyz        Redis answers and is not full, PostgreSQL answers and has the table
                   (503 otherwise: `observe.health.ServiceProbe`)

The routes and the guards every one of them passes (the Host check, the login, its rate
limit) are kept in one module of about 500 lines, so that no route can be added without
them in view; the upload page's work is in `upload.py`, the readings in `monitor.py`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import jinja2
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..config import Settings, mask_url
from ..observe.export import check_host_names, group_families, host_allowed, retention_families
from ..observe.health import ServiceProbe, readiness
from ..observe.streams import dead_stream_name
from ..observe.text import plural
from ..partitions import stream_for
from ..redaction import error_line
from .defaults import DEFAULT_UPLOAD_QUOTA_BYTES, DEFAULT_UPLOADS_PER_MINUTE
from .monitor import Monitor
from .upload import (
    CSRF_COOKIE,
    CSRF_FIELD,
    ClientBudget,
    CsrfGuard,
    Uploader,
    UploadError,
    UploadLimits,
    client_of,
    human_bytes,
)

log = logging.getLogger("filepipe")

HERE = Path(__file__).parent
DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
LOGIN_FAILURES_PER_MINUTE = 10  # per client; past them, every request is refused for a while
REALM = 'Basic realm="filepipe", charset="UTF-8"'
_COUNT = re.compile(r"[0-9]{1,15}")

# No inline script or style, nothing from elsewhere: the page works offline and an
# injected tag would not run.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HostGuard:
    """Answers only requests that name this server in their Host header (a loopback
    name, an IP address, or one of `names`): a page served from another name that
    resolves here (DNS rebinding) gets 400, on every path."""

    def __init__(self, app: ASGIApp, names: list[str]) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.names):
                await PlainTextResponse("Invalid host header", status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BasicAuth:
    """HTTP basic authentication against one user and password (compared in constant
    time) on every path but /healthz. A client with `LOGIN_FAILURES_PER_MINUTE` failed
    attempts is refused (429) until its budget refills."""

    OPEN_PATHS = ("/healthz",)

    def __init__(self, app: ASGIApp, user: str, password: str, failures: ClientBudget) -> None:
        self.app = app
        self.user = user.encode()
        self.password = password.encode()
        self.failures = failures

    def _valid(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (ValueError, binascii.Error):
            return False
        # Both compared, whatever the first says.
        same_user = hmac.compare_digest(user, self.user)
        same_password = hmac.compare_digest(password, self.password)
        return bool(sep) and same_user and same_password

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope["client"][0] if scope.get("client") else "unknown"
        wait = self.failures.wait(client)
        if wait > 0:
            response: Response = PlainTextResponse(
                f"Too many failed logins: try again in {wait:.0f} s.\n",
                status_code=429,
                headers={"retry-after": str(int(wait) + 1)},
            )
            await response(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not self._valid(header):
            if header:
                self.failures.spend(client, 1)
                log.warning("dashboard: failed login from %s", client)
            response = PlainTextResponse(
                "Log in with the dashboard's user and password (FILEPIPE_DASHBOARD_USER, "
                "FILEPIPE_DASHBOARD_PASSWORD).\n",
                status_code=401,
                headers={"www-authenticate": REALM, "cache-control": "no-store"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class DashboardCollector(Collector):
    """The pipeline's figures from the monitor's last sample (no query per scrape). A
    partitioned stream is reported under its own name, its figures summed over the
    partitions, as the consumer's collector does."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Any]:
        snap = self.monitor.snapshot()
        s = self.monitor.settings
        totals = snap.get("totals") or {}
        up = GaugeMetricFamily(
            "filepipe_service_up", "Whether the service answered the last sample.", labels=["service"]
        )
        for service in ("redis", "postgresql"):
            up.add_metric([service], 0 if snap["errors"].get(service) or snap["updated"] is None else 1)
        yield up
        length = GaugeMetricFamily(
            "filepipe_stream_entries", "Entries in the stream (XLEN).", labels=["stream"]
        )
        if "stream_length" in totals:
            length.add_metric([s.stream], totals["stream_length"])
        yield length
        yield from group_families(s.stream, s.group, snap.get("pending"), snap.get("lag"))
        yield from retention_families(s.stream, self.monitor.retention)
        acked = CounterMetricFamily(
            "filepipe_group_acked",
            "Entries acknowledged by the consumer group, all consumers.",
            labels=["stream", "group"],
        )
        if totals.get("acked") is not None:
            acked.add_metric([s.stream, s.group], totals["acked"])
        yield acked
        dead = GaugeMetricFamily(
            "filepipe_dead_letter_entries",
            "Entries in the dead-letter stream, by reason.",
            labels=["stream", "reason"],
        )
        for row in snap.get("dead_by_reason", []):
            dead.add_metric([dead_stream_name(s), row["reason"]], row["count"])
        yield dead
        rows = GaugeMetricFamily(
            "filepipe_table_rows",
            "Rows in the events table (an estimate when counting is slow).",
            labels=["table"],
        )
        if totals.get("rows") is not None:
            rows.add_metric([s.table], totals["rows"])
        yield rows
        consumers = GaugeMetricFamily(
            "filepipe_consumers", "Consumers of the group, by health.", labels=["health"]
        )
        for health, n in (snap.get("consumers_summary") or {}).items():
            consumers.add_metric([health], n)
        yield consumers


def _wants_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def create_app(
    settings: Settings,
    *,
    allow_upload: bool = False,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    allowed_hosts: list[str] | None = None,
    interval: float = 1.0,
    login: tuple[str, str] | None = None,
    uploads_per_minute: float = DEFAULT_UPLOADS_PER_MINUTE,
    upload_quota_bytes: int = DEFAULT_UPLOAD_QUOTA_BYTES,
) -> Starlette:
    """The dashboard app. Requests must name it in their Host header by a loopback name,
    an IP address or one of `allowed_hosts` (DNS rebinding); with `login` (user,
    password), every path but /healthz needs it. Uploads are off unless `allow_upload`;
    each client may send `uploads_per_minute` of them and `upload_quota_bytes` per hour."""
    monitor = Monitor(settings, interval=interval)
    probe = ServiceProbe(settings)
    guard = CsrfGuard()
    limits = UploadLimits(
        max_request_bytes=max_upload_bytes, max_file_bytes=min(max_upload_bytes, settings.max_file_bytes)
    )
    uploader = Uploader(settings, limits, guard) if allow_upload else None
    upload_rate = ClientBudget(uploads_per_minute, 60.0)
    upload_volume = ClientBudget(upload_quota_bytes, 3600.0)

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(DashboardCollector(monitor))
    uploaded_files = Counter(
        "filepipe_uploaded_files_total", "Files stored and enqueued from the upload page.", registry=registry
    )
    uploaded_bytes = Counter(
        "filepipe_uploaded_bytes_total", "Bytes of the files uploaded.", registry=registry
    )
    refused = Counter(
        "filepipe_upload_rejected_total", "Upload requests refused, by reason.", ["reason"], registry=registry
    )

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters["bytes"] = human_bytes
    templates = Jinja2Templates(env=env)
    base_context = {
        "version": __version__,
        "stream": settings.stream,
        "partitions": settings.partitions,
        "dead_stream": dead_stream_name(settings),
        "group": settings.group,
        "table": settings.table,
        "redis": mask_url(settings.redis_url),
        "upload_enabled": allow_upload,
    }

    async def index(request: Request) -> Response:
        return RedirectResponse("/dashboard", status_code=307)

    async def dashboard(request: Request) -> Response:
        return templates.TemplateResponse(
            request,
            "dashboard.html",
            {**base_context, "page": "dashboard", "interval_ms": int(interval * 1000)},
        )

    async def status(request: Request) -> Response:
        return JSONResponse(monitor.snapshot(), headers={"cache-control": "no-store"})

    async def metrics(request: Request) -> Response:
        body = await anyio.to_thread.run_sync(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        ready, doc = readiness(await anyio.to_thread.run_sync(probe.check))
        return JSONResponse(
            doc,
            status_code=200 if ready else 503,
            headers={"cache-control": "no-store"},
        )

    def upload_page(
        request: Request,
        *,
        status_code: int = 200,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> Response:
        # Only a GET issues a cookie: a refused cross-site POST arrives without the
        # user's cookie, and must not replace it (that would void the user's open form).
        cookie = guard.cookie_value(request)
        fresh = cookie is None and request.method == "GET"
        if fresh:
            cookie = guard.new_cookie_value()
        response = templates.TemplateResponse(
            request,
            "upload.html",
            {
                **base_context,
                "page": "upload",
                "csrf_field": CSRF_FIELD,
                "csrf_token": guard.form_token(cookie) if cookie else "",
                "max_request_bytes": limits.max_request_bytes,
                "max_file_bytes": limits.max_file_bytes,
                "max_files": limits.max_files,
                "storage": uploader.storage_description() if uploader else "",
                "error": error,
                "result": result,
            },
            status_code=status_code,
            headers={"cache-control": "no-store"},
        )
        if fresh and cookie:
            response.set_cookie(
                CSRF_COOKIE,
                cookie,
                httponly=True,
                samesite="strict",
                path="/",
                secure=request.url.scheme == "https",
            )
        return response

    async def upload_get(request: Request) -> Response:
        result = None
        # The redirect after an upload says what was enqueued; anything else is ignored
        # (str.isdigit() would take '²', which int() refuses).
        enqueued = request.query_params.get("enqueued", "")
        if _COUNT.fullmatch(enqueued):
            size = request.query_params.get("bytes", "")
            result = {"files": int(enqueued), "bytes": int(size) if _COUNT.fullmatch(size) else None}
        return upload_page(request, result=result)

    def refuse(request: Request, e: UploadError) -> Response:
        refused.labels(reason=e.reason).inc()
        headers = {"retry-after": str(e.retry_after)} if e.retry_after else None
        if _wants_json(request):
            body = {"error": e.message, "reason": e.reason}
            return JSONResponse(body, status_code=e.status, headers=headers)
        response = upload_page(request, status_code=e.status, error=e.message)
        if headers:
            response.headers.update(headers)
        return response

    def check_budget(client: str, declared: int) -> None:
        """Refuses an upload when the client sent too many lately or too many bytes."""
        wait = upload_rate.wait(client)
        if wait > 0:
            raise UploadError(
                429,
                "rate_limited",
                f"Too many uploads: at most {uploads_per_minute:g} a minute. Try again in {wait:.0f} s.",
                retry_after=int(wait) + 1,
            )
        need = min(max(declared, 1), upload_quota_bytes)
        wait = upload_volume.wait(client, need)
        if wait > 0:
            raise UploadError(
                429,
                "quota",
                f"Upload quota reached: {human_bytes(upload_quota_bytes)} an hour. "
                f"Try again in {wait / 60:.0f} min.",
                retry_after=int(wait) + 1,
            )
        upload_rate.spend(client, 1)

    async def upload_post(request: Request) -> Response:
        assert uploader is not None
        client = client_of(request)
        declared = request.headers.get("content-length", "")

        def budget(n: int) -> None:
            if upload_volume.spend(client, n) < 0:
                raise UploadError(
                    429,
                    "quota",
                    f"Upload quota reached: {human_bytes(upload_quota_bytes)} an hour.",
                    retry_after=60,
                )

        try:
            check_budget(client, int(declared) if _COUNT.fullmatch(declared) else 0)
            staged = await uploader.receive(request, budget)
        except UploadError as e:
            return refuse(request, e)
        try:
            done = await anyio.to_thread.run_sync(uploader.enqueue, staged)
        except Exception as e:
            log.warning("upload failed: %s", error_line(e))
            refused.labels(reason="unavailable").inc()
            message = f"The files could not be stored and enqueued: {error_line(e)}"
            if _wants_json(request):
                return JSONResponse({"error": message, "reason": "unavailable"}, status_code=503)
            return upload_page(request, status_code=503, error=message)
        total = sum(f.size for f in done)
        uploaded_files.inc(len(done))
        uploaded_bytes.inc(total)
        files: list[dict[str, Any]] = [
            {"file_id": f.file_id, "filename": f.filename, "size": f.size} for f in done
        ]
        where = settings.stream
        if settings.partitions:
            # The producer put each event on the partition of its file id.
            for f in files:
                f["stream"] = stream_for(settings, f["file_id"])
            used = len({f["stream"] for f in files})
            where += f" ({used} of its {settings.partitions} {plural(settings.partitions, 'partition')})"
        log.info("upload: %d files (%d bytes) enqueued to %s", len(done), total, where)
        if _wants_json(request):
            body: dict[str, Any] = {"enqueued": len(done), "stream": settings.stream, "files": files}
            if settings.partitions:
                body["partitions"] = settings.partitions
            return JSONResponse(body)
        # Post/redirect/get: reloading the result page does not upload again.
        return RedirectResponse(f"/upload?enqueued={len(done)}&bytes={total}", status_code=303)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(monitor.start)
        if uploader is not None:
            await anyio.to_thread.run_sync(uploader.open)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(monitor.stop)
            if uploader is not None:
                uploader.close()
            probe.close()

    routes = [
        Route("/", index),
        Route("/dashboard", dashboard),
        Route("/api/status", status),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    if uploader is not None:
        routes += [
            Route("/upload", upload_get, methods=["GET"]),
            Route("/upload", upload_post, methods=["POST"]),
        ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(HostGuard, names=check_host_names(allowed_hosts or [])),
    ]
    if login is not None:
        failures = ClientBudget(LOGIN_FAILURES_PER_MINUTE, 60.0)
        middleware.append(Middleware(BasicAuth, user=login[0], password=login[1], failures=failures))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
    app.state.monitor = monitor
    app.state.uploader = uploader
    app.state.registry = registry
    return app
