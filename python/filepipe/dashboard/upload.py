"""Uploads from the browser: cross-site request protection, and a multipart body
streamed to disk under size limits, then stored and enqueued by the producer.

Cross-site requests are refused three ways: the `Origin` (or `Sec-Fetch-Site`,
or `Referer`) must be this site; the form must carry a token that is an HMAC of
the per-browser cookie under a per-process secret (compared in constant time);
and the cookie is `SameSite=Strict`, so a cross-site form does not even send it.

The body is never buffered: each file part is written to a staging file as it
arrives, the request is refused with 413 as soon as it passes the limit, and the
staging files are removed whatever happens. Only a complete, valid request is
enqueued, all of its files or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio.to_thread
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from ..config import Settings
from ..producer import Producer
from ..storage import Storage, open_storage
from ..storage.local import LocalStorage

if TYPE_CHECKING:
    import redis
    from python_multipart.multipart import MultipartCallbacks

CSRF_COOKIE = "filepipe_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
_COOKIE_VALUE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")
MAX_FIELD_BYTES = 1024
MAX_NAME_CHARS = 255
# Form fields (the token, a few more) allowed beside the files of one upload.
MAX_FORM_FIELDS = 8
# Headers of one part, and bytes of one header line: python-multipart refuses more.
MAX_PART_HEADERS = 8
MAX_PART_HEADER_BYTES = 4096
STAGING_DIR = ".filepipe-incoming"
# A refused body is read on (and discarded) up to this much, so that the browser
# gets the error page rather than a reset connection; past it, the connection closes.
DRAIN_BYTES = 32 << 20


class UploadError(Exception):
    """A refused upload: the HTTP status, a stable reason code and a message for the user."""

    def __init__(self, status: int, reason: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


# -- cross-site request protection -------------------------------------------------


class CsrfGuard:
    """Issues and checks the per-browser token (double submit, signed)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secret or secrets.token_bytes(32)

    def cookie_value(self, request: Request) -> str | None:
        """The browser's token cookie, if it has a well-formed one."""
        value = request.cookies.get(CSRF_COOKIE, "")
        return value if _COOKIE_VALUE.match(value) else None

    @staticmethod
    def new_cookie_value() -> str:
        return secrets.token_urlsafe(32)

    def form_token(self, cookie_value: str) -> str:
        """The token the form must send back for this cookie."""
        return hmac.new(self.secret, cookie_value.encode(), hashlib.sha256).hexdigest()

    def verify(self, request: Request, token: str) -> bool:
        """Whether `token` matches the request's cookie, compared in constant time."""
        cookie = self.cookie_value(request)
        if cookie is None or not token:
            return False
        return hmac.compare_digest(self.form_token(cookie).encode(), token.strip().encode("utf-8", "replace"))


def same_origin(request: Request) -> bool:
    """Whether the browser says the request comes from this site. A request with no
    browser signal at all (curl, a script) passes here and still needs the token."""
    host = request.headers.get("host", "").lower()
    origin = request.headers.get("origin")
    if origin is not None:
        return bool(host) and origin != "null" and urlsplit(origin).netloc.lower() == host
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    referer = request.headers.get("referer")
    if referer:
        return urlsplit(referer).netloc.lower() == host
    return True


# -- how much one client may send ----------------------------------------------------


class ClientBudget:
    """A token bucket per client (its IP address): up to `capacity` units at once,
    refilled at `capacity` per `period` seconds. At most `max_clients` are remembered;
    when more come, those whose bucket is full again are forgotten first."""

    def __init__(
        self, capacity: float, period: float, *, max_clients: int = 10_000, clock: Any = time.monotonic
    ) -> None:
        self.capacity = float(capacity)
        self.rate = self.capacity / period
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (level, at)
        self._lock = threading.Lock()

    def _level(self, client: str, now: float) -> float:
        level, at = self._buckets.get(client, (self.capacity, now))
        return min(self.capacity, level + (now - at) * self.rate)

    def wait(self, client: str, amount: float = 1.0) -> float:
        """Seconds until `client` has `amount` units (0: it has them now)."""
        with self._lock:
            missing = min(amount, self.capacity) - self._level(client, self.clock())
        return max(0.0, missing / self.rate)

    def available(self, client: str) -> float:
        with self._lock:
            return self._level(client, self.clock())

    def spend(self, client: str, amount: float) -> float:
        """Takes `amount` units (the level may go below zero: what was received was
        received) and returns what is left."""
        with self._lock:
            now = self.clock()
            level = self._level(client, now) - amount
            self._buckets[client] = (level, now)
            if len(self._buckets) > self.max_clients:
                self._forget(now)
            return level

    def _forget(self, now: float) -> None:
        for client in [c for c in self._buckets if self._level(c, now) >= self.capacity]:
            del self._buckets[client]
        while len(self._buckets) > self.max_clients:
            oldest = min(self._buckets, key=lambda c: self._buckets[c][1])
            del self._buckets[oldest]


