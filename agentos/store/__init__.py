"""The Redis control plane: every read and write agentos makes, and the only redis import.

Everything a daemon needs to resume lives here: desired specs, agent status, leases
with fencing tokens, event streams, durable agent state, inboxes and hibernated KV.
Callers get plain Python values and three exception types (:class:`StoreUnavailable`
when the server cannot be reached, :class:`StoreFull` when it refuses writes at
``maxmemory``, :class:`StoreError` for anything else), never a redis-py type, so the
rest of the code base does not depend on the client library. Nothing here retries:
:mod:`agentos.store.retry` is the one retry policy, for operations safe to repeat.

The operations are split by job into mixins that :class:`Store` composes:
:mod:`~agentos.store.specs` (desired state), :mod:`~agentos.store.writes` (fenced writes,
status, events), :mod:`~agentos.store.inbox` (inboxes, task records),
:mod:`~agentos.store.leases` (leases, signals, daemons), :mod:`~agentos.store.quota` and
:mod:`~agentos.store.waits` (parked waits, the due-time index);
the values they take and return are in :mod:`~agentos.store.records`.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import Any

import redis.asyncio as aredis
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentos.engine.base import KVSnapshot
from agentos.store.batching import ScriptBatcher
from agentos.store.clusterclient import AgentosCluster
from agentos.store.errors import SendRefused, StoreError, StoreFull, StoreUnavailable, translate
from agentos.store.errors import reason as _reason
from agentos.store.inbox import DEAD_LETTERS_KEPT as DEAD_LETTERS_KEPT
from agentos.store.inbox import SEND_DEDUPE_TTL_S as SEND_DEDUPE_TTL_S
from agentos.store.inbox import UNFINISHED_SCAN as UNFINISHED_SCAN
from agentos.store.inbox import DeadLetter, InboxFull, InboxOps, SendConflict
from agentos.store.keys import INBOX_GROUP, Keys
from agentos.store.leases import LeaseOps
from agentos.store.logs import LogLine, LogOps
from agentos.store.modelops import ModelOps
from agentos.store.quota import AdmitReply, AdmitRequest, ClassUsage, QuotaOps
from agentos.store.records import FLEET_EVENTS_MAXLEN as FLEET_EVENTS_MAXLEN
from agentos.store.records import SIGNALS_MAXLEN as SIGNALS_MAXLEN
from agentos.store.records import TASK_RETENTION_S as TASK_RETENTION_S
from agentos.store.records import USAGE_RETENTION_S as USAGE_RETENTION_S
from agentos.store.records import (
    AgentSnapshot,
    AppliedChange,
    Event,
    InboxMessage,
    LeaseInfo,
    Retention,
    SpecRecord,
    StatusUpdate,
    TaskWrite,
    _s,
)
from agentos.store.snapshots import LoadedSnapshot, Manifest, SavedSnapshot, Snapshots
from agentos.store.specs import SpecOps
from agentos.store.urls import redact_url
from agentos.store.waits import EventsFull, WaitOps
from agentos.store.writes import DUPLICATE, Duplicate, Write, WriteOps
from agentos.store.writes import EVENTS_MAXLEN as EVENTS_MAXLEN
from agentos.store.writes import OP_IDS_KEPT as OP_IDS_KEPT
from agentos.store.writes import OP_IDS_TTL_S as OP_IDS_TTL_S

__all__ = [
    "DUPLICATE",
    "INBOX_GROUP",
    "AdmitReply",
    "AdmitRequest",
    "AgentSnapshot",
    "AppliedChange",
    "ClassUsage",
    "DeadLetter",
    "Duplicate",
    "Event",
    "EventsFull",
    "InboxFull",
    "InboxMessage",
    "Keys",
    "LeaseInfo",
    "LoadedSnapshot",
    "LogLine",
    "Manifest",
    "Retention",
    "SavedSnapshot",
    "SendConflict",
    "SendRefused",
    "SpecRecord",
    "StatusUpdate",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "TaskWrite",
    "Write",
    "redact_url",
]


log = logging.getLogger("agentos.store")


def _load_script(name: str) -> str:
    return resources.files("agentos.store").joinpath("lua", f"{name}.lua").read_text()


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


class Store(SpecOps, WriteOps, InboxOps, LeaseOps, QuotaOps, WaitOps, ModelOps, LogOps):
    """Async access to one agentos namespace on one Redis server or one Redis Cluster.

    Create with :meth:`connect`; close with :meth:`close` (or ``async with``).
    """

    def __init__(
        self, client: aredis.Redis | RedisCluster, keys: Keys, display_url: str, *, cluster: bool
    ) -> None:
        # redis-py's asyncio stubs type replies as unions of everything; this module
        # is the typed boundary, so the client is Any here and results are converted.
        self._r: Any = client
        self.keys = keys
        self.display_url = display_url
        # On a cluster one script or transaction may only touch keys of one slot: the
        # copies that go to fleet-wide streams are written in a step of their own.
        self.cluster = cluster
        self._topology_stale = False  # a node failed: re-read the slot map (cluster)
        self._topology_read_at = 0.0
        self._acquire = client.register_script(_load_script("lease_acquire"))
        self._renew = client.register_script(_load_script("lease_renew"))
        self._release = client.register_script(_load_script("lease_release"))
        self._fenced = client.register_script(_load_script("fenced_ops"))
        self._batch = ScriptBatcher(client)
        self._send_once = client.register_script(_load_script("inbox_send"))
        self._read_fenced = client.register_script(_load_script("inbox_read"))
        self._heartbeat = client.register_script(_load_script("daemon_heartbeat"))
        self.retention = Retention()
        self.snapshots = Snapshots(
            client,
            keys,
            client.register_script(_load_script("kv_commit")),
            client.register_script(_load_script("kv_begin")),
            self._release,
        )
        self._quota_scripts(client, _load_script)
        self._waits_scripts(client, _load_script)
        self._inbox_scripts(client, _load_script)

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        namespace: str = "agentos",
        check: bool = True,
        timeout_s: float = 5.0,
        max_connections: int = 64,
    ) -> Store:
        """Open a connection pool to ``url`` and check it with PING.

        Accepts ``redis://``, ``rediss://`` and ``unix://`` URLs with optional user and
        password, and ``redis+cluster://`` / ``rediss+cluster://`` for a Redis Cluster
        (any node's address; the others are discovered). Raises
        :class:`StoreUnavailable` naming the (redacted) URL when the server cannot be
        reached, refuses the credentials, or is not what the URL says (a cluster node
        behind a plain URL, a single server or a cluster with uncovered slots behind a
        cluster URL).
        """
        shown = redact_url(url)
        scheme, sep, rest = url.partition("://")
        if sep and scheme.lower() in CLUSTER_SCHEMES:
            return await cls._connect_cluster(
                f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}",
                shown,
                namespace=namespace,
                check=check,
                timeout_s=timeout_s,
                max_connections=max_connections,
            )
        try:
            # A bounded, blocking pool: ten thousand agents starting at once queue
            # for 64 connections instead of opening ten thousand sockets.
            pool = aredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=None,
                decode_responses=False,
                socket_connect_timeout=timeout_s,
                socket_timeout=max(timeout_s, 10.0),
                health_check_interval=30,
                # No client-level retry: redis-py would re-send a script, an XADD or a
                # MULTI/EXEC whose reply was lost after the server applied it. Callers
                # retry through agentos.store.retry, with operation ids.
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
            )
            client = aredis.Redis.from_pool(pool)
        except ValueError as e:
            raise StoreUnavailable(f"invalid Redis URL {shown}: {e}") from None
        store = cls(client, Keys(namespace), shown, cluster=False)
        if check:
            try:
                await store.ping()
                await store._check_not_cluster()
            except StoreError:
                await store.close()
                raise
        return store

    @classmethod
    async def _connect_cluster(
        cls,
        url: str,
        shown: str,
        *,
        namespace: str,
        check: bool,
        timeout_s: float,
        max_connections: int,
    ) -> Store:
        try:
            client = AgentosCluster.from_url(
                url,
                decode_responses=False,
                socket_connect_timeout=timeout_s,
                socket_timeout=max(timeout_s, 10.0),
                health_check_interval=30,
                # Per node. The cluster client raises rather than queueing when they
                # are all busy, so the bound is generous; the batcher keeps it unused.
                max_connections=max(max_connections, 1024),
                # As for one server: no re-sending of a command whose reply was lost.
                # A MOVED/ASK redirect (nothing ran) is still followed, and a failed
                # node makes the next call refresh the slot map.
                retry=Retry(NoBackoff(), 0),
                require_full_coverage=True,
            )
        except (ValueError, rexc.RedisError) as e:
            raise StoreUnavailable(f"invalid Redis Cluster URL {shown}: {_reason(e)}") from None
        store = cls(client, Keys(namespace), shown, cluster=True)
        try:
            await store._initialize_cluster()
            if check:
                await store.ping()
        except StoreError:
            await store.close()
            raise
        return store

    async def _initialize_cluster(self) -> None:
        try:
            await self._r.initialize()
        except rexc.AuthenticationError as e:
            raise StoreUnavailable(
                f"Redis at {self.display_url} refused the credentials: {_reason(e)}"
            ) from None
        except (rexc.RedisError, rexc.RedisClusterException, OSError) as e:
            text = _reason(e)
            if "username-password" in text or "WRONGPASS" in text or "NOAUTH" in text:
                raise StoreUnavailable(
                    f"Redis at {self.display_url} refused the credentials: {text}"
                ) from None
            if (
                "cluster mode is not enabled" in text.lower()
                or "cluster support disabled" in text.lower()
            ):
                raise StoreUnavailable(
                    f"Redis at {self.display_url} is a single server, not a cluster: "
                    "use a redis:// URL for it"
                ) from None
            if "slots" in text.lower() and "covered" in text.lower():
                raise StoreUnavailable(
                    f"Redis Cluster at {self.display_url} does not serve every slot "
                    f"({text}); fix the cluster (CLUSTER INFO, --cluster check) first"
                ) from None
            raise StoreUnavailable(
                f"cannot reach Redis Cluster at {self.display_url}: {text}"
            ) from None
        await self._check_cluster_state()

    @translate
    async def _check_cluster_state(self) -> None:
        """Every master serves its slots and every slot is served: otherwise some agents'
        keys cannot be reached at all."""
        per_node = await self._r.cluster_info(target_nodes=RedisCluster.PRIMARIES)
        infos = list(per_node.values()) if "cluster_state" not in per_node else [per_node]
        for info in infos:
            assigned = int(info.get("cluster_slots_assigned", 0))
            if info.get("cluster_state") != "ok" or assigned < 16384:
                raise StoreUnavailable(
                    f"Redis Cluster at {self.display_url} is not ok (cluster_state "
                    f"{info.get('cluster_state')}, {assigned} of 16384 slots assigned); fix "
                    "the cluster first (CLUSTER INFO, valkey-cli --cluster check)"
                )

    async def _refresh_topology(self) -> None:
        """Re-read the cluster's slot map after a node failed, at most twice a second.

        redis-py's own way (flagging the client for a full re-initialisation) also sends
        ``COMMAND`` to its default node and fails every call while that node is the dead
        one: during a failover then no lease on the healthy masters could be renewed.
        Only the slot map is refreshed here, from any node that answers; until the
        replica has taken over, calls for the dead master's slots fail and the others
        go through.
        """
        now = time.monotonic()
        if now - self._topology_read_at < 0.5:
            return
        self._topology_read_at = now
        try:
            await self._r.nodes_manager.initialize()
        except Exception as e:
            log.debug("cluster slot map not refreshed: %s", _reason(e))
            return
        alive = {n.name for n in self._r.get_primaries()}
        if self._r.get_default_node() is None or self._r.get_default_node().name not in alive:
            self._r.replace_default_node()
        self._topology_stale = False

    @translate
    async def _check_not_cluster(self) -> None:
        """A plain URL that names a cluster node would fail later, key by key, with MOVED."""
        info = await self._r.info("cluster")
        if int(info.get("cluster_enabled", 0)):
            raise StoreUnavailable(
                f"Redis at {self.display_url} is a Redis Cluster node: use "
                "redis+cluster:// (or rediss+cluster://) with the same address"
            )

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._r.aclose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @translate
    async def ping(self) -> None:
        """Round trip to the server; raises StoreUnavailable when it is not there."""
        try:
            await self._r.ping()
        except rexc.AuthenticationError as e:
            raise StoreUnavailable(
                f"Redis at {self.display_url} refused the credentials: {e}"
            ) from None
        except rexc.ResponseError as e:
            if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
                raise StoreUnavailable(
                    f"Redis at {self.display_url} needs a password: {_reason(e)}"
                ) from None
            raise

    @translate
    async def command_calls(self) -> dict[str, int]:
        """Calls per command since the server started (``INFO commandstats``; commands a
        script runs count too). For benchmarks and tests that pin round trips."""
        if not self.cluster:
            info = await self._r.info("commandstats")
            return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}
        # Summed over the masters (a replica's replication stream is not a client call).
        per_node = await self._r.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
        total: dict[str, int] = {}
        for info in per_node.values():
            for k, v in info.items():
                name = k.removeprefix("cmdstat_")
                total[name] = total.get(name, 0) + int(v["calls"])
        return total

    @translate
    async def memory_used(self) -> int:
        """Bytes the server holds (``used_memory``; summed over a cluster's masters)."""
        if not self.cluster:
            return int((await self._r.info("memory"))["used_memory"])
        per_node = await self._r.info("memory", target_nodes=RedisCluster.PRIMARIES)
        return sum(int(info["used_memory"]) for info in per_node.values())

    @translate
    async def key_idle_s(self, key: str) -> int:
        """Seconds since any command last read or wrote ``key`` (``OBJECT IDLETIME``)."""
        return int(await self._r.object("idletime", key))

    # ---------------------------------------------------------------- hibernated KV

    @translate
    async def save_snapshot(
        self, name: str, lease_value: str, snapshot: KVSnapshot, *, keep_kv: bool, reason: str = ""
    ) -> SavedSnapshot | None:
        """Write and commit the agent's KV snapshot; None when the lease is not ours."""
        return await self.snapshots.save(
            name, lease_value, snapshot, keep_kv=keep_kv, reason=reason
        )

    @translate
    async def load_snapshot(self, name: str) -> LoadedSnapshot:
        """Read and verify the agent's snapshot (invalid ones come back with a reason)."""
        return await self.snapshots.load(name)

    @translate
    async def snapshot_manifest(self, name: str) -> Manifest | None:
        """The committed snapshot's manifest, or None."""
        return await self.snapshots.manifest(name)

    # ---------------------------------------------------------------- namespace

    @translate
    async def namespace_keys(self) -> list[str]:
        """Every key of this namespace (for tests and `agentos` diagnostics)."""
        return sorted(
            [_s(k) async for k in self._r.scan_iter(match=f"{self.keys.namespace}:*", count=1000)]
        )

    @translate
    async def drop_namespace(self) -> int:
        """Delete every key of this namespace; returns how many. For tests and resets."""
        keys = [k async for k in self._r.scan_iter(match=f"{self.keys.namespace}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await self._r.delete(*keys[i : i + 500])
        return len(keys)
