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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from redis import exceptions as rexc
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentos.store import legacy_kv, transition
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


_F = TypeVar("_F")


class _Moved(Generic[_F]):
    """TODO(#26 sweep): an old flat name's type, for the type checker only."""

    def __init__(self, get: Callable[[Store], _F]) -> None:
        self._get = get

    def __get__(self, obj: Store, owner: type[Store]) -> _F:
        return self._get(obj)


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
        # TODO(#26 sweep): tests read and write through the raw client; they should
        # use ``store.conn.r``.
        self._r = conn.r
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
        await self._r.aclose()

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

    # ---------------------------------------------------------------- TODO(#26 sweep)
    # The old flat names, for the type checker: each is what ``__getattr__`` returns.
    if TYPE_CHECKING:
        acquire_lease = _Moved(lambda s: s.leases.acquire_lease)
        acquire_leases = _Moved(lambda s: s.leases.acquire_leases)
        agent_spec = _Moved(lambda s: s.specs.agent_spec)
        agent_specs = _Moved(lambda s: s.specs.agent_specs)
        agent_specs_of = _Moved(lambda s: s.specs.agent_specs_of)
        append_logs = _Moved(lambda s: s.logs.append_logs)
        apply = _Moved(lambda s: s.specs.apply)
        budget_warn_once = _Moved(lambda s: s.quotas.budget_warn_once)
        claim_inbox = _Moved(lambda s: s.inbox.claim_inbox)
        daemons = _Moved(lambda s: s.heartbeats.daemons)
        dead_letter = _Moved(lambda s: s.poison.dead_letter)
        dead_letters = _Moved(lambda s: s.poison.dead_letters)
        delete = _Moved(lambda s: s.specs.delete)
        desired_index = _Moved(lambda s: s.specs.desired_index)
        drop_message = _Moved(lambda s: s.poison.drop_message)
        due_claim = _Moved(lambda s: s.waits.due_claim)
        due_count = _Moved(lambda s: s.waits.due_count)
        due_defer = _Moved(lambda s: s.waits.due_defer)
        due_head = _Moved(lambda s: s.waits.due_head)
        due_now = _Moved(lambda s: s.waits.due_now)
        due_release = _Moved(lambda s: s.waits.due_release)
        due_scan = _Moved(lambda s: s.waits.due_scan)
        due_unclaim = _Moved(lambda s: s.waits.due_unclaim)
        ensure_inbox = _Moved(lambda s: s.inbox.ensure_inbox)
        fenced_status_batch = _Moved(lambda s: s.writes.fenced_status_batch)
        forget_daemon = _Moved(lambda s: s.heartbeats.forget_daemon)
        generation = _Moved(lambda s: s.specs.generation)
        heartbeat = _Moved(lambda s: s.heartbeats.heartbeat)
        held_add = _Moved(lambda s: s.waits.held_add)
        held_counts = _Moved(lambda s: s.waits.held_counts)
        held_remove = _Moved(lambda s: s.waits.held_remove)
        holders = _Moved(lambda s: s.waits.holders)
        idempotency_done = _Moved(lambda s: s.tasks.idempotency_done)
        inbox_depth = _Moved(lambda s: s.inbox.inbox_depth)
        inbox_has = _Moved(lambda s: s.inbox.inbox_has)
        inbox_lengths = _Moved(lambda s: s.inbox.inbox_lengths)
        index_of = _Moved(lambda s: s.specs.index_of)
        is_holder = _Moved(lambda s: s.waits.is_holder)
        last_signal_id = _Moved(lambda s: s.signals.last_signal_id)
        lease_keeper = _Moved(lambda s: s.leases.lease_keeper)
        leave_holders = _Moved(lambda s: s.waits.leave_holders)
        load_state = _Moved(lambda s: s.agents.load_state)
        logs_after = _Moved(lambda s: s.logs.logs_after)
        mark_cancel = _Moved(lambda s: s.tasks.mark_cancel)
        model_throttle = _Moved(lambda s: s.models.model_throttle)
        model_throttled_until = _Moved(lambda s: s.models.model_throttled_until)
        open_agent = _Moved(lambda s: s.takeover.open_agent)
        open_agents = _Moved(lambda s: s.takeover.open_agents)
        pending_purges = _Moved(lambda s: s.specs.pending_purges)
        pending_waits = _Moved(lambda s: s.waits.pending_waits)
        policies = _Moved(lambda s: s.specs.policies)
        purge_agent = _Moved(lambda s: s.specs.purge_agent)
        purge_waits = _Moved(lambda s: s.waits.purge_waits)
        quota_add_cost = _Moved(lambda s: s.quotas.quota_add_cost)
        quota_admit = _Moved(lambda s: s.quotas.quota_admit)
        quota_admit_many = _Moved(lambda s: s.quotas.quota_admit_many)
        quota_budget_used = _Moved(lambda s: s.quotas.quota_budget_used)
        quota_charge_seconds = _Moved(lambda s: s.quotas.quota_charge_seconds)
        quota_cost_used = _Moved(lambda s: s.quotas.quota_cost_used)
        quota_effective = _Moved(lambda s: s.quotas.quota_effective)
        quota_evaluator_lease = _Moved(lambda s: s.quotas.quota_evaluator_lease)
        quota_evaluator_release = _Moved(lambda s: s.quotas.quota_evaluator_release)
        quota_publish = _Moved(lambda s: s.quotas.quota_publish)
        quota_renew = _Moved(lambda s: s.quotas.quota_renew)
        quota_report = _Moved(lambda s: s.quotas.quota_report)
        quota_reports = _Moved(lambda s: s.quotas.quota_reports)
        quota_settle = _Moved(lambda s: s.quotas.quota_settle)
        quota_state = _Moved(lambda s: s.quotas.quota_state)
        quota_unqueue = _Moved(lambda s: s.quotas.quota_unqueue)
        quota_usage = _Moved(lambda s: s.quotas.quota_usage)
        read_inbox = _Moved(lambda s: s.inbox.read_inbox)
        read_signals = _Moved(lambda s: s.signals.read_signals)
        record_agent_event = _Moved(lambda s: s.events.record_agent_event)
        record_fleet_event = _Moved(lambda s: s.events.record_fleet_event)
        recover_held = _Moved(lambda s: s.waits.recover_held)
        redrive = _Moved(lambda s: s.poison.redrive)
        release_lease = _Moved(lambda s: s.leases.release_lease)
        renew_leases = _Moved(lambda s: s.leases.renew_leases)
        send = _Moved(lambda s: s.inbox.send)
        server_time = _Moved(lambda s: s.heartbeats.server_time)
        set_task_outcome = _Moved(lambda s: s.tasks.set_task_outcome)
        signal = _Moved(lambda s: s.signals.signal)
        signal_groups = _Moved(lambda s: s.signals.signal_groups)
        snapshot_manifest = _Moved(lambda s: s.snapshots.manifest)
        status = _Moved(lambda s: s.agents.status)
        statuses = _Moved(lambda s: s.agents.statuses)
        still_held = _Moved(lambda s: s.waits.still_held)
        task = _Moved(lambda s: s.tasks.task)
        toolservers = _Moved(lambda s: s.specs.toolservers)
        trim_tasks = _Moved(lambda s: s.tasks.trim_tasks)
        trim_tasks_many = _Moved(lambda s: s.tasks.trim_tasks_many)
        upgrade_layout = _Moved(lambda s: s.specs.upgrade_layout)
        wait_answer = _Moved(lambda s: s.waits.wait_answer)
        wait_arm = _Moved(lambda s: s.waits.wait_arm)
        wait_clear = _Moved(lambda s: s.waits.wait_clear)
        wait_event = _Moved(lambda s: s.waits.wait_event)
        wait_get = _Moved(lambda s: s.waits.wait_get)
        wait_park = _Moved(lambda s: s.waits.wait_park)
        wake = _Moved(lambda s: s.waits.wake)
        fenced_write = _Moved(lambda s: transition.FencedWriteFields(s.writes))

    async def save_snapshot(
        self,
        name: str,
        lease_value: str,
        snapshot: legacy_kv.KVSnapshot,
        *,
        keep_kv: bool,
        reason: str = "",
    ) -> SavedSnapshot | None:
        """Old call: :func:`agentos.store.legacy_kv.save_snapshot` (``store.snapshots.save``)."""
        return await legacy_kv.save_snapshot(
            self.snapshots, name, lease_value, snapshot, keep_kv=keep_kv, reason=reason
        )

    async def load_snapshot(self, name: str) -> legacy_kv.LoadedKV:
        """Old call: :func:`agentos.store.legacy_kv.load_snapshot` (``store.snapshots.load``)."""
        return await legacy_kv.load_snapshot(self.snapshots, name)

    def __getattr__(self, name: str) -> Any:
        """Old flat method names, forwarded to the repository that owns them now
        (:data:`agentos.store.transition.MOVED`)."""
        if name == "fenced_write":  # its fields as keywords: one Write now
            return transition.FencedWriteFields(self.writes)
        if name in transition.SCRIPTS:  # tests name the scripts' SHAs by the old names
            return getattr(self.conn.scripts, transition.SCRIPTS[name])
        moved = transition.MOVED.get(name)
        if moved is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        repo, method = moved
        return getattr(self.__dict__[repo], method)