def client_of(request: Request) -> str:
    """The address a request came from (the TCP peer: proxy headers are not trusted)."""
    return request.client.host if request.client is not None else "unknown"


# -- names -------------------------------------------------------------------------


def clean_filename(raw: str) -> str:
    """The user's file name as recorded in the event: the last path component, NFC,
    without control characters (NUL included), at most 255 characters. Where the
    bytes are stored is a separate, fully sanitised key (`storage.safe_key_name`)."""
    # Browsers escape `"` in multipart names as %22 (and CR/LF, removed below).
    name = raw.replace("%22", '"').replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"))
    name = name.strip()
    if name.strip(".") == "":
        name = ""  # "", "." and ".." are not names
    return name[:MAX_NAME_CHARS] or "upload"


# -- the streamed multipart body ------------------------------------------------------


@dataclass
class StagedFile:
    """One received file, on disk in the staging directory."""

    name: str
    path: Path
    size: int = 0
    handle: IO[bytes] | None = field(default=None, repr=False)


@dataclass
class UploadLimits:
    max_request_bytes: int
    max_file_bytes: int
    max_files: int = 1000


class _MultipartReceiver:
    """python-multipart callbacks that write file parts straight to staging files.
    Runs in a worker thread (file writes block), one chunk at a time."""

    def __init__(self, staging: Path, limits: UploadLimits, check_token: Any, token_checked: bool) -> None:
        self.staging = staging
        self.limits = limits
        self.check_token = check_token
        self.token_ok = token_checked
        self.files: list[StagedFile] = []
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._field: str | None = None
        self._field_data = bytearray()
        self._file: StagedFile | None = None
        self._skip = False
        self.parts = 0

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.limits.max_files + MAX_FORM_FIELDS:
            raise UploadError(
                413, "too_many_parts", f"At most {self.limits.max_files} files (and a few fields) per upload."
            )
        self._headers = {}
        self._field = None
        self._field_data = bytearray()
        self._file = None
        self._skip = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            self._field = name
            return
        if not self.token_ok:
            raise UploadError(
                403, "csrf", "The form's security token is missing or expired: reload the page."
            )
        raw_name = options[b"filename"].decode("utf-8", "replace")
        if not raw_name:
            self._skip = True  # a file input with nothing chosen
            return
        if len(self.files) >= self.limits.max_files:
            raise UploadError(413, "too_many_files", f"At most {self.limits.max_files} files per upload.")
        fd, tmp = tempfile.mkstemp(dir=self.staging, prefix="upload-")
        staged = StagedFile(clean_filename(raw_name), Path(tmp), handle=os.fdopen(fd, "wb"))
        self.files.append(staged)
        self._file = staged

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._skip:
            return
        if self._file is not None:
            self._file.size += end - start
            if self._file.size > self.limits.max_file_bytes:
                limit = human_bytes(self.limits.max_file_bytes)
                raise UploadError(
                    413, "file_too_large", f"{self._file.name} is larger than the limit of {limit}."
                )
            assert self._file.handle is not None
            self._file.handle.write(data[start:end])
            return
        if len(self._field_data) + end - start > MAX_FIELD_BYTES:
            raise UploadError(400, "bad_request", "A form field is too long.")
        self._field_data += data[start:end]

    def on_part_end(self) -> None:
        if self._file is not None and self._file.handle is not None:
            self._file.handle.close()
            self._file.handle = None
        elif self._field == CSRF_FIELD and not self.token_ok:
            self.token_ok = bool(self.check_token(self._field_data.decode("utf-8", "replace")))

    def discard(self) -> None:
        """Closes and removes every staging file."""
        for f in self.files:
            if f.handle is not None:
                with contextlib.suppress(OSError):
                    f.handle.close()
                f.handle = None
            f.path.unlink(missing_ok=True)


