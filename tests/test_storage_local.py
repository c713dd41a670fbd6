"""Local storage: every way out of the root is refused, and nothing outside it is ever
opened (watched with inotify); files are streamed, oversized ones dead-lettered."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import resource
import socket
import stat
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.conftest import Env

from filepipe import _native
from filepipe.errors import StorageError
from filepipe.producer import Producer
from filepipe.storage import LocalStorage

CANARY = b"CANARY: this file is outside the storage root and must never be read\n"
IN_ACCESS = 0x001
IN_OPEN = 0x020


class OpenWatch:
    """inotify on files and directories: records every open or read of them (or, for a
    directory, of anything directly in it) from anywhere on the host."""

    def __init__(self, *paths: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.names: dict[int, Path] = {}
        for p in paths:
            wd = self._libc.inotify_add_watch(self.fd, os.fsencode(p), IN_OPEN | IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {p}")
            self.names[wd] = p

    def events(self) -> list[str]:
        """What was opened or read since the last call."""
        out: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16 : pos + 16 + length].rstrip(b"\0").decode()
                kind = "open" if mask & IN_OPEN else "read"
                out.append(f"{kind} {self.names.get(wd, '?')}/{name}")
                pos += 16 + length

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Layout:
    base: Path
    root: Path
    outside: Path


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[Layout]:
    r"""
    outside/canary.txt, outside/dir/canary.txt     never to be read
    root/ok.txt, root/sub/in.txt, root/big.bin     ordinary files
    root/link_in -> sub/in.txt, root/link_sub -> sub     symlinks that stay inside
    root/link_out_file -> ../outside/canary.txt           relative symlink leaving (file)
    root/link_out_abs -> <abs>/outside/canary.txt         absolute symlink (file)
    root/link_out_dir -> ../outside                       relative symlink leaving (directory)
    root/link_out_dir_abs -> <abs>/outside/dir            absolute symlink (directory)
    root/sub/deep_out -> ../../outside/canary.txt         leaving from a subdirectory
    root/link_dev -> /dev/zero, root/link_proc -> /proc/self/root
    root/loop -> loop, root/fifo, root/sock, root/dir/
    """
    base = tmp_path
    outside = base / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "canary.txt").write_bytes(CANARY)
    (outside / "dir" / "canary.txt").write_bytes(CANARY)
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "dir").mkdir()
    (root / "ok.txt").write_bytes(b"inside\n")
    (root / "sub" / "in.txt").write_bytes(b"deeper inside\n")
    (root / "big.bin").write_bytes(b"B" * 5000)
    (root / "link_in").symlink_to("sub/in.txt")
    (root / "link_sub").symlink_to("sub")
    (root / "link_out_file").symlink_to("../outside/canary.txt")
    (root / "link_out_abs").symlink_to(outside / "canary.txt")
    (root / "link_out_dir").symlink_to("../outside")
    (root / "link_out_dir_abs").symlink_to(outside / "dir")
    (root / "sub" / "deep_out").symlink_to("../../outside/canary.txt")
    (root / "link_dev").symlink_to("/dev/zero")
    (root / "link_proc").symlink_to("/proc/self/root")
    (root / "loop").symlink_to("loop")
    os.mkfifo(root / "fifo")
    yield Layout(base, root, outside)


def parse(*keys: str) -> _native.EntryBatch:
    entries = [
        (
            f"1700000000000-{n}",
            {"file_id": str(uuid.uuid4()), "filename": "f", "key": key, "storage": "local"},
        )
        for n, key in enumerate(keys)
    ]
    return _native.parse_entries(entries)


def measure(root: Path, *keys: str, max_bytes: int = 1 << 40) -> _native.Measurements:
    batch = parse(*keys)
    assert batch.rejects == [], batch.rejects
    m = _native.Measurements(len(batch))
    LocalStorage(root, hash_threads=2).measure(batch, list(range(len(batch))), m, max_bytes)
    return m


def outcome(m: _native.Measurements, i: int) -> str:
    got = m.get(i)
    if got is not None:
        return "ok"
    (reason,) = [f[1] for f in m.failures() if f[0] == i]
    return reason


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- inside the root ----------------------------------------------------------------------


def test_measures_files_and_symlinks_inside_the_root(layout: Layout) -> None:
    keys = ["ok.txt", "sub/in.txt", "link_in", "link_sub/in.txt", "./ok.txt", "sub//in.txt"]
    m = measure(layout.root, *keys)
    assert m.failures() == []
    assert m.get(0) == (7, sha(b"inside\n"), "text/plain")
    for i in range(1, 4):
        assert m.get(i) == (14, sha(b"deeper inside\n"), "text/plain")
    assert m.get(4) == m.get(0) and m.get(5) == m.get(1)


# -- every way out ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "../outside/canary.txt",
        "sub/../../outside/canary.txt",
        "/etc/passwd",
        "ABS",
        "\\etc\\passwd",
        "a\\..\\..\\x",
    ],
)
def test_climbing_and_absolute_keys_never_reach_storage(layout: Layout, key: str) -> None:
    if key == "ABS":
        key = str(layout.outside / "canary.txt")
    (reject,) = parse(key).rejects
    assert reject[2] == "unsafe_key"


ESCAPES = {
    "link_out_file": "unsafe_key",
    "link_out_abs": "unsafe_key",
    "link_out_dir/canary.txt": "unsafe_key",
    "link_out_dir/dir/canary.txt": "unsafe_key",
    "link_out_dir_abs/canary.txt": "unsafe_key",
    "sub/deep_out": "unsafe_key",
    "link_dev": "unsafe_key",
    "link_proc/etc/hostname": "unsafe_key",
    "loop": "unsafe_key",
    "fifo": "not_a_file",
    "dir": "not_a_file",
    "sub/": "not_a_file",
    "missing.txt": "missing",
    "nodir/missing.txt": "missing",
    "ok.txt/below-a-file": "missing",
}


def test_escapes_are_refused_and_the_canary_is_never_opened(layout: Layout) -> None:
    watch = OpenWatch(layout.outside, layout.outside / "dir", layout.outside / "canary.txt")
    try:
        keys = list(ESCAPES)
        done: list[_native.Measurements] = []
        # In a thread with a deadline: a FIFO must not block the consumer.
        t = threading.Thread(target=lambda: done.append(measure(layout.root, *keys)), daemon=True)
        t.start()
        t.join(30)
        assert done, "measuring blocked (on the FIFO?)"
        m = done[0]
        assert {k: outcome(m, i) for i, k in enumerate(keys)} == ESCAPES
        assert all(f[3] is False for f in m.failures()), "none of these is worth retrying"
        assert watch.events() == [], "something outside the root was opened or read"
        # The watch does see opens (so the silence above means something):
        (layout.outside / "canary.txt").read_bytes()
        assert any("canary.txt" in e for e in watch.events())
    finally:
        watch.close()


def test_failure_messages_name_the_key(layout: Layout) -> None:
    m = measure(layout.root, "link_out_file", "missing.txt", "fifo")
    messages = {i: msg for i, _reason, msg, _t in m.failures()}
    assert "link_out_file" in messages[0] and "outside the storage root" in messages[0]
    assert "missing.txt" in messages[1]
    assert "fifo" in messages[2]
    assert all(CANARY.decode()[:10] not in msg for msg in messages.values())


def test_socket_is_refused(layout: Layout) -> None:
    # AF_UNIX paths are limited to ~108 bytes: bind relative to the root.
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    try:
        os.chdir(layout.root)
        sock.bind("sock")
    finally:
        os.chdir(cwd)
    try:
        m = measure(layout.root, "sock")
        ((_i, reason, _msg, transient),) = m.failures()
        # Opening a socket fails with ENXIO; it is never read, and never retried.
        assert reason in ("not_a_file", "unreadable") and not transient
    finally:
        sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device needs root")
def test_device_node_inside_the_root_is_refused(layout: Layout) -> None:
    os.mknod(layout.root / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # what /dev/zero is
    os.mknod(layout.root / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    m = measure(layout.root, "zero", "null")
    assert [outcome(m, 0), outcome(m, 1)] == ["not_a_file", "not_a_file"]


def test_too_large(layout: Layout) -> None:
    m = measure(layout.root, "big.bin", "ok.txt", max_bytes=4999)
    assert [outcome(m, 0), outcome(m, 1)] == ["too_large", "ok"]
    ((_i, _reason, message, transient),) = m.failures()
    assert "big.bin" in message and "MAX_FILE_BYTES" in message and not transient
    assert measure(layout.root, "big.bin", max_bytes=5000).get(0) == (5000, sha(b"B" * 5000), "text/plain")


def test_missing_root_is_a_storage_error(tmp_path: Path) -> None:
    batch = parse("a")
    with pytest.raises(StorageError, match="LOCAL_STORAGE_DIR"):
        LocalStorage(tmp_path / "nope").measure(batch, [0], _native.Measurements(1), 100)


def test_large_file_is_streamed_not_loaded(tmp_path: Path) -> None:
    size = 768 * 1024 * 1024
    with open(tmp_path / "sparse.bin", "wb") as f:  # sparse: no disk space, all zeros
        f.truncate(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m = measure(tmp_path, "sparse.bin")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    h = hashlib.sha256()
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        h.update(zeros)
    assert m.get(0) == (size, h.digest(), "application/octet-stream")
    assert after - before < 128 * 1024 * 1024, f"peak memory grew by {(after - before) >> 20} MiB"


# -- storing ------------------------------------------------------------------------------


def test_put_file_copies_and_links(tmp_path: Path) -> None:
    src = tmp_path / "src.txt"
    src.write_bytes(b"data\n")
    st = LocalStorage(tmp_path / "root")
    st.ensure_root()
    st.put_file(src, "2024/01/02/id/copy.txt")
    st.put_file(src, "2024/01/02/id/link.txt", link=True)
    assert (tmp_path / "root/2024/01/02/id/copy.txt").read_bytes() == b"data\n"
    assert os.path.samefile(src, tmp_path / "root/2024/01/02/id/link.txt")
    assert not os.path.samefile(src, tmp_path / "root/2024/01/02/id/copy.txt")
    assert [p.name for p in (tmp_path / "root/2024/01/02/id").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("key", ["../escape.txt", "/tmp/escape.txt", "a/../../escape.txt", "./x", "dir/", ""])
def test_put_file_refuses_keys_leaving_the_root(tmp_path: Path, key: str) -> None:
    src = tmp_path / "src.txt"
    src.write_bytes(b"data\n")
    st = LocalStorage(tmp_path / "root")
    st.ensure_root()
    with pytest.raises(StorageError, match="cannot store"):
        st.put_file(src, key)
    assert not (tmp_path / "escape.txt").exists()


def test_put_file_error_names_the_key(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path / "root")
    with pytest.raises(StorageError, match="as 'k/x'"):
        st.put_file(tmp_path / "does-not-exist", "k/x")


# -- through the pipeline --------------------------------------------------------------------


def test_hostile_entries_are_dead_lettered_and_the_rest_loaded(env: Env) -> None:
    root = env.storage
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "canary.txt").write_bytes(CANARY)
    env.write_file("good/a.txt", b"good a\n")
    env.write_file("good/b.bin", bytes(range(256)))
    env.write_file("big.bin", b"x" * 2048)
    (root / "out").symlink_to("../outside/canary.txt")
    (root / "outdir").symlink_to(outside)
    (root / "dev").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo")
    (root / "adir").mkdir()
    expected = {
        "good/a.txt": None,
        "good/b.bin": None,
        "../outside/canary.txt": "unsafe_key",
        str(outside / "canary.txt"): "unsafe_key",
        "out": "unsafe_key",
        "outdir/canary.txt": "unsafe_key",
        "dev": "unsafe_key",
        "fifo": "not_a_file",
        "adir": "not_a_file",
        "gone.txt": "missing",
        "big.bin": "too_large",
    }
    for key in expected:
        env.xadd({"file_id": str(uuid.uuid4()), "filename": key.rsplit("/", 1)[-1], "key": key})
    watch = OpenWatch(outside, outside / "canary.txt")
    try:
        stats = env.drain(max_file_bytes=1024)
        assert watch.events() == []
    finally:
        watch.close()
    assert stats.inserted == 2
    rows = sorted(env.sql(f"SELECT storage_key, size_bytes, checksum_sha256 FROM {env.settings.table}"))
    assert rows == [
        ("good/a.txt", 7, hashlib.sha256(b"good a\n").hexdigest()),
        ("good/b.bin", 256, hashlib.sha256(bytes(range(256))).hexdigest()),
    ]
    dead = {f[b"key"].decode(): f[b"reason"].decode() for _id, f in env.dead()}
    assert dead == {k: v for k, v in expected.items() if v is not None}
    assert env.pending() == 0


def test_produce_locally_then_consume(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    files = {f"f{i}.txt": f"file {i}\n".encode() * (i + 1) for i in range(20)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    producer = Producer(env.settings)
    assert producer.produce([src]) == len(files)
    producer.close()
    assert env.drain().inserted == len(files)
    rows = env.sql(f"SELECT filename, size_bytes, checksum_sha256 FROM {env.settings.table}")
    assert sorted(rows) == sorted((n, len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items())


# -- a chunk at a time through io_uring, or one system call at a time ------------------------

MEASURE_BOTH_WAYS = """
import json, sys
from pathlib import Path
from tests.test_storage_local import ESCAPES, measure
from filepipe import _native

