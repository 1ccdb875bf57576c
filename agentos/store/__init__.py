"""The Redis control plane: every read and write agentos makes, and the only redis import.

Everything a daemon needs to resume lives here: desired specs, agent status, leases
with fencing tokens, event streams, durable agent state, inboxes and hibernated KV.
Callers get plain Python values and three exception types (:class:`StoreUnavailable`
when the server cannot be reached, :class:`StoreFull` when it refuses writes at
``maxmemory``, :class:`StoreError` for anything else), never a redis-py type, so the
rest of the code base does not depend on the client library. Nothing here retries:
:mod:`agentos.store.retry` is the one retry policy, for operations safe to repeat.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from agentos.engine.base import KVSnapshot
from agentos.store.errors import StoreError, StoreFull, StoreUnavailable, translate
from agentos.store.errors import reason as _reason
from agentos.store.keys import INBOX_GROUP, Keys
from agentos.store.keys import event_fields as _event_fields
from agentos.store.quota import AdmitReply, AdmitRequest, ClassUsage, QuotaOps
from agentos.store.snapshots import LoadedSnapshot, Manifest, SavedSnapshot, Snapshots
from agentos.store.urls import redact_url

__all__ = [
    "INBOX_GROUP",
    "AdmitReply",
    "AdmitRequest",
    "AgentSnapshot",
    "AppliedChange",
    "ClassUsage",
    "Event",
    "InboxMessage",
    "Keys",
    "LeaseInfo",
    "LoadedSnapshot",
    "Manifest",
    "Retention",
    "SavedSnapshot",
    "SpecRecord",
    "StatusUpdate",
    "Store",
    "StoreError",
    "StoreFull",
    "StoreUnavailable",
    "TaskWrite",
    "redact_url",
]

EVENTS_MAXLEN = 1000
OP_IDS_KEPT = 64  # a retry must come before this many later writes of the same agent
OP_IDS_TTL_S = 3600
SEND_DEDUPE_TTL_S = 3600  # a send retried later than this is a new message
USAGE_RETENTION_S = 400 * 86_400.0
TASK_RETENTION_S = 7 * 86_400.0
UNFINISHED_SCAN = 200  # recent task records a new owner looks at for interrupted work
FLEET_EVENTS_MAXLEN = 10_000
SIGNALS_MAXLEN = 10_000


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class SpecRecord:
    """One validated resource ready to store: canonical JSON plus what the index needs."""

    kind: str  # "Agent" or "QuotaPolicy"
    name: str
    body: str  # canonical JSON
    spec_hash: str
    priority: int = 50


@dataclass(frozen=True, slots=True)
class AppliedChange:
    """What apply did (or would do) to one resource: created, configured or unchanged."""

    kind: str
    name: str
    action: str
    fields: tuple[str, ...] = ()  # for "configured": the paths that changed


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """Who holds an agent's lease and for how many more milliseconds."""

    owner: str
    token: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of an agent's or the fleet's event stream."""

    id: str
    agent: str
    time: float
    type: str
    reason: str
    message: str
    daemon: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON and YAML output."""
        return {
            "time": self.time,
            "agent": self.agent,
            "type": self.type,
            "reason": self.reason,
            "message": self.message,
            "daemon": self.daemon,
        }


@dataclass(frozen=True, slots=True)
class TaskWrite:
    """A task record update that rides along with a fenced write.

    ``created_at`` (on the first write) indexes the task; ``idempotency_key`` marks the
    key as completed, in the same atomic step as the state and the inbox ack.
    """

    id: str
    fields: Mapping[str, object]
    created_at: float | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """What a daemon reads when it takes an agent: status, state, its pending messages."""

    status: dict[str, str]
    state: bytes | None
    pending: list[InboxMessage]
    claimed: int
    schedule: dict[str, float] = field(default_factory=dict)  # trigger index -> next fire
    unfinished: list[dict[str, str]] = field(default_factory=list)  # queued/running records


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """A message waiting in an agent's inbox."""

    id: str
    body: str
    key: str | None
    sent_at: float
    traceparent: str | None
    deliveries: int = 1


StatusUpdate = tuple[str, str, Mapping[str, object], tuple[str, Mapping[str, float]], str | None]
"""One entry of :meth:`Store.fenced_status_batch`: (agent, lease, fields, usage, op id)."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long data with a lifetime lives in Redis, in seconds.

    Usage hashes and the usage-days set are kept ``usage_s`` after their last write; task
    records and idempotency keys ``tasks_s`` (trimming removes them earlier; the TTL is
    the bound when trimming never runs). The daemon sets it from its settings.
    """

    usage_s: float = USAGE_RETENTION_S
    tasks_s: float = TASK_RETENTION_S