def human_bytes(n: int) -> str:
    """`1536` -> `1.5 KiB`."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


@dataclass
class Enqueued:
    file_id: str
    filename: str
    size: int


class Uploader:
    """Receives uploads and hands them to the producer, exactly as `filepipe produce`."""

    def __init__(self, settings: Settings, limits: UploadLimits, guard: CsrfGuard) -> None:
        self.settings = settings
        self.limits = limits
        self.guard = guard
        self._storage: Storage | None = None
        self._redis: redis.Redis | None = None
        self._private_staging: Path | None = None

    def open(self) -> None:
        from .. import stream

        self._storage = open_storage(self.settings)
        if isinstance(self._storage, LocalStorage):
            self._storage.ensure_root()
            self.staging_dir().mkdir(parents=True, exist_ok=True)
        else:
            # This process's own directory (mode 0700, a name nobody can guess), not a
            # shared one in /tmp that another user could create first or watch.
            self._private_staging = Path(tempfile.mkdtemp(prefix="filepipe-incoming-"))
        self._redis = stream.connect(self.settings, socket_timeout=10.0)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._storage is not None:
            self._storage.close()
            self._storage = None
        if self._private_staging is not None:
            shutil.rmtree(self._private_staging, ignore_errors=True)
            self._private_staging = None

    def storage_description(self) -> str:
        """Where uploaded files go, for the page (no secrets)."""
        return self._storage.describe() if self._storage is not None else self.settings.storage_mode

    def staging_dir(self) -> Path:
        """Inside the local storage root, so that storing a file is a hard link, not a
        copy; for S3, a private directory this process made in the system's temporary
        directory."""
        if isinstance(self._storage, LocalStorage):
            return self._storage.root / STAGING_DIR
        assert self._private_staging is not None, "Uploader.open() first"
        return self._private_staging

    async def receive(
        self, request: Request, budget: Callable[[int], None] | None = None
    ) -> list[StagedFile]:
        """Checks the request, then streams its files to staging files; `budget` is told
        of every chunk received (and may refuse it). Raises UploadError (the staging
        files already removed) when it is refused."""
        if not same_origin(request):
            raise UploadError(403, "cross_site", "Cross-site upload refused.")
        ctype, options = parse_options_header(request.headers.get("content-type", ""))
        if ctype != b"multipart/form-data" or b"boundary" not in options:
            raise UploadError(415, "bad_request", "Send the files as multipart/form-data.")
        header_token = request.headers.get(CSRF_HEADER)
        token_ok = header_token is not None and self.guard.verify(request, header_token)
        receiver = _MultipartReceiver(
            self.staging_dir(), self.limits, lambda t: self.guard.verify(request, t), token_ok
        )
        parser = MultipartParser(
            options[b"boundary"],
            receiver.callbacks(),
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )
        body = request.stream().__aiter__()
        received = 0
        try:
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.limits.max_request_bytes:
                raise UploadError(
                    413,
                    "too_large",
                    f"The upload is larger than {human_bytes(self.limits.max_request_bytes)}.",
                )
            async for chunk in body:
                received += len(chunk)
                if budget is not None:
                    budget(len(chunk))
                if received > self.limits.max_request_bytes:
                    raise UploadError(
                        413,
                        "too_large",
                        f"The upload is larger than {human_bytes(self.limits.max_request_bytes)}.",
                    )
                await anyio.to_thread.run_sync(parser.write, chunk)
            await anyio.to_thread.run_sync(parser.finalize)
            if not receiver.token_ok:
                raise UploadError(
                    403, "csrf", "The form's security token is missing or expired: reload the page."
                )
        except (UploadError, FormParserError) as e:
            receiver.discard()
            with contextlib.suppress(Exception):
                await _drain(body, DRAIN_BYTES)
            if isinstance(e, FormParserError):
                if str(e).startswith("Maximum header"):
                    raise UploadError(
                        400,
                        "bad_request",
                        f"A part of the upload has more than {MAX_PART_HEADERS} headers, or one longer "
                        f"than {MAX_PART_HEADER_BYTES} bytes.",
                    ) from e
                raise UploadError(400, "bad_request", "The upload is not valid multipart/form-data.") from e
            raise
        except BaseException:
            receiver.discard()
            raise
        if not receiver.files:
            raise UploadError(400, "no_files", "Choose at least one file.")
        return receiver.files

    def enqueue(self, files: list[StagedFile]) -> list[Enqueued]:
        """Stores and enqueues the staged files with the producer (blocking: run it in
        a worker thread), then removes the staging files."""
        assert self._redis is not None and self._storage is not None, "Uploader.open() first"
        producer = Producer(self.settings, storage=self._storage, r=self._redis)
        try:
            out = []
            for f in files:
                file_id = producer.add(f.path, filename=f.name, link=True)
                out.append(Enqueued(file_id, f.name, f.size))
            producer.flush()
            return out
        finally:
            for f in files:
                f.path.unlink(missing_ok=True)


async def _drain(body: AsyncIterator[bytes], cap: int) -> None:
    """Reads and discards what is left of a refused body, up to `cap` bytes."""
    read = 0
    async for chunk in body:
        read += len(chunk)
        if read > cap:
            return
