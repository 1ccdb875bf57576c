"""The Redis control plane: every read and write agentos makes, and the only redis import.

Everything a daemon needs to resume lives here: desired specs, agent status, leases
with fencing tokens, event streams, durable agent state, inboxes and hibernated KV.
Callers get plain Python values and three exception types (:class:`StoreUnavailable`
when the server cannot be reached, :class:`StoreFull` when it refuses writes at
``maxmemory``, :class:`StoreError` for anything else), never a redis-py type, so the
rest of the code base does not depend on the client library. Nothing here retries:
:mod:`agentos.store.retry` is the one retry policy, for operations safe to repeat.

The operations are split by job into small repositories over one shared connection
(:class:`~agentos.store.conn.Conn`: client, keys, scripts, batcher), which :class:`Store`
builds and holds as attributes: ``specs`` (desired state), ``writes`` (fenced writes),
``agents`` (status, state), ``events``, ``usage``, ``inbox``, ``poison`` (dead letters,
drops, re-drives), ``tasks`` (task records), ``takeover`` (what a new owner reads),
``leases``, ``signals``, ``heartbeats``, ``waits`` (parked waits, the due-time index,
held sets), ``quotas``, ``models``, ``logs`` and ``snapshots`` (hibernated KV). The
values they take and return are in :mod:`~agentos.store.records`.
"""

from __future__ import annotations

from redis import exceptions as rexc
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentos.store.agents import Agents
from agentos.store.clusterclient import AgentosCluster
from agentos.store.conn import Conn
from agentos.store.errors import (
    InboxFull,
    SendConflict,
    SendRefused,
    StoreError,
    StoreFull,
    StoreUnavailable,
    translate,
)
from agentos.store.errors import reason as _reason
from agentos.store.events import Events
from agentos.store.heartbeats import Heartbeats
from agentos.store.inbox import SEND_DEDUPE_TTL_S as SEND_DEDUPE_TTL_S
from agentos.store.inbox import Inbox
from agentos.store.keys import INBOX_GROUP, Keys
from agentos.store.kvformat import SnapshotHeader
from agentos.store.leases import Leases
from agentos.store.logs import LogLine, Logs
from agentos.store.models import Models
from agentos.store.poison import DEAD_LETTERS_KEPT as DEAD_LETTERS_KEPT
from agentos.store.poison import DeadLetter, Poison
from agentos.store.quota import AdmitReply, AdmitRequest, ClassUsage, Quotas
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
from agentos.store.signals import Signals
from agentos.store.snapshots import LoadedSnapshot, Manifest, SavedSnapshot, Snapshots
from agentos.store.specs import Specs
from agentos.store.takeover import UNFINISHED_SCAN as UNFINISHED_SCAN
from agentos.store.takeover import Takeover
from agentos.store.tasks import Tasks
from agentos.store.urls import redact_url
from agentos.store.usage import Usage
from agentos.store.waits import EventsFull, Waits
from agentos.store.writes import DUPLICATE, Duplicate, Write, Writes
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
    "SnapshotHeader",
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


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


class Store:
    """Async access to one agentos namespace on one Redis server or one Redis Cluster:
    the shared connection, the repositories over it, and its lifecycle.

    Create with :meth:`connect`; close with :meth:`close` (or ``async with``).
    """

    def __init__(
        self, client: Redis | RedisCluster, keys: Keys, display_url: str, *, cluster: bool
    ) -> None:
        conn = Conn(client, keys, display_url, cluster=cluster)
        self.conn = conn
        self.specs = Specs(conn)
        self.writes = Writes(conn)
        self.agents = Agents(conn)
        self.events = Events(conn)
        self.usage = Usage(conn)
        self.inbox = Inbox(conn)
        self.poison = Poison(conn)
        self.tasks = Tasks(conn)
        self.takeover = Takeover(conn, self.inbox)
        self.leases = Leases(conn)
        self.signals = Signals(conn)
        self.heartbeats = Heartbeats(conn)
        self.waits = Waits(conn)
        self.quotas = Quotas(conn)
        self.models = Models(conn)
        self.logs = Logs(conn)
        self.snapshots = Snapshots(conn)

    @property
    def keys(self) -> Keys:
        return self.conn.keys

    @property
    def display_url(self) -> str:
        return self.conn.display_url

    @property
    def cluster(self) -> bool:
        return self.conn.cluster

    @property
    def retention(self) -> Retention:
        """How long task records and usage are kept (the daemon sets it from its settings)."""
        return self.conn.retention

    @retention.setter
    def retention(self, value: Retention) -> None:
        self.conn.retention = value

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
            pool = BlockingConnectionPool.from_url(
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
            client = Redis.from_pool(pool)
        except ValueError as e:
            raise StoreUnavailable(f"invalid Redis URL {shown}: {e}") from None
        store = cls(client, Keys(namespace), shown, cluster=False)
        if check:
            try:
                await store.ping()
                await store.conn.check_not_cluster()
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
            await store.conn.initialize_cluster()
            if check:
                await store.ping()
        except StoreError:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.conn.r.aclose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def ping(self) -> None:
        """Round trip to the server; raises StoreUnavailable when it is not there."""
        await self.conn.ping()

    @translate
    async def command_calls(self) -> dict[str, int]:
        """Calls per command since the server started (``INFO commandstats``; commands a
        script runs count too). For benchmarks and tests that pin round trips."""
        if not self.cluster:
            info = await self.conn.r.info("commandstats")
            return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}
        # Summed over the masters (a replica's replication stream is not a client call).
        per_node = await self.conn.r.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
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
            return int((await self.conn.r.info("memory"))["used_memory"])
        per_node = await self.conn.r.info("memory", target_nodes=RedisCluster.PRIMARIES)
        return sum(int(info["used_memory"]) for info in per_node.values())

    @translate
    async def key_idle_s(self, key: str) -> int:
        """Seconds since any command last read or wrote ``key`` (``OBJECT IDLETIME``)."""
        return int(await self.conn.r.object("idletime", key))

    # ---------------------------------------------------------------- namespace

    @translate
    async def namespace_keys(self) -> list[str]:
        """Every key of this namespace (for tests and `agentos` diagnostics)."""
        return sorted(
            [
                _s(k)
                async for k in self.conn.r.scan_iter(match=f"{self.keys.namespace}:*", count=1000)
            ]
        )

    @translate
    async def drop_namespace(self) -> int:
        """Delete every key of this namespace; returns how many. For tests and resets."""
        keys = [
            k async for k in self.conn.r.scan_iter(match=f"{self.keys.namespace}:*", count=1000)
        ]
        for i in range(0, len(keys), 500):
            await self.conn.r.delete(*keys[i : i + 500])
        return len(keys)
