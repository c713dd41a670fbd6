"""`filepipe dashboard`: the live web page, uploads from the browser, Prometheus metrics.

The web stack is imported only when the command runs, so every other command
starts as fast as before.
"""

from __future__ import annotations

import ipaddress
import signal
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings

from .defaults import DEFAULT_PORT, DEFAULT_UPLOAD_QUOTA_BYTES, DEFAULT_UPLOADS_PER_MINUTE

__all__ = ["DEFAULT_PORT", "DEFAULT_UPLOADS_PER_MINUTE", "DEFAULT_UPLOAD_QUOTA_BYTES", "serve"]


def default_allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """The Host names the app answers besides loopback names and IP addresses: those
    given, and the name it listens on if it is one."""
    names = list(extra)
    if host not in ("0.0.0.0", "::", "") and not _is_ip(host) and host != "localhost":
        names.append(host)
    return names


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    pass


def serve(
    s: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    allow_upload: bool = False,
    max_upload_mb: float = 100.0,
    allowed_host: list[str] | None = None,
    upload_rate: float = DEFAULT_UPLOADS_PER_MINUTE,
    upload_quota_mb: float = DEFAULT_UPLOAD_QUOTA_BYTES / (1024 * 1024),
    interval: float = 1.0,
    debug: bool = False,
    echo: Callable[[str], None] = print,
) -> None:
    """Serves the live dashboard (/dashboard), Prometheus /metrics, /healthz, /readyz,
    and with `allow_upload` an upload page (/upload), until SIGINT/SIGTERM."""
    import logging

    import uvicorn

    from ..config import mask_url
    from ..errors import ConfigError
    from ..observe.export import check_host_names
    from .app import create_app

    log = logging.getLogger("filepipe")
    hosts = check_host_names(default_allowed_hosts(host, allowed_host or []))
    login = (s.dashboard_user, s.dashboard_password) if s.dashboard_password else None
    if not _is_loopback(host):
        if login is None:
            raise ConfigError(
                f"the dashboard on {host} would be open to anyone who can reach it: set "
                "FILEPIPE_DASHBOARD_PASSWORD (and FILEPIPE_DASHBOARD_USER, default filepipe) "
                "to require a login, or listen on 127.0.0.1"
            )
        log.warning(
            "listening on %s: reachable from other machines, behind a login (basic authentication "
            "sends the password as it is: serve it through TLS or on a private network)",
            host,
        )
    web = create_app(
        s,
        allow_upload=allow_upload,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        allowed_hosts=hosts,
        interval=interval,
        login=login,
        uploads_per_minute=upload_rate,
        upload_quota_bytes=int(upload_quota_mb * 1024 * 1024),
    )
    shown = f"[{host}]" if ":" in host else host
    echo(
        f"Dashboard on http://{shown}:{port}/dashboard — {s.stream} → {s.table} "
        f"(Redis {mask_url(s.redis_url)}, PostgreSQL {mask_url(s.pg_uri)})"
    )
    if allow_upload:
        echo(f"Uploads enabled on http://{shown}:{port}/upload")
    config = uvicorn.Config(
        web,
        host=host,
        port=port,
        log_level="debug" if debug else "warning",
        # uvicorn's messages go through filepipe's handler: escaped and scrubbed.
        log_config=None,
        access_log=debug,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again
    # against the handlers it found; these ignore it, so that a requested stop exits
    # 0, as `filepipe consume` does.
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise ConfigError(f"the dashboard could not start on {host}:{port} (see the messages above)")
