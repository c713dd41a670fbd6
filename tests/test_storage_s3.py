"""S3 storage against a real S3-compatible server: boto3 over HTTP to moto in server
mode, with a fault proxy in front of it for throttling, denied and cut-off responses."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import Env
from tests.support.s3_server import (
    ACCESS_DENIED,
    CUT_BODY,
    SLOW_DOWN,
    TEST_ACCESS_KEY,
    TEST_SECRET_KEY,
    TOO_MANY_REQUESTS,
    Fault,
    MotoS3,
    S3FaultProxy,
    aws_test_env,
)

from filepipe import _native
from filepipe.config import load_settings
from filepipe.consumer import Consumer
from filepipe.errors import ConfigError, StorageError
from filepipe.producer import Producer
from filepipe.storage import key_problem, open_storage
from filepipe.storage.s3 import S3Storage, normalize_prefix

MIB = 1024 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in aws_test_env().items():
            mp.setenv(name, value)
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_MAX_ATTEMPTS",
            "AWS_RETRY_MODE",
            "AWS_ENDPOINT_URL",
        ):
            mp.delenv(name, raising=False)
        with MotoS3() as server:
            yield server


@pytest.fixture
def bucket(s3: MotoS3) -> Iterator[str]:
    name = s3.create_bucket()
    yield name
    s3.delete_bucket(name)


@pytest.fixture
def proxy(s3: MotoS3) -> Iterator[S3FaultProxy]:
    with S3FaultProxy(s3.port) as p:
        yield p


@pytest.fixture
def storage(s3: MotoS3, bucket: str) -> Iterator[S3Storage]:
    st = S3Storage(bucket, "tenant", endpoint_url=s3.endpoint_url, max_concurrency=4)
    yield st
    st.close()


def put_object(s3: MotoS3, bucket: str, key: str, data: bytes) -> None:
    s3.client().put_object(Bucket=bucket, Key=key, Body=data)


def batch_of(*keys: str, content_type: str | None = None) -> _native.EntryBatch:
    entries = []
    for n, key in enumerate(keys, start=1):
        fields = {
            "file_id": str(uuid.uuid4()),
            "filename": key.rsplit("/", 1)[-1] or "f",
            "key": key,
            "storage": "s3",
        }
        if content_type:
            fields["content_type"] = content_type
        entries.append((f"1700000000000-{n}", fields))
    batch = _native.parse_entries(entries)
    assert batch.rejects == [], batch.rejects
    return batch


def measure(st: S3Storage, batch: _native.EntryBatch, max_bytes: int = 1 << 40) -> _native.Measurements:
    m = _native.Measurements(len(batch))
    st.measure(batch, list(range(len(batch))), m, max_bytes)
    return m


def failures(m: _native.Measurements) -> dict[int, tuple[str, bool]]:
    return {i: (reason, transient) for i, reason, _msg, transient in m.failures()}


# -- keys and settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "unsafe_key"),
        ("/etc/passwd", "unsafe_key"),
        ("\\etc\\passwd", "unsafe_key"),
        ("../other-bucket/x", "unsafe_key"),
        ("a/../../x", "unsafe_key"),
        ("a\\..\\..\\x", "unsafe_key"),
        ("./x", "unsafe_key"),
        ("a/./x", "unsafe_key"),
        ("a/..", "unsafe_key"),
        ("a\x00b", "nul_byte"),
        ("folder/", "not_a_file"),
    ],
)
def test_key_problems(key: str, reason: str) -> None:
    problem = key_problem(key)
    assert problem is not None and problem[0] == reason


@pytest.mark.parametrize(
    "key", ["a", "2024/05/01/id/report.pdf", "a..b/c..", ".hidden/x", "%2e%2e/x", "a//b", "é/ü"]
)
def test_keys_that_are_fine(key: str) -> None:
    assert key_problem(key) is None


@pytest.mark.parametrize(
    ("given", "normal"),
    [("", ""), ("/", ""), ("tenant", "tenant/"), ("tenant/", "tenant/"), ("/a/b//", "a/b/"), (" x ", "x/")],
)
def test_prefix_is_a_folder(given: str, normal: str) -> None:
    assert normalize_prefix(given) == normal


@pytest.mark.parametrize("prefix", ["a/../b", "..", "./a", "a/."])
def test_prefix_cannot_climb(prefix: str) -> None:
    with pytest.raises(ConfigError, match="S3_PREFIX"):
        normalize_prefix(prefix)


def test_from_settings(s3: MotoS3) -> None:
    settings = load_settings(
        {
            "storage_mode": "s3",
            "s3_bucket": "b",
            "s3_prefix": "up",
            "s3_endpoint_url": "http://u:pw@127.0.0.1:9",
        },
        environ={"S3_MAX_CONCURRENCY": "7"},
        dotenv_path=None,
    )
    st = open_storage(settings)
    assert isinstance(st, S3Storage)
    assert (st.bucket, st.prefix, st.max_concurrency) == ("b", "up/", 7)
    assert st.object_key("x/y") == "up/x/y"
    assert "pw" not in st.describe() and "s3://b/up/" in st.describe()
    config = st.client.meta.config
    assert config.retries["mode"] == "adaptive"
    assert config.max_pool_connections == 7
    st.close()
    with pytest.raises(ConfigError, match="S3_MAX_CONCURRENCY"):
        load_settings({"s3_max_concurrency": 0}, environ={}, dotenv_path=None)
    # A consumer set up for local files that meets an entry naming S3 says what is missing.
    with pytest.raises(ConfigError, match="S3_BUCKET"):
        open_storage(load_settings({}, environ={}, dotenv_path=None), "s3")


# -- storing and measuring ------------------------------------------------------------------


def test_put_and_measure(storage: S3Storage, s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    contents = {
        "docs/hello.txt": b"hello\n",
        "img/pic.png": PNG,
        "empty": b"",
        "data.json": b'{"a": 1}',
        "blob.bin": bytes(range(256)) * 40,
        "name with spaces & ünïcode?.txt": b"odd names are fine\n",
    }
    for key, data in contents.items():
        src = tmp_path / "src"
        src.write_bytes(data)
        storage.put_file(src, key)
    c = s3.client()
    stored = {o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]}
    assert stored == {"tenant/" + k for k in contents}

    m = measure(storage, batch_of(*contents))
    assert m.failures() == []
    expected_types = [
        "text/plain",
        "image/png",
        "application/x-empty",
        "application/json",
        "application/octet-stream",
        "text/plain",
    ]
    for i, (data, ctype) in enumerate(zip(contents.values(), expected_types, strict=True)):
        assert m.get(i) == (len(data), hashlib.sha256(data).digest(), ctype)


def test_declared_content_type_is_not_sniffed(storage: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(PNG)
    storage.put_file(src, "f")
    m = measure(storage, batch_of("f", content_type="image/x-custom"))
    assert m.get(0) == (len(PNG), hashlib.sha256(PNG).digest(), None)


def test_multipart_upload_of_a_large_file(s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    st = S3Storage(
        bucket,
        "big",
        endpoint_url=s3.endpoint_url,
        multipart_threshold=5 * MIB,
        multipart_chunksize=5 * MIB,
        max_concurrency=3,
    )
    src = tmp_path / "large.bin"
    data = os.urandom(11 * MIB + 123)
    src.write_bytes(data)
    st.put_file(src, "large.bin")
    c = s3.client()
    head = c.head_object(Bucket=bucket, Key="big/large.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload, in three parts
    m = measure(st, batch_of("large.bin"))
    assert m.get(0) == (len(data), hashlib.sha256(data).digest(), "application/octet-stream")
    st.close()


def test_many_objects_concurrently(s3: MotoS3, bucket: str) -> None:
    blobs = {f"many/{i:03}.txt": f"file {i}\n".encode() * (i + 1) for i in range(40)}
    for key, data in blobs.items():
        put_object(s3, bucket, "p/" + key, data)
    st = S3Storage(bucket, "p", endpoint_url=s3.endpoint_url, max_concurrency=8)
    m = measure(st, batch_of(*blobs))
    assert m.failures() == []
    for i, data in enumerate(blobs.values()):
        assert m.get(i) == (len(data), hashlib.sha256(data).digest(), "text/plain")
    st.close()


def test_only_the_given_indices_are_measured(storage: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    storage.put_file(src, "f")
    m = _native.Measurements(3)
    storage.measure(batch_of("f", "nope", "f"), [0, 2], m, 100)
    assert m.measured() == [0, 2] and m.failures() == []


def test_missing_object_is_permanent(storage: S3Storage) -> None:
    m = measure(storage, batch_of("no/such/key"))
    ((_i, reason, message, transient),) = m.failures()
    assert (reason, transient) == ("missing", False)
    assert "tenant/no/such/key" in message


def test_too_large(storage: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"0123456789")
    storage.put_file(src, "ten")
    assert failures(measure(storage, batch_of("ten"), max_bytes=9)) == {0: ("too_large", False)}
    assert measure(storage, batch_of("ten"), max_bytes=10).measured() == [0]


def test_keys_never_leave_the_prefix(s3: MotoS3, bucket: str, proxy: S3FaultProxy) -> None:
    secret = b"canary outside the prefix"
    put_object(s3, bucket, "secret.txt", secret)
    put_object(s3, bucket, "other/secret.txt", secret)
    put_object(s3, bucket, "tenant/ok.txt", b"ok")
    other = s3.create_bucket("fp-other")
    put_object(s3, other, "secret.txt", secret)

    # The entry parser refuses climbing and absolute keys before any storage sees them.
    hostile = [
        "../secret.txt",
        f"../../{other}/secret.txt",
        "/secret.txt",
        "\\secret.txt",
        "a\\..\\..\\secret.txt",
    ]
    for n, key in enumerate(hostile):
        fields = {"file_id": str(uuid.uuid4()), "filename": "x", "key": key, "storage": "s3"}
        b = _native.parse_entries([(f"1-{n}", fields)])
        assert [r[2] for r in b.rejects] == ["unsafe_key"], key

    # What the parser lets through, the S3 storage confines itself.
    st = S3Storage(bucket, "tenant", endpoint_url=proxy.endpoint_url)
    keys = [
        "ok.txt",
        "./secret.txt",
        "other/./secret.txt",
        "%2e%2e/secret.txt",
        "..%2fsecret.txt",
        "%2E%2E%2Fsecret.txt",
        "ok.txt?x-id=GetObject&key=secret.txt",
        "ok.txt#fragment",
    ]
    m = measure(st, batch_of(*keys))
    st.close()
    assert m.measured() == [0]
    assert failures(m) == {
        1: ("unsafe_key", False),
        2: ("unsafe_key", False),
        3: ("missing", False),
        4: ("missing", False),
        5: ("missing", False),
        6: ("missing", False),
        7: ("missing", False),
    }
    # Every request went to the configured bucket, under the prefix; none was for a refused key.
    assert proxy.paths, "no request reached the server"
    for method, path in proxy.paths:
        assert method == "GET" and path.startswith(f"/{bucket}/tenant/"), path
    assert len(proxy.paths) == 6
    canary = hashlib.sha256(secret).digest()
    assert all(m.get(i) is None or m.get(i)[1] != canary for i in range(len(keys)))  # type: ignore[index]
    s3.delete_bucket(other)


# -- S3 failing -----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [SLOW_DOWN, TOO_MANY_REQUESTS], ids=["503-slowdown", "429"])
def test_throttling_is_retried(s3: MotoS3, bucket: str, proxy: S3FaultProxy, fault: Fault) -> None:
    put_object(s3, bucket, "t/a.txt", b"throttled but fine\n")
    st = S3Storage(bucket, "t", endpoint_url=proxy.endpoint_url, max_attempts=4)
    proxy.fail(fault, times=2)
    m = measure(st, batch_of("a.txt"))
    st.close()
    assert m.failures() == []
    assert m.get(0) == (19, hashlib.sha256(b"throttled but fine\n").digest(), "text/plain")
    assert proxy.faults_served == 2 and proxy.forwarded == 1


def test_persistent_throttling_is_transient(s3: MotoS3, bucket: str, proxy: S3FaultProxy) -> None:
    for i in range(6):
        put_object(s3, bucket, f"t/{i}", b"x")
    st = S3Storage(bucket, "t", endpoint_url=proxy.endpoint_url, max_attempts=2, max_concurrency=2)
    proxy.fail(SLOW_DOWN)
    started = time.monotonic()
    m = measure(st, batch_of(*(str(i) for i in range(6))))
    st.close()
    assert m.measured() == []
    assert set(failures(m).values()) == {("unreadable", True)}
    # Once S3 said "slow down", the objects not started yet were not requested at all.
    assert proxy.faults_served < 6 * 2
    assert time.monotonic() - started < 30


def test_server_error_is_transient(s3: MotoS3, bucket: str, proxy: S3FaultProxy) -> None:
    put_object(s3, bucket, "t/a", b"x")
    st = S3Storage(bucket, "t", endpoint_url=proxy.endpoint_url, max_attempts=1)
    proxy.fail(Fault(500, "InternalError", "We encountered an internal error."))
    assert failures(measure(st, batch_of("a"))) == {0: ("unreadable", True)}
    st.close()


def test_access_denied_is_permanent(s3: MotoS3, bucket: str, proxy: S3FaultProxy) -> None:
    put_object(s3, bucket, "t/a", b"x")
    st = S3Storage(bucket, "t", endpoint_url=proxy.endpoint_url, max_attempts=3)
    proxy.fail(ACCESS_DENIED)
    m = measure(st, batch_of("a"))
    st.close()
    ((_i, reason, message, transient),) = m.failures()
    assert (reason, transient) == ("unreadable", False)
    assert "denied" in message and "t/a" in message
    assert proxy.faults_served == 1  # a 403 is not retried


def test_body_cut_off_is_transient(s3: MotoS3, bucket: str, proxy: S3FaultProxy) -> None:
    data = os.urandom(600_000)
    put_object(s3, bucket, "t/a", data)
    st = S3Storage(bucket, "t", endpoint_url=proxy.endpoint_url)
    proxy.fail(CUT_BODY, times=1)
    assert failures(measure(st, batch_of("a"))) == {0: ("unreadable", True)}
    assert measure(st, batch_of("a")).get(0) == (
        len(data),
        hashlib.sha256(data).digest(),
        "application/octet-stream",
    )
    st.close()


def test_unreachable_endpoint_is_transient() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    st = S3Storage("b", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1, connect_timeout=1)
    assert failures(measure(st, batch_of("a", "b"))) == {0: ("unreadable", True), 1: ("unreadable", True)}
    st.close()


def test_missing_bucket_fails_the_storage_not_the_files(s3: MotoS3) -> None:
    st = S3Storage("fp-no-such-bucket", endpoint_url=s3.endpoint_url)
    with pytest.raises(StorageError, match=r"'[ab]'.*bucket does not exist"):
        measure(st, batch_of("a", "b"))
    st.close()


def test_missing_credentials(s3: MotoS3, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    st = S3Storage(bucket, endpoint_url=s3.endpoint_url)
    with pytest.raises(StorageError, match="no usable AWS credentials"):
        measure(st, batch_of("a"))
    st.close()


def test_credentials_never_in_messages_or_logs(
    s3: MotoS3, bucket: str, proxy: S3FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="filepipe")
    st = S3Storage(bucket, "t", endpoint_url=proxy.endpoint_url, max_attempts=1)
    seen: list[str] = [st.describe()]
    for fault in (
        SLOW_DOWN,
        ACCESS_DENIED,
        Fault(403, "SignatureDoesNotMatch", "The signature does not match"),
    ):
        proxy.fail(fault)
        try:
            seen += [f[2] for f in measure(st, batch_of("a")).failures()]
        except StorageError as e:
            seen.append(str(e))
    proxy.fail(
        Fault(403, "InvalidAccessKeyId", f"The key {TEST_ACCESS_KEY} does not exist"), methods=("PUT",)
    )
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StorageError) as e:
        st.put_file(src, "f")
    seen.append(str(e.value))
    st.close()
    assert any("secret key does not match" in s for s in seen)
    assert "access key is not known" in seen[-1] and "'f'" in seen[-1]
    for text in [*seen, caplog.text]:
        assert TEST_SECRET_KEY not in text and TEST_ACCESS_KEY not in text


def test_put_file_errors_name_the_key(s3: MotoS3, storage: S3Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="'a/b'"):
        storage.put_file(tmp_path / "does-not-exist", "a/b")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StorageError, match=r"'\.\./x'.*'\.' or '\.\.'"):
        storage.put_file(src, "../x")
    nobucket = S3Storage("fp-no-such-bucket", endpoint_url=s3.endpoint_url)
    with pytest.raises(StorageError, match="'k'"):
        nobucket.put_file(src, "k")
    nobucket.close()


# -- through the pipeline --------------------------------------------------------------------


def s3_settings(env: Env, s3: MotoS3 | S3FaultProxy, bucket: str, **more: Any) -> Any:
    return env.settings_with(s3_bucket=bucket, s3_prefix="uploads/", s3_endpoint_url=s3.endpoint_url, **more)


def test_produce_to_s3_then_consume(env: Env, s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    files = {
        "a.txt": b"alpha\n",
        "sub/b.png": PNG,
        "sub/empty": b"",
        "big.bin": os.urandom(9 * MIB),  # above the 8 MiB multipart threshold
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    settings = s3_settings(env, s3, bucket, storage_mode="s3")
    producer = Producer(settings)
    assert producer.produce([src]) == len(files)
    producer.close()

    stats = env.drain(**settings.__dict__)
    assert stats.inserted == len(files) and stats.dead_lettered == 0
    assert env.dead() == [] and env.pending() == 0
    rows = env.sql(
        f"SELECT filename, storage, storage_key, size_bytes, checksum_sha256, content_type "
        f"FROM {env.settings.table}"
    )
    by_name = {r[0]: r for r in rows}
    c = s3.client()
    for path, data in files.items():
        name = path.rsplit("/", 1)[-1]
        _, storage, key, size, checksum, _ctype = by_name[name]
        assert (storage, size, checksum) == ("s3", len(data), hashlib.sha256(data).hexdigest())
        assert c.head_object(Bucket=bucket, Key="uploads/" + key)["ContentLength"] == len(data)
    assert by_name["b.png"][5] == "image/png" and by_name["a.txt"][5] == "text/plain"


def test_consumer_reads_the_storage_each_entry_names(env: Env, s3: MotoS3, bucket: str) -> None:
    put_object(s3, bucket, "uploads/remote.txt", b"in the bucket\n")
    put_object(s3, bucket, "uploads/huge.bin", b"z" * 5000)
    put_object(s3, bucket, "secret.txt", b"outside the prefix")
    env.write_file("local.txt", b"on disk\n")

    def event(key: str, storage: str | None) -> None:
        fields = {"file_id": str(uuid.uuid4()), "filename": key.rsplit("/", 1)[-1], "key": key}
        if storage:
            fields["storage"] = storage
        env.xadd(fields)

    event("remote.txt", "s3")
    event("local.txt", None)  # the consumer's default, STORAGE_MODE=local
    event("remote.txt", "local")  # not on disk
    event("gone.txt", "s3")
    event("huge.bin", "s3")
    event("./secret.txt", "s3")
    event("../secret.txt", "s3")
    stats = env.drain(**s3_settings(env, s3, bucket, storage_mode="local", max_file_bytes=4096).__dict__)
    assert stats.inserted == 2
    rows = sorted(env.sql(f"SELECT storage, storage_key, checksum_sha256 FROM {env.settings.table}"))
    assert rows == [
        ("local", "local.txt", hashlib.sha256(b"on disk\n").hexdigest()),
        ("s3", "remote.txt", hashlib.sha256(b"in the bucket\n").hexdigest()),
    ]
    reasons = sorted((f[b"key"].decode(), f[b"reason"].decode()) for _id, f in env.dead())
    assert reasons == [
        ("../secret.txt", "unsafe_key"),
        ("./secret.txt", "unsafe_key"),
        ("gone.txt", "missing"),
        ("huge.bin", "too_large"),
        ("remote.txt", "missing"),
    ]
    assert env.pending() == 0


def test_consumer_waits_out_persistent_throttling(
    env: Env, s3: MotoS3, bucket: str, proxy: S3FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    put_object(s3, bucket, "uploads/a.txt", b"patience\n")
    env.xadd({"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt", "storage": "s3"})
    proxy.fail(SLOW_DOWN)
    consumer = Consumer(s3_settings(env, proxy, bucket), drain=True, write=None)
    done = threading.Event()
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(consumer.run())
        except BaseException as e:
            result.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while proxy.faults_served < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    # S3 keeps throttling: the batch is retried, never dead-lettered, never acknowledged.
    assert proxy.faults_served >= 4 and not done.is_set()
    assert "SlowDown" in consumer.stats.last_error
    assert env.dead() == [] and env.rows() == 0 and env.pending() == 1
    proxy.heal()
    assert done.wait(60)
    thread.join()
    assert not isinstance(result[0], BaseException), result[0]
    assert env.rows() == 1 and env.dead() == [] and env.pending() == 0
    assert env.sql(f"SELECT checksum_sha256 FROM {env.settings.table}") == [
        (hashlib.sha256(b"patience\n").hexdigest(),)
    ]


def test_cli_produce_to_s3_then_consume(env: Env, s3: MotoS3, bucket: str, tmp_path: Path) -> None:
    """`filepipe produce` and `filepipe consume --drain` as a user runs them, in subprocesses,
    S3 configured by the environment; the credentials come from boto3's chain only."""
    src = tmp_path / "in"
    src.mkdir()
    files = {f"doc{i}.txt": f"document {i}\n".encode() * (i + 1) for i in range(5)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    s = env.settings
    cli_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FILEPIPE_", "REDIS", "PG_", "CONSUMER", "S3_"))
    }
    cli_env.update(
        {
            "REDIS_URL": s.redis_url,
            "PG_URI": s.pg_uri,
            "STREAM_NAME": s.stream,
            "FILEPIPE_TABLE": s.table,
            "CONSUMER_BLOCK_MS": "100",
            "STORAGE_MODE": "s3",
            "S3_BUCKET": bucket,
            "S3_PREFIX": "cli",
            "S3_ENDPOINT_URL": s3.endpoint_url,
            "S3_MAX_CONCURRENCY": "4",
        }
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "filepipe", *args],
            env=cli_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    produced = run("produce", str(src))
    assert produced.returncode == 0, produced.stderr
    assert "Enqueued 5 events" in produced.stdout and f"s3://{bucket}/cli/" in produced.stdout
    consumed = run("consume", "--drain")
    assert consumed.returncode == 0, consumed.stderr
    rows = env.sql(f"SELECT filename, storage, size_bytes, checksum_sha256 FROM {s.table}")
    assert sorted(rows) == sorted((n, "s3", len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items())
    for text in (produced.stdout, produced.stderr, consumed.stdout, consumed.stderr):
        assert TEST_SECRET_KEY not in text


def test_entry_naming_s3_on_a_consumer_without_s3_is_dead_lettered(env: Env, tmp_path: Path) -> None:
    """An entry naming a storage this consumer cannot serve is that entry's problem: it is
    dead-lettered (`bad_storage`, naming the storage and why) and everything else loads.
    Under the supervisor too, which must not take it for a configuration error of its
    own and stop every worker (nor would every host that reclaimed the entry stop)."""
    from tests.support.workload import consumer_env

    env.write_file("a.txt", b"a")

    def event(name: str, **more: str) -> bytes:
        return env.xadd({"file_id": str(uuid.uuid4()), "filename": name, "key": name, **more})

    good = [event("a.txt") for _ in range(30)]
    remote = [event("b.txt", storage="s3") for _ in range(3)]
    run = subprocess.run(
        [sys.executable, "-m", "filepipe", "consume", "--processes", "2", "--drain", "-q"],
        env=consumer_env(env.settings),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert env.rows() == len(good) and env.pending() == 0
    dead = {f[b"source_id"]: f for _, f in env.dead()}
    assert sorted(dead) == sorted(remote)
    for f in dead.values():
        assert f[b"reason"] == b"bad_storage"
        assert b"storage 's3'" in f[b"error"] and b"S3_BUCKET is not set" in f[b"error"], f[b"error"]


def test_entry_naming_local_on_an_s3_consumer_without_a_local_root(
    env: Env, s3: MotoS3, bucket: str, tmp_path: Path
) -> None:
    """An S3-only consumer whose local storage root does not exist dead-letters the
    entries that name local storage, rather than waiting for that directory forever."""
    put_object(s3, bucket, "uploads/remote.txt", b"in the bucket\n")
    ok = [env.xadd({"file_id": str(uuid.uuid4()), "filename": "r", "key": "remote.txt"}) for _ in range(5)]
    local = env.xadd({"file_id": str(uuid.uuid4()), "filename": "l.txt", "key": "l.txt", "storage": "local"})
    missing_root = str(tmp_path / "no-such-dir")
    settings = s3_settings(env, s3, bucket, storage_mode="s3", local_storage_dir=missing_root)
    done: list[Any] = []
    drainer = threading.Thread(
        target=lambda: done.append(Consumer(settings, drain=True, write=None).run()), daemon=True
    )
    drainer.start()
    drainer.join(60)
    assert done, "the consumer waited for a local storage root it was never given"
    assert done[0].inserted == len(ok) and done[0].dead_lettered == 1
    ((_, fields),) = env.dead()
    assert fields[b"source_id"] == local and fields[b"reason"] == b"bad_storage"
    assert b"storage 'local'" in fields[b"error"] and b"no-such-dir" in fields[b"error"], fields[b"error"]
    assert env.pending() == 0


def test_a_consumer_whose_own_storage_is_misconfigured_stops_before_reading(env: Env) -> None:
    """The storage the consumer is configured for is checked when it starts: a bad S3
    setting is a configuration error (exit 2) before any entry is read."""
    env.xadd({"file_id": str(uuid.uuid4()), "filename": "a.txt", "key": "a.txt", "storage": "s3"})
    bad = env.settings_with(
        storage_mode="s3", s3_bucket="b", s3_prefix="../up", s3_endpoint_url="http://127.0.0.1:1"
    )
    with pytest.raises(ConfigError, match="S3_PREFIX"):
        Consumer(bad, drain=True, write=None).run()
    assert env.dead() == [] and env.rows() == 0
    assert env.redis.xinfo_groups(env.settings.stream) == []  # nothing read: not even a group made


def test_dashboard_uploads_to_s3_through_a_private_staging_directory(
    env: Env, s3: MotoS3, bucket: str
) -> None:
    """Each dashboard process stages S3 uploads in a directory of its own, mode 0700 and
    unguessable, never a shared /tmp/filepipe-incoming another user could own or watch."""
    import stat
    import tempfile

    import httpx
    from tests.test_dashboard import multipart, serve, upload_token

    from filepipe.dashboard.app import create_app

    settings = s3_settings(env, s3, bucket, storage_mode="s3")
    apps = [create_app(settings, allow_upload=True, interval=0.5) for _ in range(2)]
    with serve(apps[0]) as url, serve(apps[1]), httpx.Client(base_url=url) as client:
        dirs = [app.state.uploader.staging_dir() for app in apps]
        assert dirs[0] != dirs[1]
        for d in dirs:
            assert d.parent == Path(tempfile.gettempdir()) and d.name.startswith("filepipe-incoming-")
            assert stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == os.getuid()
        token = upload_token(client)
        js = {"accept": "application/json"}
        r = client.post("/upload", **multipart(token, [("a.txt", b"to the bucket")]), headers=js)
        assert r.status_code == 200, r.text
        assert list(dirs[0].iterdir()) == []  # staged, stored, removed
    assert not any(d.exists() for d in dirs)
    ((_, fields),) = env.redis.xrange(settings.stream)
    assert fields[b"storage"] == b"s3"
