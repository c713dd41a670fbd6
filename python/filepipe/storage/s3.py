"""Files in an S3 bucket (AWS or any S3-compatible server), under an optional prefix.

Credentials come from boto3's standard chain (environment, shared config and
credentials files, SSO, container or instance role); filepipe never takes them as
settings and never prints them. One boto3 client is shared by every thread: boto3
clients are thread-safe, and sharing one shares its connection pool (sized to the
concurrency) and its adaptive retry rate limiter, so throttling seen by one read
slows all of them down.

Confinement: every object read or written is `<prefix><key>` in the configured
bucket. A key that could name anything else once an HTTP client or server
normalises the path (absolute, a `.` or `..` segment) is refused before any request.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from .. import _native
from ..config import Settings, mask_url
from ..errors import ConfigError, StorageError
from ..redaction import error_line
from .base import Storage, key_problem

CHUNK = 256 * 1024
MAX_KEY_BYTES = 1024  # S3's limit on an object key, in UTF-8 bytes
MIB = 1024 * 1024

# Error codes that mean the bucket or the credentials are wrong, not one object:
# failing every file of the stream for them would dead-letter it all, so the
# whole measurement fails and the consumer waits (and says so) until it is fixed.
_STORAGE_CODES = {
    "NoSuchBucket": "the bucket does not exist",
    "InvalidAccessKeyId": "the access key is not known to the server",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "TokenRefreshRequired": "the session token must be refreshed",
    "AuthorizationHeaderMalformed": "the request was signed for another region",
    "PermanentRedirect": "the bucket is in another region or needs another endpoint",
}
_MISSING_CODES = ("NoSuchKey", "NotFound", "404")
# Passing conditions: boto3 has already retried them (adaptive mode); what is left
# is reported as a transient failure, so the batch is retried, never dead-lettered.
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_STREAM_ERRORS = (
    ResponseStreamingError,
    IncompleteReadError,
    ReadTimeoutError,
    BotoConnectionError,
    ConnectionError,
    TimeoutError,
)


def normalize_prefix(prefix: str) -> str:
    """`S3_PREFIX` as a folder: no leading `/`, exactly one trailing `/` (or empty).
    Raises ConfigError if it contains a `.` or `..` segment."""
    p = prefix.strip().lstrip("/")
    if not p:
        return ""
    if any(part in (".", "..") for part in p.replace("\\", "/").split("/")):
        raise ConfigError(f"S3_PREFIX must not contain '.' or '..' segments, not {prefix!r}")
    return p.rstrip("/") + "/"


class _Failure(Exception):
    """One object that cannot be measured."""

    def __init__(self, reason: str, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.transient = transient


class S3Storage(Storage):
    """A bucket, and a prefix inside it under which every key lives."""

    name = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_concurrency: int = 16,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int | None = None,
        multipart_threshold: int = 8 * MIB,
        multipart_chunksize: int = 8 * MIB,
    ) -> None:
        """`max_attempts` is the total number of tries of one request (boto3's
        adaptive retry mode); None leaves it to the AWS configuration
        (`AWS_MAX_ATTEMPTS`, default 3)."""
        if not bucket:
            raise ConfigError("S3 storage needs a bucket: set S3_BUCKET")
        if not 1 <= max_concurrency <= 256:
            raise ConfigError(f"S3_MAX_CONCURRENCY must be between 1 and 256, not {max_concurrency}")
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.endpoint_url = endpoint_url or None
        self.region = region
        self.max_concurrency = max_concurrency
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
        )
        self._lock = threading.Lock()
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        if not settings.s3_bucket:
            # Reached when an entry names storage 's3' on a consumer set up for local files only.
            raise ConfigError("an entry names storage 's3' but S3_BUCKET is not set")
        return cls(
            settings.s3_bucket,
            settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url or None,
            max_concurrency=settings.s3_max_concurrency,
            connect_timeout=settings.connect_timeout_s,
        )

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"S3 {where} at {mask_url(self.endpoint_url)}" if self.endpoint_url else f"S3 {where}"

    def object_key(self, key: str) -> str:
        """The object key of an event's `key`: the prefix, then the key."""
        return self.prefix + key

    # -- the client --------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The shared boto3 S3 client, created on first use."""
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        retries: dict[str, Any] = {"mode": "adaptive"}
        if self.max_attempts is not None:
            retries["total_max_attempts"] = self.max_attempts
        config = Config(
            retries=retries,
            # Uploads and measurement each use up to max_concurrency connections.
            max_pool_connections=self.max_concurrency,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            user_agent_extra="filepipe",
        )
        try:
            # A session per storage: boto3's default session is not thread-safe to create clients from.
            session = boto3.session.Session()
            return session.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
            )
        except (BotoCoreError, ValueError) as e:
            raise StorageError(f"cannot set up the S3 client for {self.describe()}: {error_line(e)}") from e

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="filepipe-s3")
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            client, self._client = self._client, None
        if pool is not None:
            pool.shutdown(wait=True)
        if client is not None:
            client.close()

    # -- writing ---------------------------------------------------------------------------

    def put_file(self, src: Path, key: str) -> None:
        """Uploads `src` as `<prefix><key>`: one PUT for small files, a multipart upload
        (parts sent concurrently) above the multipart threshold."""
        problem = key_problem(key)
        if problem is not None:
            raise StorageError(f"cannot store {src} as '{key}' in {self.describe()}: the key {problem[1]}")
        target = self.object_key(key)
        try:
            self.client.upload_file(str(src), self.bucket, target, Config=self.transfer_config)
        except (S3UploadFailedError, ClientError, BotoCoreError, OSError) as e:
            raise StorageError(
                f"cannot store {src} as '{key}' in {self.describe()}: {_describe_error(e)}"
            ) from e

    def remove(self, key: str) -> None:
        """Deletes the object `<prefix><key>`."""
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except (ClientError, BotoCoreError, OSError) as e:
            raise StorageError(f"cannot delete '{key}' from {self.describe()}: {_describe_error(e)}") from e

    # -- measuring -------------------------------------------------------------------------

    def measure(
        self, batch: _native.EntryBatch, indices: list[int], into: _native.Measurements, max_bytes: int
    ) -> None:
        """Streams each object through SHA-256 on the shared thread pool, at most
        `max_concurrency` at a time. Per-object problems become failures in `into`
        (transient ones make the consumer retry the batch); a problem with the
        bucket or the credentials raises StorageError."""
        if not indices:
            return
        records = batch.records()
        client = self.client
        # Once S3 reports a passing problem (or the storage itself fails), the batch will be
        # measured again: the objects not started yet are not fetched now.
        give_up = threading.Event()
        fatal: list[StorageError] = []

        def run(i: int) -> None:
            record = records[i]
            key = str(record["key"])
            if give_up.is_set():
                into.fail(i, "unreadable", f"object '{key}' was not read: S3 failed on this batch", True)
                return
            try:
                size, digest, content_type = self._measure_one(
                    client, key, max_bytes, sniff=record.get("content_type") is None
                )
            except _Failure as f:
                if f.transient:
                    give_up.set()
                into.fail(i, f.reason, f.message, f.transient)
                return
            except StorageError as e:
                give_up.set()
                fatal.append(e)
                return
            into.set(i, size, digest, content_type)

        if len(indices) == 1:
            run(indices[0])
        else:
            pool = self._executor()
            futures: list[Future[None]] = [pool.submit(run, i) for i in indices]
            wait(futures)  # all of them, even if one raised: none may write into `into` later
            for f in futures:
                f.result()
        if fatal:
            raise fatal[0]

    def _measure_one(
        self, client: Any, key: str, max_bytes: int, *, sniff: bool
    ) -> tuple[int, bytes, str | None]:
        problem = key_problem(key)
        if problem is not None:
            raise _Failure(problem[0], f"object key '{key}' {problem[1]}")
        target = self.object_key(key)
        if len(target.encode()) > MAX_KEY_BYTES:
            raise _Failure("too_long", f"object key '{target}' is longer than S3's {MAX_KEY_BYTES} bytes")
        try:
            response = client.get_object(Bucket=self.bucket, Key=target)
        except ClientError as e:
            raise self._client_failure(e, key) from e
        except (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError) as e:
            raise StorageError(
                f"no usable AWS credentials to read '{key}' from {self.describe()}: "
                "set them in the environment, the shared credentials file or an instance role"
            ) from e
        except (BotoConnectionError, ReadTimeoutError) as e:
            raise _Failure(
                "unreadable", f"object '{target}' could not be fetched for now: {error_line(e)}", True
            ) from e
        except BotoCoreError as e:
            raise _Failure("unreadable", f"object '{target}' could not be fetched: {error_line(e)}") from e
        body = response["Body"]
        try:
            length = response.get("ContentLength")
            if isinstance(length, int) and length > max_bytes:
                raise _too_large(target, length, max_bytes)
            hasher = hashlib.sha256()
            head = b""
            total = 0
            while True:
                chunk = body.read(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise _too_large(target, total, max_bytes)
                if len(head) < _native.SNIFF_BYTES:
                    head += chunk[: _native.SNIFF_BYTES - len(head)]
                hasher.update(chunk)
        except _STREAM_ERRORS as e:
            raise _Failure(
                "unreadable", f"object '{target}' was cut off while reading, for now: {error_line(e)}", True
            ) from e
        except BotoCoreError as e:
            # e.g. a checksum that does not match what was read
            raise _Failure("unreadable", f"object '{target}' could not be read: {error_line(e)}") from e
        finally:
            body.close()
        # Sniffed, as for local files: the object's Content-Type is only what the uploader
        # claimed (boto3's upload_file stores binary/octet-stream unless told otherwise).
        content_type = _native.sniff_content_type(head) if sniff else None
        return total, hasher.digest(), content_type

    def _client_failure(self, e: ClientError, key: str) -> Exception:
        code, status = _error_code(e)
        target = self.object_key(key)
        if code in _STORAGE_CODES:
            return StorageError(
                f"S3 refused to read '{key}' from {self.describe()}: {_STORAGE_CODES[code]} ({code})"
            )
        if code in _MISSING_CODES or (status == 404 and code != "NoSuchBucket"):
            return _Failure("missing", f"object '{target}' does not exist in bucket {self.bucket}")
        if code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return _Failure(
                "unreadable", f"S3 is failing to serve '{target}' for now: {code or status}", True
            )
        if status == 403:
            return _Failure("unreadable", f"access to object '{target}' is denied ({code or status})")
        return _Failure("unreadable", f"object '{target}' cannot be read: {code or status}")


def _error_code(e: ClientError) -> tuple[str, int]:
    error = e.response.get("Error", {})
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def _describe_error(e: BaseException) -> str:
    """One line about a boto3 error. Only the error code of a server's answer is shown,
    never its message: some servers echo the access key id or the string they signed."""
    if isinstance(e, S3UploadFailedError):
        # boto3 flattens the ClientError into this one's text; the original is its context.
        inner = e.__cause__ or e.__context__
        if isinstance(inner, (ClientError, BotoCoreError, OSError)):
            return _describe_error(inner)
        return "the upload failed"
    if isinstance(e, ClientError):
        code, status = _error_code(e)
        return _STORAGE_CODES.get(code, f"S3 answered {code or 'HTTP'} {status}".rstrip())
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return error_line(e)


def _too_large(target: str, size: int, max_bytes: int) -> _Failure:
    return _Failure(
        "too_large", f"object '{target}' is {size} bytes, more than the limit of {max_bytes} (MAX_FILE_BYTES)"
    )