keys = [*ESCAPES, "ok.txt", "sub/in.txt", "big.bin", "link_in", "link_sub/in.txt"] * 40
m = measure(Path(sys.argv[1]), *keys)
got = [(lambda g: g and [g[0], g[1].hex(), g[2]])(m.get(i)) for i in range(len(keys))]
print(json.dumps({"how": _native.file_reads(), "got": got, "failures": m.failures()}))
"""


def test_io_uring_and_one_system_call_at_a_time_measure_alike(layout: Layout) -> None:
    """Every file, refusal and message is the same either way (FILEPIPE_IO_URING=0 turns
    io_uring off), in chunks and on several threads."""
    runs = {}
    for setting in ("1", "0"):
        done = subprocess.run(
            [sys.executable, "-c", MEASURE_BOTH_WAYS, str(layout.root)],
            env={**os.environ, "FILEPIPE_IO_URING": setting},
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        runs[setting] = json.loads(done.stdout)
    on, off = runs["1"], runs["0"]
    assert off["how"] == "one system call at a time (FILEPIPE_IO_URING=0)"
    assert on["how"] in (
        "a chunk at a time through io_uring",
        "one system call at a time (io_uring is not available here)",
    )
    assert on["got"] == off["got"] and on["failures"] == off["failures"]
    assert sum(g is not None for g in on["got"]) == 5 * 40 and len(on["failures"]) == len(ESCAPES) * 40
