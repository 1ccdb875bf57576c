"""Fenced writes of an agent's status, events, state, task records and usage, and their reads.

A daemon changes an agent only while it holds the agent's lease: every write goes through
one Lua script (``lua/fenced_ops.lua``) that checks the lease value and applies a list of
operations atomically, at most once per operation id, so a retry after a lost reply is
safe. This module owns :class:`Write`, the one value a write is made of from the runner
through :class:`agentos.runtime.writer.Writer` to here, and builds the operation lists;
what the writes leave behind is read by :mod:`~agentos.store.agents`,
:mod:`~agentos.store.events` and :mod:`~agentos.store.usage`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from agentos.store import steps
from agentos.store.batching import raise_first, run_many
from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.keys import INBOX_GROUP
from agentos.store.records import EVENTS_MAXLEN, FLEET_EVENTS_MAXLEN, StatusUpdate, TaskWrite

__all__ = ["APPLIED", "DUPLICATE", "EVENTS_MAXLEN", "Duplicate", "Write", "Writes"]

OP_IDS_KEPT = 64  # a retry must come before this many later writes of the same agent
OP_IDS_TTL_S = 3600
APPLIED = 1
DUPLICATE = 3
_json = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Write:
    """One fenced write, or one part of one (see :meth:`Writes.fenced_write` for each
    field).

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


def _encode(ops: list[list[object]]) -> bytes:
    # Every argument as a string (Lua's cjson would turn numbers into floats), except
    # {"argv": n} placeholders.
    return _json([[a if type(a) is str or type(a) is dict else str(a) for a in op] for op in ops])


class Writes:
    """Fenced writes (``store.writes``): only while the caller holds the agent's lease."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self._fenced = conn.scripts.fenced
        self._batch = conn.batch
        self.keys = conn.keys
        self.cluster = conn.cluster

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
        tasks_ttl = str(max(1, math.ceil(self.conn.retention.tasks_s)))
        usage_ttl = str(max(1, math.ceil(self.conn.retention.usage_s)))
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
        write: Write,
        *,
        release: bool = False,
        op_id: str | None = None,
        duplicate: Duplicate | None = None,
        prior: Sequence[Write] = (),
    ) -> int:
        """Apply ``write``: status fields, an event (with its copy in the fleet feed), the
        durable state, an inbox ack, task records, schedule times and usage, atomically.

        Happens only while ``lease_value`` is still the agent's lease; returns False
        (and writes nothing) when it is not. With ``release`` the lease is dropped in
        the same step (a clean stop). With ``op_id`` (see :func:`agentos.store.retry.new_op_id`)
        the write is applied at most once: a repeat of one of the agent's recent op ids
        returns true without applying anything or looking at the lease, so a retry after
        a lost reply is safe.

        With ``duplicate`` the write is the start of a message's task: when the message's
        idempotency key already completed, the write applies ``duplicate``'s ack and
        record instead of its own, in the same step, and returns :data:`DUPLICATE`.
        ``prior`` parts are applied first, in the same step (a write held back).
        Returns 0 (not applied: the lease is not the caller's), :data:`APPLIED` or
        :data:`DUPLICATE`.
        """
        parts = [*prior, write]
        keys, ops = self._ops(name, parts, release=release, op_id=op_id, duplicate=duplicate)
        code = int(await self._batch.run(self._fenced, keys, [lease_value, *ops]))
        code = APPLIED if code == 2 else code  # 2: this op id was applied before
        if self.cluster and code:
            kept = parts if code == APPLIED else parts[:-1]  # a duplicate: not its own part
            for part in kept:
                if part.event is not None:
                    await steps.feed_copy(self.conn, name, json.dumps(dict(part.event)))
        return code

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