def _load_script(name: str) -> str:
    return resources.files("agentos.store").joinpath("lua", f"{name}.lua").read_text()


class Store(QuotaOps):
    """Async access to one agentos namespace on one Redis server.

    Create with :meth:`connect`; close with :meth:`close` (or ``async with``).
    """

    def __init__(self, client: aredis.Redis, keys: Keys, display_url: str) -> None:
        # redis-py's asyncio stubs type replies as unions of everything; this module
        # is the typed boundary, so the client is Any here and results are converted.
        self._r: Any = client
        self.keys = keys
        self.display_url = display_url
        self._acquire = client.register_script(_load_script("lease_acquire"))
        self._renew = client.register_script(_load_script("lease_renew"))
        self._release = client.register_script(_load_script("lease_release"))
        self._fenced = client.register_script(_load_script("fenced_ops"))
        self._send_once = client.register_script(_load_script("inbox_send"))
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
        password. Raises :class:`StoreUnavailable` naming the (redacted) URL when the
        server cannot be reached or refuses the credentials.
        """
        shown = redact_url(url)
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
        store = cls(client, Keys(namespace), shown)
        if check:
            try:
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

    # ---------------------------------------------------------------- desired state

    @translate
    async def apply(
        self, records: Sequence[SpecRecord], *, dry_run: bool = False
    ) -> list[AppliedChange]:
        """Store every record in one transaction, or none of them.

        Returns, per record, whether it was created, configured (changed) or left
        unchanged. With ``dry_run`` nothing is written. Bumps the fleet generation and
        signals the daemons when anything changed.
        """
        k = self.keys
        agents = [r for r in records if r.kind == "Agent"]
        policies = [r for r in records if r.kind == "QuotaPolicy"]
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(k.generation, k.deleted)
                    current_agents = (
                        await pipe.hmget(k.index, [r.name for r in agents]) if agents else []
                    )
                    current_policies = (
                        await pipe.hmget(k.policies, [r.name for r in policies]) if policies else []
                    )
                    changes: list[AppliedChange] = []
                    for rec, cur in zip(agents, current_agents, strict=True):
                        old_hash = _s(cur).split(" ")[0] if cur else None
                        changes.append(
                            AppliedChange(rec.kind, rec.name, _verdict(old_hash, rec.spec_hash))
                        )
                    for rec, cur in zip(policies, current_policies, strict=True):
                        old_hash = json.loads(cur).get("_hash") if cur else None
                        changes.append(
                            AppliedChange(rec.kind, rec.name, _verdict(old_hash, rec.spec_hash))
                        )
                    touched = [c for c in changes if c.action != "unchanged"]
                    if dry_run or not touched:
                        await pipe.unwatch()
                        return changes
                    # An agent deleted and created again starts afresh, not with the old
                    # one's state: its old keys go in the same transaction as the new
                    # spec, so no daemon can start it on the old state in between.
                    created = {
                        c.name for c in touched if c.kind == "Agent" and c.action == "created"
                    }
                    stale = created & {_s(n) for n in await pipe.smembers(k.deleted)}
                    purge: list[str] = []
                    for name in sorted(stale):
                        purge += await self._purge_keys(pipe, name)
                    pipe.multi()
                    if stale:
                        self._queue_purge(pipe, sorted(stale), purge)
                    now = time.time()
                    by_name = {(r.kind, r.name): r for r in records}
                    for change in touched:
                        rec = by_name[(change.kind, change.name)]
                        if rec.kind == "Agent":
                            pipe.hset(k.specs, rec.name, rec.body)
                            pipe.hset(k.index, rec.name, f"{rec.spec_hash} {rec.priority}")
                        else:
                            body = json.loads(rec.body)
                            body["_hash"] = rec.spec_hash
                            pipe.hset(k.policies, rec.name, json.dumps(body))
                        pipe.xadd(
                            k.fleet_events,
                            _event_fields(
                                rec.name,
                                now,
                                "Applied",
                                change.action,
                                f"{rec.kind} {change.action}",
                                "",
                            ),
                            maxlen=FLEET_EVENTS_MAXLEN,
                            approximate=True,
                        )
                    pipe.incr(k.generation)
                    pipe.xadd(
                        k.signals,
                        {"cmd": "applied", "agent": ""},
                        maxlen=SIGNALS_MAXLEN,
                        approximate=True,
                    )
                    await pipe.execute()
                    break
                except rexc.WatchError:
                    continue
        return changes

    @translate
    async def delete(self, kind: str, name: str, *, purge_if_unowned: bool = True) -> bool:
        """Remove a resource from the desired state. Returns False if it did not exist.

        For an agent that no daemon holds, its keys (status, state, events, inbox,
        KV) go too; an owned agent's daemon stops it and removes them.
        """
        k = self.keys
        if kind == "QuotaPolicy":
            removed = await self._r.hdel(k.policies, name)
            if removed:
                await self._r.incr(k.generation)
            return bool(removed)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hdel(k.specs, name)
            pipe.hdel(k.index, name)
            pipe.sadd(k.deleted, name)
            pipe.incr(k.generation)
            pipe.xadd(
                k.signals,
                {"cmd": "deleted", "agent": name},
                maxlen=SIGNALS_MAXLEN,
                approximate=True,
            )
            pipe.xadd(
                k.fleet_events,
                _event_fields(name, time.time(), "Deleted", "delete", "Agent deleted", ""),
                maxlen=FLEET_EVENTS_MAXLEN,
                approximate=True,
            )
            removed, *_ = await pipe.execute()
        if removed and purge_if_unowned and not await self._r.exists(k.lease(name)):
            await self.purge_agent(name)
        return bool(removed)

    @translate
    async def purge_agent(self, name: str) -> bool:
        """Delete every runtime key of a deleted agent, snapshot and tasks included, in one
        transaction. Returns False, deleting nothing, when the agent is not deleted (any
        more): not listed in ``deleted``, or it has a spec again.

        A deleted agent's runner purges after its ``on_stop`` and grace period; by then
        the agent may have been applied again (``apply`` purged the old keys itself), and
        the keys are the new agent's. Safe to retry: once purged, it is no longer listed.
        """
        k = self.keys
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(k.deleted, k.specs)
                    listed = await pipe.sismember(k.deleted, name)
                    if not listed or await pipe.hexists(k.specs, name):
                        await pipe.unwatch()
                        return False
                    keys = await self._purge_keys(pipe, name)
                    pipe.multi()
                    self._queue_purge(pipe, [name], keys)
                    await pipe.execute()
                    return True
                except rexc.WatchError:
                    continue

    async def _purge_keys(self, pipe: Any, name: str) -> list[str]:
        """WATCH what lists an agent's keys and read them: every key a purge deletes."""
        k = self.keys
        listing = [k.usage_days(name), k.tasks(name), k.kv_manifest(name), k.kv_pending(name)]
        await pipe.watch(*listing)
        days = [_s(d) for d in await pipe.smembers(k.usage_days(name))]
        ids = [_s(i) for i in await pipe.zrange(k.tasks(name), 0, -1)]
        manifest_raw, pending_raw = await pipe.mget([k.kv_manifest(name), k.kv_pending(name)])
        return [
            *self.snapshots.keys_of(name, manifest_raw, pending_raw),
            *(k.usage(name, d) for d in days),
            *(k.task(name, t) for t in ids),
            *k.agent_keys(name),
        ]

    def _queue_purge(self, pipe: Any, names: Sequence[str], keys: Sequence[str]) -> None:
        # One transaction over the agent's slot and {fleet}: fine on a single Redis; on
        # Redis Cluster it has to be split per slot (the Cluster issue).
        for i in range(0, len(keys), 500):
            pipe.delete(*keys[i : i + 500])
        pipe.srem(self.keys.deleted, *names)

    @translate
    async def pending_purges(self) -> set[str]:
        """Deleted agents whose runtime keys are still there."""
        return {_s(n) for n in await self._r.smembers(self.keys.deleted)}

    @translate
    async def generation(self) -> int:
        """The fleet's desired-state generation; moves on every apply and delete."""
        return int(await self._r.get(self.keys.generation) or 0)

    @translate
    async def desired_index(self) -> dict[str, tuple[str, int]]:
        """Agent name -> (spec hash, priority), for every applied agent."""
        raw = await self._r.hgetall(self.keys.index)
        out: dict[str, tuple[str, int]] = {}
        for name, value in raw.items():
            spec_hash, _, prio = _s(value).partition(" ")
            out[_s(name)] = (spec_hash, int(prio or 50))
        return out

    @translate
    async def agent_spec(self, name: str) -> dict[str, Any] | None:
        """The stored canonical Agent resource, or None when not applied."""
        raw = await self._r.hget(self.keys.specs, name)
        return json.loads(raw) if raw else None

    @translate
    async def agent_specs(self) -> dict[str, dict[str, Any]]:
        """Every stored Agent resource by name."""
        raw = await self._r.hgetall(self.keys.specs)
        return {_s(n): json.loads(v) for n, v in raw.items()}

    @translate
    async def policies(self) -> dict[str, dict[str, Any]]:
        """Every stored QuotaPolicy resource by name."""
        raw = await self._r.hgetall(self.keys.policies)
        out = {}
        for n, v in raw.items():
            body = json.loads(v)
            body.pop("_hash", None)
            out[_s(n)] = body
        return out

    # ---------------------------------------------------------------- signals

    @translate
    async def signal(self, cmd: str, agent: str, **fields: str) -> None:
        """Nudge the daemons: ``cmd`` is wake, hibernate, message, applied or deleted."""
        await self._r.xadd(
            self.keys.signals,
            {"cmd": cmd, "agent": agent, **fields},
            maxlen=SIGNALS_MAXLEN,
            approximate=True,
        )

    @translate
    async def last_signal_id(self) -> str:
        """The id of the newest signal ("0-0" if none): where a new reader starts."""
        entries = await self._r.xrevrange(self.keys.signals, count=1)
        return _s(entries[0][0]) if entries else "0-0"

    @translate
    async def read_signals(
        self, after_id: str, *, block_ms: int = 1000, count: int = 1000
    ) -> list[tuple[str, dict[str, str]]]:
        """Signals newer than ``after_id``, waiting up to ``block_ms`` for the first."""
        reply = await self._r.xread({self.keys.signals: after_id}, count=count, block=block_ms)
        out: list[tuple[str, dict[str, str]]] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                out.append((_s(entry_id), {_s(a): _s(b) for a, b in fields.items()}))
        return out

    # ---------------------------------------------------------------- leases

    @translate
    async def acquire_lease(self, name: str, daemon_id: str, ttl_ms: int) -> int:
        """Take (or extend our own) lease on an agent. Returns the fencing token, 0 if taken."""
        k = self.keys
        token = await self._acquire(keys=[k.lease(name), k.fence(name)], args=[daemon_id, ttl_ms])
        return int(token)

    @translate
    async def acquire_leases(
        self, names: Sequence[str], daemon_id: str, ttl_ms: int
    ) -> dict[str, int]:
        """:meth:`acquire_lease` for many agents in one pipeline; returns the tokens (0 = taken)."""
        if not names:
            return {}
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                await self._acquire(
                    keys=[k.lease(name), k.fence(name)], args=[daemon_id, ttl_ms], client=pipe
                )
            tokens = await pipe.execute()
        return {name: int(t) for name, t in zip(names, tokens, strict=True)}

    @translate
    async def agent_specs_of(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored Agent resources of ``names`` (missing ones are left out)."""
        if not names:
            return {}
        raw = await self._r.hmget(self.keys.specs, list(names))
        return {n: json.loads(v) for n, v in zip(names, raw, strict=True) if v is not None}

    @translate
    async def renew_leases(self, held: Mapping[str, str], ttl_ms: int) -> dict[str, bool]:
        """Extend many leases in one pipeline; ``held`` maps agent -> "daemon|token".

        Returns agent -> whether the lease is still ours.
        """
        if not held:
            return {}
        names = list(held)
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                await self._renew(
                    keys=[self.keys.lease(name)], args=[held[name], ttl_ms], client=pipe
                )
            results = await pipe.execute()
        return {name: bool(ok) for name, ok in zip(names, results, strict=True)}

    @translate
    async def release_lease(self, name: str, value: str) -> bool:
        """Give up a lease we hold. Returns False when it was no longer ours."""
        return bool(await self._release(keys=[self.keys.lease(name)], args=[value]))

    @translate
    async def leases(self, names: Iterable[str]) -> dict[str, LeaseInfo]:
        """Current lease holders of ``names`` (agents without a lease are left out)."""
        names = list(names)
        if not names:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(self.keys.lease(name))
                pipe.pttl(self.keys.lease(name))
            raw = await pipe.execute()
        out: dict[str, LeaseInfo] = {}
        for i, name in enumerate(names):
            value, ttl = raw[2 * i], raw[2 * i + 1]
            if value is None:
                continue
            owner, _, token = _s(value).rpartition("|")
            out[name] = LeaseInfo(owner, int(token or 0), int(ttl))
        return out

    # ---------------------------------------------------------------- status, events, state

    def _ops(
        self,
        name: str,
        *,
        status: Mapping[str, object] | None = None,
        clear: Sequence[str] = (),
        event_json: str | None = None,
        state: bytes | None = None,
        ack_id: str | None = None,
        task: TaskWrite | None = None,
        schedule: Mapping[str, float] | None = None,
        usage: tuple[str, Mapping[str, float]] | None = None,
        release: bool = False,
        op_id: str | None = None,
    ) -> tuple[list[str], list[str | bytes]]:
        """KEYS and ARGV (after the lease value) for one fenced write (see fenced_ops.lua)."""
        k = self.keys
        keys = [k.lease(name), k.ops(name)]
        ops: list[list[object]] = []
        tasks_ttl = str(max(1, math.ceil(self.retention.tasks_s)))
        usage_ttl = str(max(1, math.ceil(self.retention.usage_s)))

        def key(name_: str) -> int:
            if name_ not in keys:
                keys.append(name_)
            return keys.index(name_) + 1

        if status:
            flat: list[object] = ["HSET", key(k.status(name))]
            for f, v in status.items():
                flat += [f, str(v)]
            ops.append(flat)
        if clear:
            ops.append(["HDEL", key(k.status(name)), *clear])
        if event_json is not None:
            stream = key(k.events(name))
            ops.append(["XADD", stream, "MAXLEN", "~", EVENTS_MAXLEN, "*", "event", event_json])
            ops.append(
                [
                    "XADD",
                    key(k.fleet_events),
                    "MAXLEN",
                    "~",
                    FLEET_EVENTS_MAXLEN,
                    "*",
                    "agent",
                    name,
                    "event",
                    event_json,
                ]
            )
        if state is not None:
            ops.append(["SET", key(k.state(name)), {"argv": 3}])
        if ack_id:
            # An acknowledged message is gone: inboxes hold only work not yet done.
            ops.append(["XACK", key(k.inbox(name)), INBOX_GROUP, ack_id])
            ops.append(["XDEL", key(k.inbox(name)), ack_id])
        if task is not None:
            flat = ["HSET", key(k.task(name, task.id))]
            for f, v in task.fields.items():
                flat += [f, str(v)]
            ops.append(flat)
            # Records vanish after the retention even if trimming never runs.
            ops.append(["EXPIRE", key(k.task(name, task.id)), tasks_ttl])
            if task.created_at is not None:
                ops.append(["ZADD", key(k.tasks(name)), repr(task.created_at), task.id])
                ops.append(["EXPIRE", key(k.tasks(name)), tasks_ttl])
            if task.idempotency_key:
                ops.append(
                    ["ZADD", key(k.idempotency(name)), repr(time.time()), task.idempotency_key]
                )
                ops.append(["EXPIRE", key(k.idempotency(name)), tasks_ttl])
        if schedule:
            flat = ["HSET", key(k.schedule(name))]
            for f, at in schedule.items():
                flat += [f, repr(at)]
            ops.append(flat)
        if usage is not None:
            day, amounts = usage
            for f, amount in amounts.items():
                if amount:
                    ops.append(["HINCRBYFLOAT", key(k.usage(name, day)), f, repr(float(amount))])
            ops.append(["SADD", key(k.usage_days(name)), day])
            ops.append(["EXPIRE", key(k.usage(name, day)), usage_ttl])
            ops.append(["EXPIRE", key(k.usage_days(name)), usage_ttl])
        if release:
            ops.append(["DEL", key(k.lease(name))])
        encoded = json.dumps([[str(a) if not isinstance(a, dict) else a for a in op] for op in ops])
        return keys, [
            encoded,
            state if state is not None else b"",
            op_id or "",
            str(OP_IDS_KEPT),
            str(OP_IDS_TTL_S),
        ]

    @translate
    async def fenced_write(
        self,
        name: str,
        lease_value: str,
        *,
        status: Mapping[str, object] | None = None,
        clear: Sequence[str] = (),
        event: Mapping[str, str] | None = None,
        state: bytes | None = None,
        ack_id: str | None = None,
        task: TaskWrite | None = None,
        schedule: Mapping[str, float] | None = None,
        usage: tuple[str, Mapping[str, float]] | None = None,
        release: bool = False,
        op_id: str | None = None,
    ) -> bool:
        """Write status fields, an event (with its copy in the fleet feed), the durable
        state, an inbox ack, a task record and schedule times atomically.

        Happens only while ``lease_value`` is still the agent's lease; returns False
        (and writes nothing) when it is not. With ``release`` the lease is dropped in
        the same step (a clean stop). With ``op_id`` (see :func:`agentos.store.retry.new_op_id`)
        the write is applied at most once: a repeat of one of the agent's recent op ids
        returns True without applying anything or looking at the lease, so a retry after
        a lost reply is safe.
        """
        event_json = json.dumps(dict(event)) if event is not None else None
        keys, ops = self._ops(
            name,
            status=status,
            clear=clear,
            event_json=event_json,
            state=state,
            ack_id=ack_id,
            task=task,
            schedule=schedule,
            usage=usage,
            release=release,
            op_id=op_id,
        )
        return bool(await self._fenced(keys=keys, args=[lease_value, *ops]))

    @translate
    async def fenced_status_batch(self, updates: Sequence[StatusUpdate]) -> list[bool]:
        """Many fenced status + usage writes in one pipeline:
        (agent, lease, fields, usage, op id) each.

        Returns, per update, whether it is applied (False: the lease is not the caller's).
        With an op id each update is applied at most once, so a batch whose reply was lost
        can be sent again unchanged.
        """
        if not updates:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for name, lease_value, fields, usage, op_id in updates:
                keys, ops = self._ops(name, status=fields, usage=usage, op_id=op_id)
                await self._fenced(keys=keys, args=[lease_value, *ops], client=pipe)
            return [bool(x) for x in await pipe.execute()]

    @translate
    async def status(self, name: str) -> dict[str, str]:
        """The agent's status hash (empty when it never ran)."""
        raw = await self._r.hgetall(self.keys.status(name))
        return {_s(a): _s(b) for a, b in raw.items()}

    @translate
    async def statuses(self, names: Sequence[str]) -> dict[str, dict[str, str]]:
        """Status hashes of many agents in one round trip."""
        if not names:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.keys.status(name))
            raw = await pipe.execute()
        return {
            name: {_s(a): _s(b) for a, b in h.items()} for name, h in zip(names, raw, strict=True)
        }

    @translate
    async def events(
        self,
        name: str | None = None,
        *,
        count: int = 50,
        after_id: str | None = None,
        block_ms: int | None = None,
    ) -> list[Event]:
        """Events of one agent (or the fleet when ``name`` is None), oldest first.

        Without ``after_id`` returns the newest ``count``; with it, those after it,
        waiting up to ``block_ms`` for new ones when given.
        """
        stream = self.keys.events(name) if name else self.keys.fleet_events
        if after_id is None:
            entries = list(reversed(await self._r.xrevrange(stream, count=count)))
        elif block_ms is not None:
            reply = await self._r.xread({stream: after_id}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        else:
            entries = await self._r.xrange(stream, min=f"({after_id}", count=count)
        out = []
        for entry_id, fields in entries:
            fields = {_s(a): _s(b) for a, b in fields.items()}
            body = json.loads(fields.get("event", "{}"))
            out.append(
                Event(
                    id=_s(entry_id),
                    agent=fields.get("agent", name or ""),
                    time=float(body.get("time", 0.0)),
                    type=body.get("type", ""),
                    reason=body.get("reason", ""),
                    message=body.get("message", ""),
                    daemon=body.get("daemon", ""),
                )
            )
        return out

    @translate
    async def load_state(self, name: str) -> bytes | None:
        """The agent's durable state as saved by its last task, or None."""
        value = await self._r.get(self.keys.state(name))
        return bytes(value) if value is not None else None

    # ---------------------------------------------------------------- inbox

    @translate
    async def send(
        self,
        name: str,
        body: str,
        *,
        key: str | None = None,
        traceparent: str | None = None,
        send_id: str | None = None,
    ) -> str:
        """Put a message in the agent's inbox and nudge the daemons. Returns the message id.

        With ``send_id`` the send is applied at most once (for an hour): sending
        again with the same id (a retry after a lost reply) adds nothing and returns the
        first message's id.
        """
        fields = {"body": body, "sent_at": repr(time.time())}
        if key:
            fields["key"] = key
        if traceparent:
            fields["traceparent"] = traceparent
        if send_id is not None:
            args: list[str | int] = [SEND_DEDUPE_TTL_S, name, SIGNALS_MAXLEN]
            for f, v in fields.items():
                args += [f, v]
            k = self.keys
            msg = await self._send_once(
                keys=[k.sent(name, send_id), k.inbox(name), k.signals], args=args
            )
            return _s(msg)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.inbox(name), fields)
            pipe.xadd(
                self.keys.signals,
                {"cmd": "message", "agent": name},
                maxlen=SIGNALS_MAXLEN,
                approximate=True,
            )
            msg_id, _ = await pipe.execute()
        return _s(msg_id)

    @translate
    async def open_agent(self, name: str, consumer: str) -> AgentSnapshot:
        """Everything a new owner reads about an agent, in one round trip.

        Creates the inbox consumer group if missing and takes over the pending
        messages of any earlier reader (only the lease holder calls this).
        """
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.status(name))
            pipe.get(k.state(name))
            pipe.xgroup_create(k.inbox(name), INBOX_GROUP, id="0", mkstream=True)
            pipe.xautoclaim(k.inbox(name), INBOX_GROUP, consumer, 0, start_id="0-0", count=1000)
            pipe.xreadgroup(INBOX_GROUP, consumer, {k.inbox(name): "0"}, count=10_000)
            pipe.hgetall(k.schedule(name))
            pipe.zrevrange(k.tasks(name), 0, UNFINISHED_SCAN - 1)
            replies = await pipe.execute(raise_on_error=False)
        status, state, created, claim, pending, schedule, recent = replies
        for reply in (status, state, claim, pending, schedule, recent):
            if isinstance(reply, Exception):
                raise reply
        if isinstance(created, Exception) and "BUSYGROUP" not in str(created):
            raise created
        claimed = len(claim[1])
        if _s(claim[0]) != "0-0":  # more than one batch pending: rare, finish the job
            claimed += await self.claim_inbox(name, consumer)
            pending = await self._r.xreadgroup(
                INBOX_GROUP, consumer, {k.inbox(name): "0"}, count=10_000
            )
        return AgentSnapshot(
            status={_s(a): _s(b) for a, b in status.items()},
            state=bytes(state) if state is not None else None,
            pending=_messages(pending),
            claimed=claimed,
            schedule={_s(a): float(b) for a, b in schedule.items()},
            unfinished=[
                t
                for t in await self._task_records(name, [_s(i) for i in recent])
                if t.get("status") in ("queued", "running")
            ],
        )

    async def _task_records(self, name: str, ids: Sequence[str]) -> list[dict[str, str]]:
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(self.keys.task(name, task_id))
            raw = await pipe.execute()
        return [{_s(a): _s(b) for a, b in h.items()} for h in raw if h]

    @translate
    async def tasks(self, name: str, *, count: int = 20) -> list[dict[str, str]]:
        """The agent's most recent task records, newest first."""
        ids = await self._r.zrevrange(self.keys.tasks(name), 0, count - 1)
        return await self._task_records(name, [_s(i) for i in ids])

    @translate
    async def task(self, name: str, task_id: str) -> dict[str, str]:
        """One task record (empty when unknown)."""
        raw = await self._r.hgetall(self.keys.task(name, task_id))
        return {_s(a): _s(b) for a, b in raw.items()}

    @translate
    async def usage(
        self, names: Sequence[str], days: Sequence[str]
    ) -> dict[tuple[str, str], dict[str, float]]:
        """Metered usage per (agent, day) for the given agents and UTC days (missing: left out)."""
        pairs = [(n, d) for n in names for d in days]
        if not pairs:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for n, d in pairs:
                pipe.hgetall(self.keys.usage(n, d))
            raw = await pipe.execute()
        return {
            pair: {_s(a): float(b) for a, b in h.items()}
            for pair, h in zip(pairs, raw, strict=True)
            if h
        }

    @translate
    async def idempotency_done(self, name: str, key: str) -> bool:
        """Whether a message with this idempotency key already completed."""
        return await self._r.zscore(self.keys.idempotency(name), key) is not None

    @translate
    async def trim_tasks(self, name: str, *, keep: int, max_age_s: float) -> int:
        """Drop task records beyond the newest ``keep`` or older than ``max_age_s``, and
        idempotency keys older than ``max_age_s``. Returns how many records went."""
        return await self.trim_tasks_many([name], keep=keep, max_age_s=max_age_s)

    @translate
    async def trim_tasks_many(self, names: Sequence[str], *, keep: int, max_age_s: float) -> int:
        """:meth:`trim_tasks` for many agents in two pipelines per 500 agents; also forgets
        usage days past the usage retention. Returns how many task records went."""
        k = self.keys
        removed = 0
        cutoff = time.time() - max_age_s
        oldest_day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - self.retention.usage_s))
        for i in range(0, len(names), 500):
            chunk = list(names[i : i + 500])
            async with self._r.pipeline(transaction=False) as pipe:
                for name in chunk:
                    pipe.zrangebyscore(k.tasks(name), "-inf", f"({cutoff!r}")
                    # keep <= 0: no count limit (a range from 1 to 0 is empty).
                    pipe.zrange(k.tasks(name), *((0, -keep - 1) if keep > 0 else (1, 0)))
                    pipe.smembers(k.usage_days(name))
                raw = await pipe.execute()
            async with self._r.pipeline(transaction=False) as pipe:
                for j, name in enumerate(chunk):
                    old, extra, days = raw[3 * j : 3 * j + 3]
                    ids = sorted({_s(t) for t in [*old, *extra]})
                    for start in range(0, len(ids), 500):
                        part = ids[start : start + 500]
                        pipe.delete(*(k.task(name, t) for t in part))
                        pipe.zrem(k.tasks(name), *part)
                    removed += len(ids)
                    pipe.zremrangebyscore(k.idempotency(name), "-inf", f"({cutoff!r}")
                    gone = [_s(d) for d in days if _s(d) < oldest_day]
                    if gone:
                        pipe.srem(k.usage_days(name), *gone)
                await pipe.execute()
        return removed

    @translate
    async def ensure_inbox(self, name: str) -> None:
        """Create the inbox stream and its consumer group if missing."""
        try:
            await self._r.xgroup_create(self.keys.inbox(name), INBOX_GROUP, id="0", mkstream=True)
        except rexc.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    @translate
    async def claim_inbox(self, name: str, consumer: str) -> int:
        """Take over every pending message of the inbox (its earlier reader is gone).

        Only the lease holder calls this, so every pending entry belongs to a dead or
        superseded reader. Returns how many were claimed.
        """
        claimed = 0
        start = "0-0"
        while True:
            # justid=True would be lighter, but redis-py then drops the cursor.
            reply = await self._r.xautoclaim(
                self.keys.inbox(name),
                INBOX_GROUP,
                consumer,
                min_idle_time=0,
                start_id=start,
                count=100,
            )
            start = _s(reply[0])
            claimed += len(reply[1])
            if start == "0-0":
                return claimed

    @translate
    async def read_inbox(
        self, name: str, consumer: str, *, count: int = 1, pending: bool = False
    ) -> list[InboxMessage]:
        """Next messages for ``consumer``: its own unacknowledged ones if ``pending``, else new."""
        reply = await self._r.xreadgroup(
            INBOX_GROUP, consumer, {self.keys.inbox(name): "0" if pending else ">"}, count=count
        )
        return _messages(reply)

    @translate
    async def inbox_depth(self, name: str) -> int:
        """Messages not yet acknowledged (pending + not yet delivered)."""
        try:
            groups = await self._r.xinfo_groups(self.keys.inbox(name))
        except rexc.ResponseError:
            return 0
        for g in groups:
            if _s(g.get("name")) == INBOX_GROUP:
                lag = g.get("lag")
                if lag is None:
                    # Redis cannot tell the lag when an entry after the group's last
                    # delivered one was deleted (acks delete out of order): count them.
                    last = _s(g.get("last-delivered-id")) or "0-0"
                    lag = len(await self._r.xrange(self.keys.inbox(name), min=f"({last}"))
                return int(g.get("pending", 0)) + int(lag)
        return int(await self._r.xlen(self.keys.inbox(name)))

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

    # ---------------------------------------------------------------- daemons

    @translate
    async def heartbeat(
        self,
        daemon_id: str,
        info: Mapping[str, object],
        *,
        now: float | None = None,
        forget_after_s: float = 600.0,
    ) -> None:
        """Record that a daemon is alive, with a few facts for `agentos get daemons`.

        Entries whose ``seen_at`` is older than ``forget_after_s`` (daemons that died
        without saying goodbye) are removed, and the hash itself expires that long after
        the last heartbeat of any daemon.
        """
        now = time.time() if now is None else now
        await self._heartbeat(
            keys=[self.keys.daemons],
            args=[
                daemon_id,
                json.dumps(dict(info)),
                repr(now - forget_after_s),
                max(1, math.ceil(forget_after_s)),
            ],
        )

    @translate
    async def forget_daemon(self, daemon_id: str) -> None:
        """Remove a daemon's heartbeat on clean exit."""
        await self._r.hdel(self.keys.daemons, daemon_id)

    @translate
    async def record_fleet_event(
        self, agent: str, type_: str, reason: str, message: str, daemon: str
    ) -> None:
        """Add one event to the fleet feed (``agent`` empty for events of the fleet itself)."""
        await self._r.xadd(
            self.keys.fleet_events,
            _event_fields(agent, time.time(), type_, reason, message, daemon),
            maxlen=FLEET_EVENTS_MAXLEN,
            approximate=True,
        )

    @translate
    async def daemons(self) -> dict[str, dict[str, Any]]:
        """Every daemon heartbeat by id."""
        raw = await self._r.hgetall(self.keys.daemons)
        return {_s(a): json.loads(b) for a, b in raw.items()}

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


def _messages(reply: Any) -> list[InboxMessage]:
    out = []
    for _stream, entries in reply or []:
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            f = {_s(a): _s(b) for a, b in fields.items()}
            out.append(
                InboxMessage(
                    id=_s(entry_id),
                    body=f.get("body", ""),
                    key=f.get("key"),
                    sent_at=float(f.get("sent_at", "0")),
                    traceparent=f.get("traceparent"),
                )
            )
    return out


def _verdict(old_hash: str | None, new_hash: str) -> str:
    if old_hash is None:
        return "created"
    return "unchanged" if old_hash == new_hash else "configured"
