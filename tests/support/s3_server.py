"""A real S3-compatible server for tests and benches, and an HTTP proxy in front of it
that can misbehave the way S3 does under load.

* `MotoS3`: moto in server mode (`ThreadedMotoServer`) on 127.0.0.1, on a free port.
  boto3 talks to it over real HTTP, exactly as it would to AWS or MinIO.
* `S3FaultProxy`: forwards HTTP requests to that server, and on demand answers some of
  them itself instead: throttling (503 SlowDown, 429), access denied, or a body cut
  off mid-way. It records the path of every request it sees.
* `aws_test_env()`: environment variables giving boto3 dummy credentials and a region,
  and keeping it away from the host's real AWS configuration and instance metadata.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from moto.server import ThreadedMotoServer

TEST_ACCESS_KEY = "AKIAFILEPIPETEST0000"
TEST_SECRET_KEY = "filepipe-test-secret-never-printed-0123456789"
TEST_REGION = "us-east-1"


def aws_test_env() -> dict[str, str]:
    """Dummy credentials, a region, no shared config files, no instance metadata."""
    return {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": TEST_REGION,
        "AWS_CONFIG_FILE": "/nonexistent/filepipe-test/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/filepipe-test/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class MotoS3:
    """`with MotoS3() as s3:` then `s3.endpoint_url`; buckets with `s3.create_bucket()`."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.port = 0
        self._client: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        # werkzeug logs every request at INFO; the tests' output does not need that.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._server.stop()

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A plain boto3 client on the server, for arranging and inspecting test data
        (one, shared: boto3 clients are thread-safe, and creating one is slow)."""
        import boto3

        if self._client is None:
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=TEST_REGION,
                aws_access_key_id=TEST_ACCESS_KEY,
                aws_secret_access_key=TEST_SECRET_KEY,
            )
        return self._client

    def create_bucket(self, prefix: str = "fp-test") -> str:
        """A new, empty bucket with a unique name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Deletes a bucket and everything in it (frees the server's memory)."""
        c = self.client()
        with contextlib.suppress(Exception):
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    c.delete_objects(Bucket=name, Delete={"Objects": keys})
            c.delete_bucket(Bucket=name)


@dataclass
class Fault:
    """What the proxy answers instead of forwarding: an S3 error, or (cut=True) the real
    response with its body cut off after half of it."""

    status: int = 503
    code: str = "SlowDown"
    message: str = "Please reduce your request rate."
    cut: bool = False


SLOW_DOWN = Fault(503, "SlowDown", "Please reduce your request rate.")
TOO_MANY_REQUESTS = Fault(429, "TooManyRequests", "Too many requests, please slow down.")
ACCESS_DENIED = Fault(403, "AccessDenied", "Access Denied")
CUT_BODY = Fault(cut=True)

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}


class S3FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of `target_port`.

    `fail(fault, times=n)` makes it answer the next n requests (for `methods`) with
    `fault`; `times=None` means every request until `heal()`. `faults_served` counts
    the faults served, `paths` records every request path."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._lock = threading.Lock()
        self._fault: Fault | None = None
        self._remaining: int | None = 0
        self._methods: tuple[str, ...] = ("GET",)
        self.faults_served = 0
        self.forwarded = 0
        self.paths: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="s3-fault-proxy", daemon=True
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fail(self, fault: Fault, times: int | None = None, methods: tuple[str, ...] = ("GET",)) -> None:
        with self._lock:
            self._fault = fault
            self._remaining = times
            self._methods = methods

    def heal(self) -> None:
        with self._lock:
            self._fault = None
            self._remaining = 0

    def _take_fault(self, method: str) -> Fault | None:
        with self._lock:
            if self._fault is None or method not in self._methods:
                return None
            if self._remaining is not None:
                if self._remaining <= 0:
                    return None
                self._remaining -= 1
            self.faults_served += 1
            return self._fault

    # -- one request ----------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        with self._lock:
            self.paths.append((h.command, h.path))
        fault = self._take_fault(h.command)
        if fault is not None and not fault.cut:
            self._send_error(h, fault)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=30)
        try:
            conn.putrequest(h.command, h.path, skip_host=True, skip_accept_encoding=True)
            for name, value in h.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    conn.putheader(name, value)
            conn.endheaders(body or None)
            response = conn.getresponse()
            data = response.read()
            with self._lock:
                self.forwarded += 1
        finally:
            conn.close()
        h.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                h.send_header(name, value)
        declared = response.getheader("Content-Length") if h.command == "HEAD" else None
        h.send_header("Content-Length", declared or str(len(data)))
        if fault is not None:  # a cut body: promise all of it, send half, hang up
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    @staticmethod
    def _send_error(h: BaseHTTPRequestHandler, fault: Fault) -> None:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{fault.code}</Code><Message>{fault.message}</Message>"
            f"<RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
        ).encode()
        h.send_response(fault.status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", "0" if h.command == "HEAD" else str(len(xml)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(xml)


@contextlib.contextmanager
def running_moto() -> Iterator[MotoS3]:
    """A started moto S3 server, stopped on exit."""
    with MotoS3() as server:
        yield server
