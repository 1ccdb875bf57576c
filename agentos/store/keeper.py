"""Lease renewal and the daemon's heartbeat on a thread of their own, with their own connection.

Agent code that blocks the event loop (``time.sleep``, ``subprocess.run``, a sync HTTP
call) stops every coroutine of its daemon. Leases renewed on that loop would expire and
every agent of the daemon would be taken over (by another daemon, or by this one after
the loop comes back, re-running the tasks it was in the middle of); a heartbeat written
there would make the daemon look dead. So a running daemon publishes the leases it holds
and the facts of its heartbeat to a :class:`LeaseKeeper`, whose thread renews exactly
those leases with the same fenced script as :meth:`~agentos.store.Store.renew_leases`
(``lua/lease_renew.lua``: extended only while the value is still ours) and writes the
heartbeat, through a synchronous redis-py client on connections of its own. Leases it
finds lost are handed back to the loop, which stops their runners.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping
from importlib import resources

import redis
from redis import exceptions as rexc
from redis.cluster import ClusterNode, RedisCluster

from agentos.store.keys import Keys
from agentos.store.raw import RawClient, RawReply

__all__ = ["LeaseKeeper", "heartbeat_args", "sync_client"]

log = logging.getLogger("agentos.store")

# Connection settings that mean the same to redis-py's sync and asyncio clients.
_SHARED = frozenset(
    {
        "host",
        "port",
        "db",
        "path",
        "username",
        "password",
        "credential_provider",
        "client_name",
        "protocol",
        "ssl_keyfile",
        "ssl_certfile",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_data",
        "ssl_ca_path",
        "ssl_check_hostname",
        "ssl_password",
        "ssl_min_version",
        "ssl_ciphers",
    }
)
_SYNC_CONNECTIONS: dict[str, type[redis.Connection] | type[redis.UnixDomainSocketConnection]] = {
    "SSLConnection": redis.SSLConnection,
    "UnixDomainSocketConnection": redis.UnixDomainSocketConnection,
}
RENEW_BATCH = 1000


def _script(name: str) -> str:
    return resources.files("agentos.store").joinpath("lua", f"{name}.lua").read_text()


def heartbeat_args(
    daemon_id: str,
    body: Mapping[str, object],
    *,
    now: float | None,
    forget_after_s: float,
    fresh_s: float,
) -> list[str | int]:
    """The arguments of ``lua/daemon_heartbeat.lua`` (``body`` without ``seen_at``)."""
    return [
        daemon_id,
        json.dumps(dict(body)),
        repr(float(forget_after_s)),
        max(1, math.ceil(forget_after_s)),
        str(body.get("instance", "")),
        repr(float(fresh_s)),
        "" if now is None else repr(float(now)),
    ]


def sync_client(client: RawClient, *, cluster: bool, timeout_s: float = 5.0) -> RawClient:
    """A synchronous client for the server (or cluster) that the asyncio ``client`` talks
    to, with the same address, credentials and TLS settings and a pool of its own."""
    if cluster:
        kwargs = {
            k: v
            for k, v in client.connection_kwargs.items()
            if k in _SHARED and k not in ("host", "port", "db", "path")
        }
        ssl = "SSL" in getattr(client.connection_kwargs.get("connection_class"), "__name__", "")
        make_node: RawClient = ClusterNode  # untyped in redis-py
        nodes = [make_node(n.host, n.port) for n in client.get_nodes()]
        return RedisCluster(
            startup_nodes=nodes,
            ssl=ssl,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            **kwargs,
        )
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _SHARED}
    if pool.connection_class.__name__ != "UnixDomainSocketConnection":
        kwargs["socket_connect_timeout"] = timeout_s
    connection_class = _SYNC_CONNECTIONS.get(pool.connection_class.__name__, redis.Connection)
    return redis.Redis(
        connection_pool=redis.ConnectionPool(
            connection_class=connection_class,
            max_connections=4,
            socket_timeout=timeout_s,
            **kwargs,
        )
    )


class LeaseKeeper:
    """Renews the leases the daemon's loop publishes, and writes its heartbeat, from a
    thread (see the module docstring). Create with :meth:`Store.lease_keeper`."""

    def __init__(
        self,
        client: RawClient,
        keys: Keys,
        daemon_id: str,
        *,
        instance: str,
        ttl_ms: int,
        every_s: float,
        forget_after_s: float,
    ) -> None:
        self._r = client
        self.keys = keys
        self.daemon_id = daemon_id
        self.instance = instance
        self.ttl_ms = ttl_ms
        self.every_s = every_s
        self.forget_after_s = forget_after_s
        self._renew_src = _script("lease_renew")
        self._heartbeat = client.register_script(_script("daemon_heartbeat"))
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}
        self._info: dict[str, object] | None = None
        self._lost: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None  # the failure last logged (each is logged once)
        self.passes = 0  # passes that reached Redis
        self.refused = False  # a live daemon of another process has our id

    def publish(self, held: Mapping[str, str], info: Mapping[str, object] | None = None) -> None:
        """The leases the daemon holds now (agent -> "daemon|token") and, when given, the
        facts of its next heartbeat. Thread-safe; the next pass uses them."""
        with self._lock:
            self._held = dict(held)
            if info is not None:
                self._info = dict(info)

    def forget(self, name: str, lease_value: str) -> None:
        """Stop renewing ``name``'s lease (its runner ended) before the next publish."""
        with self._lock:
            if self._held.get(name) == lease_value:
                del self._held[name]

    def take_lost(self) -> dict[str, str]:
        """Leases found lost since the last call (agent -> the value that was ours)."""
        with self._lock:
            lost, self._lost = self._lost, {}
        return lost

    def start(self) -> None:
        """Start the thread (a pass every ``every_s``, the first one at once)."""
        self._thread = threading.Thread(
            target=self._run, name=f"agentos-leases-{self.daemon_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after the pass in flight) and close its connections."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.every_s + 15.0)
        self._r.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.renew_once()
            self._stop.wait(self.every_s)

    def renew_once(self) -> None:
        """One pass: the heartbeat, then every published lease. Never raises."""
        with self._lock:
            held = dict(self._held)
            info = None if self._info is None else dict(self._info)
        try:
            if info is not None:
                self._beat(info)
            lost = self._renew(held)
        except (rexc.RedisError, OSError) as e:
            self._failed(f"{type(e).__name__}: {e}")
            return
        except Exception as e:  # never let the thread die: the leases depend on it
            self._failed(f"{type(e).__name__}: {e}", trace=True)
            return
        with self._lock:
            self._lost.update(lost)
        self.passes += 1
        if self._error is not None:
            log.warning("lease renewal thread reaches Redis again")
            self._error = None

    def _beat(self, info: dict[str, object]) -> None:
        body = {**info, "instance": self.instance}
        args = heartbeat_args(
            self.daemon_id,
            body,
            now=None,
            forget_after_s=self.forget_after_s,
            fresh_s=self.ttl_ms / 1000,
        )
        written, _ = self._heartbeat(keys=[self.keys.daemons], args=args)
        refused = not int(written)
        if refused and not self.refused:
            log.error(
                "another live daemon writes heartbeats as %r: this daemon's heartbeat is "
                "not written while it does",
                self.daemon_id,
            )
        self.refused = refused

    def _renew(self, held: dict[str, str]) -> dict[str, str]:
        lost: dict[str, str] = {}
        names = list(held)
        for i in range(0, len(names), RENEW_BATCH):
            chunk = names[i : i + RENEW_BATCH]
            replies = self._renew_batch(chunk, held)
            errors = [r for r in replies.values() if isinstance(r, Exception)]
            if errors:  # those leases are tried again on the next pass
                self._failed(f"{len(errors)} lease(s) not renewed: {errors[0]}")
                if isinstance(self._r, RedisCluster):  # a node failed over: re-read the slots
                    self._r.nodes_manager.initialize()
            for name, reply in replies.items():
                if not isinstance(reply, Exception) and not int(reply):
                    lost[name] = held[name]
        return lost

    def _renew_batch(self, names: list[str], held: dict[str, str]) -> dict[str, RawReply]:
        """One pipeline per server (redis-py's sync cluster pipeline has no EVAL): each
        lease's reply, or the error that left it unknown."""
        groups: dict[str, tuple[RawClient, list[str]]] = {}
        cluster: RawClient = self._r if isinstance(self._r, RedisCluster) else None  # untyped
        for name in names:
            if cluster is not None:
                node = cluster.get_node_from_key(self.keys.lease(name))
                client = node.redis_connection or cluster.get_redis_connection(node)
                groups.setdefault(node.name, (client, []))[1].append(name)
            else:
                groups.setdefault("", (self._r, []))[1].append(name)
        replies: dict[str, RawReply] = {}
        for client, group in groups.values():
            pipe = client.pipeline(transaction=False)
            for name in group:
                pipe.eval(self._renew_src, 1, self.keys.lease(name), held[name], self.ttl_ms)
            try:
                results = pipe.execute(raise_on_error=False)
            except (rexc.RedisError, OSError) as e:  # this server only: the others go on
                results = [e] * len(group)
            replies.update(zip(group, results, strict=True))
        return replies

    def _failed(self, text: str, *, trace: bool = False) -> None:
        if text == self._error:
            return
        self._error = text
        if trace:
            log.exception("lease renewal thread: %s; retrying", text)
        else:
            log.warning("lease renewal thread: %s; retrying", text)
