"""`filepipe dashboard`: the live web page, uploads, Prometheus metrics (the web stack is
imported only when it runs)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..config import Settings
from ..dashboard import DEFAULT_PORT, DEFAULT_UPLOAD_QUOTA_BYTES, DEFAULT_UPLOADS_PER_MINUTE
from .app import app
from .options import PIPELINE, POSTGRES, REDIS, STORAGE, command


@command(app, "dashboard", settings=(*REDIS, *POSTGRES, *PIPELINE, *STORAGE))
def dashboard(
    s: Settings,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = DEFAULT_PORT,
    allow_upload: Annotated[
        bool,
        typer.Option("--allow-upload", help="Serve /upload: files from the browser are stored and enqueued."),
    ] = False,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="Largest upload request, in MiB.")
    ] = 100.0,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="A Host name the page may be reached by, besides loopback names and IP addresses "
            "(repeatable; *.example.com for its subdomains).",
            show_default=False,
        ),
    ] = None,
    upload_rate: Annotated[
        float, typer.Option("--upload-rate", min=0.1, help="Uploads a minute, per client address.")
    ] = DEFAULT_UPLOADS_PER_MINUTE,
    upload_quota_mb: Annotated[
        float, typer.Option("--upload-quota-mb", min=0.001, help="MiB uploaded an hour, per client address.")
    ] = DEFAULT_UPLOAD_QUOTA_BYTES / (1024 * 1024),
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, max=60.0, help="Seconds between samples.")
    ] = 1.0,
    debug: bool = False,
) -> None:
    """Serve the live dashboard (/dashboard), Prometheus /metrics, /healthz, /readyz,
    and with --allow-upload an upload page (/upload)."""
    from ..dashboard import serve

    serve(
        s,
        host=host,
        port=port,
        allow_upload=allow_upload,
        max_upload_mb=max_upload_mb,
        allowed_host=allowed_host,
        upload_rate=upload_rate,
        upload_quota_mb=upload_quota_mb,
        interval=interval,
        debug=debug,
        echo=typer.echo,
    )
