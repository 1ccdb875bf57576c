"""Fenced writes of an agent's status, events, state, task records and usage, and their reads.

A daemon changes an agent only while it holds the agent's lease: every write goes through
one Lua script (``lua/fenced_ops.lua``) that checks the lease value and applies a list of
operations atomically, at most once per operation id, so a retry after a lost reply is
safe. This module builds those operation lists and reads back what they wrote: status
hashes, the agent and fleet event streams, durable state and metered usage.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from agentos.store import streams
from agentos.store.batching import ScriptBatcher, raise_first, run_many
from agentos.store.errors import StoreError, translate
from agentos.store.keys import INBOX_GROUP, Keys
from agentos.store.records import (
    FLEET_EVENTS_MAXLEN,
    Event,
    Retention,
    StatusUpdate,
    TaskWrite,
    _s,
)

__all__ = ["APPLIED", "DUPLICATE", "Duplicate", "Write", "WriteOps"]

EVENTS_MAXLEN = 1000
OP_IDS_KEPT = 64  # a retry must come before this many later writes of the same agent
OP_IDS_TTL_S = 3600
APPLIED = 1
DUPLICATE = 3
_json = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Write:
    """One part of a fenced write (see :meth:`WriteOps.fenced_write` for each field).

    A runner can hold a part back (:meth:`agentos.runtime.writer.Writer.defer`) and send
    it ahead of its next write, in the same atomic step: a task's closing write then
    rides with the next task's start."""

    status: Mapping[str, object] | None = None
    clear: Sequence[str] = ()
    event: Mapping[str, str] | None = None
    state: bytes | None = None
    ack_id: str | None = None
    tasks: Sequence[TaskWrite] = ()
    schedule: Mapping[str, float] | None = None
    usage: tuple[str, Mapping[str, float]] | None = None


@dataclass(frozen=True, slots=True)
class Duplicate:
    """What a task-start write does instead when its message's idempotency ``key``
    already completed: acknowledge the message and record the task as skipped."""

    key: str
    ack_id: str
    task: TaskWrite


def _event_order(key: tuple[int, int], fields: Mapping[str, str]) -> tuple[float, int, int]:
    # Shards' entry ids tie within a millisecond; the event's own time orders them.
    try:
        at = float(json.loads(fields.get("event", "{}")).get("time", 0.0))
    except (ValueError, AttributeError):
        at = 0.0
    return (at or key[0] / 1000, *key)


def _event(entry_id: str, fields: Mapping[str, str], name: str | None) -> Event:
    body = json.loads(fields.get("event", "{}"))
    return Event(
        id=entry_id,
        agent=fields.get("agent", name or ""),
        time=float(body.get("time", 0.0)),
        type=body.get("type", ""),
        reason=body.get("reason", ""),
        message=body.get("message", ""),
        daemon=body.get("daemon", ""),
    )


def _encode(ops: list[list[object]]) -> bytes:
    # Every argument as a string (Lua's cjson would turn numbers into floats), except
    # {"argv": n} placeholders.
    return _json([[a if type(a) is str or type(a) is dict else str(a) for a in op] for op in ops])


