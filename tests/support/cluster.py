"""A real Redis Cluster of three masters on loopback ports, made from the redis-server
binary (`--cluster-enabled yes`) and `redis-cli --cluster create`, with append-only
files so that a master killed and restarted keeps what it acknowledged."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from tests.support.processes import reap, stop, wait_port


def _free_cluster_port() -> int:
    """A port p such that p and its cluster bus port p + 10000 are both free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterServers:
    """Three masters, no replicas. `url` is one node's; `restart(i)` kills a master
    (SIGKILL by default) and starts it again with its data and cluster state."""

    def __init__(self, masters: int = 3) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="filepipe-cluster-"))
        self.ports = [_free_cluster_port() for _ in range(masters)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.binary = shutil.which("redis-server") or "redis-server"
        self.cli = shutil.which("redis-cli") or "redis-cli"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _launch(self, port: int) -> None:
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--dir",
            str(node_dir),
            "--logfile",
            str(node_dir / "redis.log"),
            "--daemonize",
            "no",
        ]
        self.procs[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_port(port, proc=self.procs[port])

    def start(self) -> RedisClusterServers:
        for port in self.ports:
            self._launch(port)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        result = subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {result.stdout}{result.stderr}")
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says cluster_state:ok and agrees on all 16384 slots."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all(self._node_ok(p) for p in self.ports):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Redis Cluster did not become ok")
            time.sleep(0.1)

    def _node_ok(self, port: int) -> bool:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as r:
            info = r.cluster("info")
            return info["cluster_state"] == "ok" and int(info["cluster_slots_ok"]) == 16384

    def port_of(self, key: str) -> int:
        """The port of the master that holds `key`'s slot."""
        with redis.Redis(host="127.0.0.1", port=self.ports[0], socket_timeout=2) as r:
            slot = int(r.cluster("keyslot", key))
            for start, end, master, *_ in r.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise LookupError(key)

    def restart(self, port: int, *, down_s: float = 1.0, kill: bool = True) -> None:
        """Stops the master on `port` (SIGKILL, or SIGTERM with `kill=False`), waits
        `down_s`, starts it again and waits until the cluster is ok."""
        stop(self.procs[port], signal.SIGKILL if kill else signal.SIGTERM)
        time.sleep(down_s)
        self._launch(port)
        self.wait_ok()

    def delete_matching(self, pattern: str) -> None:
        for port in self.ports:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as r:
                for key in r.scan_iter(match=pattern, count=1000):
                    r.delete(key)

    def close(self) -> None:
        for proc in self.procs.values():
            reap(proc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