class WriteOps:
    """Fenced-write and status methods of :class:`agentos.store.Store` (mixed in; uses its
    client, keys, retention and the ``fenced_ops`` script)."""

    _r: Any
    _fenced: Any
    _batch: ScriptBatcher
    keys: Keys
    retention: Retention
    cluster: bool

    def _ops(
        self,
        name: str,
        parts: Sequence[Write],
        *,
        release: bool = False,
        op_id: str | None = None,
        duplicate: Duplicate | None = None,
    ) -> tuple[list[str], list[str | bytes]]:
        """KEYS and ARGV (after the lease value) for one fenced write (see fenced_ops.lua)
        that applies ``parts`` in order."""
        k = self.keys
        keys = [k.lease(name), k.ops(name)]

        def key(name_: str) -> int:
            if name_ not in keys:
                keys.append(name_)
            return keys.index(name_) + 1

        # One binary argument slot: the last state wins (it would overwrite the others).
        state = next((p.state for p in reversed(parts) if p.state is not None), None)
        ops: list[list[object]] = []
        for part in parts:
            ops += self._op_list(name, key, part, with_state=part.state is state)
        if release:
            ops.append(["DEL", key(k.lease(name))])
        guard: list[str | bytes] = ["", "", ""]
        if duplicate is not None:
            earlier = []
            for part in parts[:-1]:
                earlier += self._op_list(name, key, part, with_state=part.state is state)
            alt = earlier + self._op_list(
                name, key, Write(ack_id=duplicate.ack_id, tasks=(duplicate.task,))
            )
            guard = [str(key(k.idempotency(name))), duplicate.key, _encode(alt)]
        return keys, [
            _encode(ops),
            state if state is not None else b"",
            op_id or "",
            str(OP_IDS_KEPT),
            str(OP_IDS_TTL_S),
            *guard,
        ]

    def _op_list(
        self, name: str, key: Callable[[str], int], part: Write, *, with_state: bool = True
    ) -> list[list[object]]:
        status, clear, state, ack_id = part.status, part.clear, part.state, part.ack_id
        tasks, schedule, usage = part.tasks, part.schedule, part.usage
        event_json = json.dumps(dict(part.event)) if part.event is not None else None
        k = self.keys
        ops: list[list[object]] = []
        tasks_ttl = str(max(1, math.ceil(self.retention.tasks_s)))
        usage_ttl = str(max(1, math.ceil(self.retention.usage_s)))
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
        if event_json is not None and not self.cluster:
            # The fleet feed's copy in the same step. On a cluster the feed shard is in
            # another slot: fenced_write sends the copy once the write is applied.
            ops.append(
                [
                    "XADD",
                    key(k.fleet_events(k.feed_shard(name))),
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
        if state is not None and with_state:
            ops.append(["SET", key(k.state(name)), {"argv": 3}])
        if ack_id:
            # An acknowledged message is gone: inboxes hold only work not yet done.
            ops.append(["XACK", key(k.inbox(name)), INBOX_GROUP, ack_id])
            ops.append(["XDEL", key(k.inbox(name)), ack_id])
        for task in tasks:
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
        return ops

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
        tasks: Sequence[TaskWrite] = (),
        schedule: Mapping[str, float] | None = None,
        usage: tuple[str, Mapping[str, float]] | None = None,
        release: bool = False,
        op_id: str | None = None,
        duplicate: Duplicate | None = None,
        prior: Sequence[Write] = (),
    ) -> int:
        """Write status fields, an event (with its copy in the fleet feed), the durable
        state, an inbox ack, a task record and schedule times atomically.

        Happens only while ``lease_value`` is still the agent's lease; returns False
        (and writes nothing) when it is not. With ``release`` the lease is dropped in
        the same step (a clean stop). With ``op_id`` (see :func:`agentos.store.retry.new_op_id`)
        the write is applied at most once: a repeat of one of the agent's recent op ids
        returns true without applying anything or looking at the lease, so a retry after
        a lost reply is safe. ``tasks`` writes several task records in the same step.

        With ``duplicate`` the write is the start of a message's task: when the message's
        idempotency key already completed, the write applies ``duplicate``'s ack and
        record instead of its own, in the same step, and returns :data:`DUPLICATE`.
        ``prior`` parts are applied first, in the same step (a write held back).
        Returns 0 (not applied: the lease is not the caller's), :data:`APPLIED` or
        :data:`DUPLICATE`.
        """
        own = Write(
            status=status,
            clear=clear,
            event=event,
            state=state,
            ack_id=ack_id,
            tasks=(task, *tasks) if task is not None else tasks,
            schedule=schedule,
            usage=usage,
        )
        parts = [*prior, own]
        keys, ops = self._ops(name, parts, release=release, op_id=op_id, duplicate=duplicate)
        code = int(await self._batch.run(self._fenced, keys, [lease_value, *ops]))
        code = APPLIED if code == 2 else code  # 2: this op id was applied before
        if self.cluster and code:
            kept = parts if code == APPLIED else parts[:-1]  # a duplicate: not its own part
            for part in kept:
                if part.event is not None:
                    await self._feed_copy(name, json.dumps(dict(part.event)))
        return code

    async def _feed_copy(self, name: str, event_json: str) -> None:
        """Copy one of ``name``'s events to its shard of the fleet feed (a step of its own
        on a cluster: at most one copy is missing if the daemon dies in between; the
        agent's own stream has every event)."""
        await self._batch.command(
            "XADD",
            self.keys.fleet_events(self.keys.feed_shard(name)),
            "MAXLEN",
            "~",
            FLEET_EVENTS_MAXLEN,
            "*",
            "agent",
            name,
            "event",
            event_json,
        )

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
        calls = []
        for name, lease_value, fields, usage, op_id in updates:
            keys, ops = self._ops(name, [Write(status=fields, usage=usage)], op_id=op_id)
            calls.append((keys, [lease_value, *ops]))
        replies = raise_first(await run_many(self._r, self._fenced, calls))
        return [bool(x) for x in replies]

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
        poll_s: float = streams.POLL_S,
    ) -> list[Event]:
        """Events of one agent (or the fleet when ``name`` is None), oldest first.

        Without ``after_id`` returns the newest ``count``; with it, those after it,
        waiting up to ``block_ms`` for new ones when given. On a cluster the fleet's
        shards cannot be read in one blocking read: they are looked at every ``poll_s``.
        """
        if not name:
            return await self._fleet_events(
                count=count, after_id=after_id, block_ms=block_ms, poll_s=poll_s
            )
        stream = self.keys.events(name)
        if after_id is None:
            entries = list(reversed(await self._r.xrevrange(stream, count=count)))
        elif block_ms is not None:
            reply = await self._r.xread({stream: after_id}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        else:
            entries = await self._r.xrange(stream, min=f"({after_id}", count=count)
        return [
            _event(_s(entry_id), {_s(a): _s(b) for a, b in fields.items()}, name)
            for entry_id, fields in entries
        ]

    async def _fleet_events(
        self, *, count: int, after_id: str | None, block_ms: int | None, poll_s: float
    ) -> list[Event]:
        # The feed is sharded: an event's id is a cursor over every shard (see
        # agentos.store.streams), so following the feed works as with one stream.
        feeds = self.keys.feed_streams()
        if after_id is None:
            entries = await streams.tail(self._r, feeds, count, order=_event_order)
        else:
            try:
                entries = await streams.read_after(
                    self._r,
                    feeds,
                    after_id,
                    count=count,
                    block_ms=block_ms,
                    cluster=self.cluster,
                    order=_event_order,
                    poll_s=poll_s,
                )
            except ValueError as e:
                raise StoreError(str(e)) from None
        return [_event(cursor, fields, "") for cursor, _, _, fields in entries]

    @translate
    async def load_state(self, name: str) -> bytes | None:
        """The agent's durable state as saved by its last task, or None."""
        value = await self._r.get(self.keys.state(name))
        return bytes(value) if value is not None else None

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
