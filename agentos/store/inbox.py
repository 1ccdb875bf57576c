"""Agent inboxes and task records: sending, taking an agent over, reading and trimming.

Messages wait in one stream per agent, read through a consumer group so that a new owner
can take over what a dead daemon had read but not finished (``open_agent``,
``claim_inbox``). Sends can be made at most once with a send id (``lua/inbox_send.lua``),
and a checked send is refused when the agent is not applied, the message is too large
or the inbox holds ``maxDepth`` messages already: a stuck agent's inbox is bounded.
A message nobody can process leaves the inbox in one atomic step each way: to the
agent's dead letters after too many failed starts (``dead_letter``, by the owner), out
of the fleet when an operator drops it (``drop_message``), back in when one re-drives
it (``redrive``). The task records and idempotency keys that fenced writes leave behind
are read and trimmed here, and a finished task's verdict is judged again here
(``set_task_outcome``, ``lua/task_outcome.lua``: the record and the day's usage counters
in one step).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from redis import exceptions as rexc

from agentos.core.spec import INBOX_MAX_DEPTH
from agentos.store.batching import ScriptBatcher
from agentos.store.errors import SendRefused, translate
from agentos.store.keys import INBOX_GROUP, Keys, event_fields
from agentos.store.records import (
    FLEET_EVENTS_MAXLEN,
    SIGNALS_MAXLEN,
    AgentSnapshot,
    InboxMessage,
    Retention,
    _s,
)
from agentos.store.writes import EVENTS_MAXLEN

__all__ = [
    "DEAD_LETTERS_KEPT",
    "INBOX_FULL_RETRY_AFTER_S",
    "DeadLetter",
    "InboxFull",
    "InboxOps",
    "SendConflict",
]

SEND_DEDUPE_TTL_S = 3600  # a send retried later than this is a new message
UNFINISHED_SCAN = 200  # recent task records a new owner looks at for interrupted work
OPEN_NEW_MESSAGES = 100  # new messages a new owner reads with the rest
DEAD_LETTERS_KEPT = 1000  # per agent; past it the oldest dead letter is forgotten
# What a refused sender is told to wait: an inbox drains at its agent's pace, which
# nobody knows in advance; long enough not to hammer, short enough to catch up.
INBOX_FULL_RETRY_AFTER_S = 30.0
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


class InboxFull(Exception):
    """A checked send was refused, nothing enqueued: the agent's inbox holds ``depth``
    messages not yet done, its ``maxDepth`` is ``limit``; try again after
    ``retry_after_s`` seconds."""

    def __init__(
        self, name: str, depth: int, limit: int, retry_after_s: float = INBOX_FULL_RETRY_AFTER_S
    ) -> None:
        self.name, self.depth, self.limit, self.retry_after_s = name, depth, limit, retry_after_s
        super().__init__(
            f'the inbox of agent "{name}" is full: {depth} messages waiting, maxDepth '
            f"{limit}; try again in {retry_after_s:g}s"
        )


class SendConflict(Exception):
    """A send id (an ``Idempotency-Key``) was reused with another body, nothing
    enqueued: ``message_id`` is the message the first send produced."""

    def __init__(self, name: str, message_id: str) -> None:
        self.name, self.message_id = name, message_id
        super().__init__(
            f'this send id already sent another message to agent "{name}" '
            f"(message {message_id}, task m-{message_id})"
        )


class DeadLetter(dict[str, str]):
    """One dead letter as stored: ``task``, ``message_id``, ``body``, ``key``,
    ``traceparent``, ``sent_at``, ``attempts``, ``error``, ``dead_at`` (all text)."""


class InboxOps:
    """Inbox and task-record methods of :class:`agentos.store.Store` (mixed in; uses its
    client, keys, retention and the ``inbox_send`` script)."""

    _r: Any
    _send_once: Any
    _read_fenced: Any
    _dead_script: Any
    _drop_script: Any
    _redrive_script: Any
    _outcome_script: Any
    _batch: ScriptBatcher
    keys: Keys
    due_now: Any  # agentos.store.waits.WaitOps
    _feed_copy: Any  # agentos.store.writes.WriteOps
    signal: Any  # agentos.store.leases.LeaseOps
    retention: Retention
    cluster: bool

    def _inbox_scripts(self, client: Any, load: Any) -> None:
        self._dead_script = client.register_script(load("inbox_dead"))
        self._drop_script = client.register_script(load("inbox_drop"))
        self._redrive_script = client.register_script(load("inbox_redrive"))
        self._outcome_script = client.register_script(load("task_outcome"))

    @translate
    async def send(
        self,
        name: str,
        body: str,
        *,
        key: str | None = None,
        traceparent: str | None = None,
        send_id: str | None = None,
        check_limit: int | None = None,
        digest: str | None = None,
    ) -> str:
        """Put a message in the agent's inbox and nudge the daemons. Returns the message id.

        With ``send_id`` the send is applied at most once (for an hour): sending
        again with the same id (a retry after a lost reply) adds nothing and returns the
        first message's id; with a ``digest`` of the body too, sending again with the
        same id and another digest raises :class:`SendConflict`. With ``check_limit``,
        the send checks in the same step that the agent is applied and the message fits
        its inbox (``check_limit`` is the size limit when the agent's index entry names
        none) and raises :class:`SendRefused` otherwise, and that the inbox holds fewer
        than its ``maxDepth`` messages (:class:`InboxFull` otherwise). Every send on an
        agent's behalf (``agentos send``, HTTP, ``ctx.send``) should check: an unchecked
        send creates the inbox of a name nobody applied.
        """
        fields = {"body": body, "sent_at": repr(time.time())}
        if key:
            fields["key"] = key
        if traceparent:
            fields["traceparent"] = traceparent
        k = self.keys
        signals = k.signals(k.signal_shard(name))
        check = "" if check_limit is None else str(check_limit)
        ttl = "" if send_id is None else SEND_DEDUPE_TTL_S
        args: list[str | int] = [
            ttl,
            name,
            SIGNALS_MAXLEN,
            check,
            len(body.encode()),
            digest or "",
            INBOX_MAX_DEPTH,
        ]
        for f, v in fields.items():
            args += [f, v]
        keys = [k.sent(name, send_id or "-"), k.inbox(name), k.applied(name), k.lease(name)]
        if not self.cluster:
            keys.append(signals)
        verdict, value, *rest = await self._batch.run(self._send_once, keys, args)
        match _s(verdict):
            case "ok":
                pass
            case "full":
                raise InboxFull(name, int(value), int(rest[0]))
            case "conflict":
                raise SendConflict(name, _s(value))
            case "missing":
                raise SendRefused(name, None)
            case _:
                raise SendRefused(name, int(value))
        await self._after_enqueue(name, held=bool(int(rest[0])))
        return _s(value)

    async def _after_enqueue(self, name: str, *, held: bool) -> None:
        if not held:
            # No daemon holds the agent: it is due now, and whoever has room activates it
            # (the message waits in the inbox meanwhile). A repeat too: the first attempt
            # may have died before this step.
            await self.due_now([name], now=time.time())
        elif self.cluster:
            # The message first, then the signal: a daemon nudged by the signal finds
            # the message; if the sender dies in between, the inbox sweep finds it.
            await self._nudge(self.keys.signals(self.keys.signal_shard(name)), name)

    async def _nudge(self, signals: str, name: str) -> None:
        await self._batch.command(
            "XADD", signals, "MAXLEN", "~", SIGNALS_MAXLEN, "*", "cmd", "message", "agent", name
        )

    # ---------------------------------------------------------------- poison messages

    def _event_json(self, name: str, now: float, type_: str, message: str, daemon: str) -> str:
        return event_fields(name, now, type_, type_, message, daemon)["event"]

    def _tasks_ttl_s(self) -> int:
        return max(1, math.ceil(self.retention.tasks_s))

    @translate
    async def dead_letter(
        self,
        name: str,
        lease_value: str,
        message_id: str,
        *,
        task_id: str,
        attempts: int,
        error: str,
        now: float | None = None,
        daemon: str = "",
    ) -> Literal["moved", "not-held", "gone"]:
        """Move a message whose task failed or was interrupted ``attempts`` times in a
        row from the inbox to the agent's dead letters, atomically, while
        ``lease_value`` ("daemon|token") is still the agent's lease: the message is
        acknowledged and deleted from the inbox, kept (body, key, trace, ``attempts``,
        ``error``) among the newest :data:`DEAD_LETTERS_KEPT`, its task recorded as
        ``dead`` and a ``DeadLettered`` event written.

        Returns "moved", "not-held" (the lease is not the caller's: nothing done) or
        "gone" (the message is no longer in the inbox: nothing done; a retry after a
        lost reply sees this too). ``error`` should be scrubbed of secrets already.
        """
        now = time.time() if now is None else now
        k = self.keys
        event = self._event_json(
            name,
            now,
            "DeadLettered",
            f"task {task_id} did not finish after {attempts} attempts in a row; its message "
            f"is a dead letter now (agentos tasks {name} --dead): {error[:500]}",
            daemon,
        )
        keys = [
            k.lease(name),
            k.inbox(name),
            k.dead(name),
            k.dead_order(name),
            k.task(name, task_id),
            k.tasks(name),
            k.events(name),
        ]
        if not self.cluster:
            keys.append(k.fleet_events(k.feed_shard(name)))
        args: list[str | int] = [
            lease_value,
            message_id,
            task_id,
            INBOX_GROUP,
            attempts,
            error,
            repr(now),
            name,
            DEAD_LETTERS_KEPT,
            self._tasks_ttl_s(),
            event,
            EVENTS_MAXLEN,
            FLEET_EVENTS_MAXLEN,
        ]
        code = int(await self._dead_script(keys=keys, args=args))
        if code == 1 and self.cluster:
            await self._feed_copy(name, event)
        return "moved" if code == 1 else "not-held" if code == 0 else "gone"

    @translate
    async def drop_message(
        self,
        name: str,
        task_id: str,
        *,
        by: str,
        now: float | None = None,
        cancel: bool = False,
    ) -> Literal["inbox", "dead"] | None:
        """Drop the message of task ``task_id`` (``m-<message id>``): out of the inbox
        (acknowledged and deleted, read or not) or out of the dead letters, the task
        recorded as ``dropped`` and a ``Dropped`` event naming ``by`` written, in one
        atomic step; the agent's owner, if any, gets a ``drop`` signal (with ``task``).
        With ``cancel`` (``agentos tasks cancel``) the task is recorded ``cancelled`` with
        a ``TaskCancelled`` event, and the owner gets a ``cancel`` signal instead: a task
        already running that message is cut short there.

        Returns where the message was, or None when it is in neither (or the task is not
        a message's): nothing changed then.
        """
        message_id = task_id.removeprefix("m-")
        if not task_id.startswith("m-") or not _STREAM_ID.fullmatch(message_id):
            return None
        now = time.time() if now is None else now
        k = self.keys
        status = "cancelled" if cancel else "dropped"
        event = self._event_json(
            name,
            now,
            "TaskCancelled" if cancel else "Dropped",
            f"task {task_id} cancelled by {by}"
            if cancel
            else f"task {task_id} dropped by {by}: its message will not run",
            "",
        )
        keys = [
            k.inbox(name),
            k.dead(name),
            k.dead_order(name),
            k.task(name, task_id),
            k.tasks(name),
            k.events(name),
            k.lease(name),
        ]
        if not self.cluster:
            keys.append(k.fleet_events(k.feed_shard(name)))
        args: list[str | int] = [
            message_id,
            task_id,
            INBOX_GROUP,
            repr(now),
            name,
            f"{status} by {by}",
            self._tasks_ttl_s(),
            event,
            EVENTS_MAXLEN,
            FLEET_EVENTS_MAXLEN,
            status,
        ]
        reply = await self._drop_script(keys=keys, args=args)
        if not int(reply[0]):
            return None
        if self.cluster:
            await self._feed_copy(name, event)
        if int(reply[2]):
            # A cancel also cuts the task short if the owner runs it now.
            await self.signal(
                "cancel" if cancel else "drop", name, task=task_id, by=by, dropped="1"
            )
        return "inbox" if _s(reply[1]) == "inbox" else "dead"

    @translate
    async def redrive(
        self, name: str, task_id: str, *, by: str, now: float | None = None
    ) -> str | None:
        """Send the dead letter of task ``task_id`` again: a new message in the inbox
        (same body, key and trace), out of the dead letters, the old task record naming
        the new task (``redriven_as``), a ``Redriven`` event; one atomic step, then the
        agent is nudged as for a send. Returns the new message id, None when the task has
        no dead letter. Raises :class:`SendRefused` (limit None) when the agent is no
        longer applied, :class:`InboxFull` when its inbox is full.
        """
        now = time.time() if now is None else now
        k = self.keys
        # The script writes the new task's id in place of {task}.
        sent = f"the message of task {task_id} sent again by {by} as {{task}}"
        event = self._event_json(name, now, "Redriven", sent, "")
        keys = [
            k.dead(name),
            k.dead_order(name),
            k.inbox(name),
            k.applied(name),
            k.lease(name),
            k.task(name, task_id),
            k.events(name),
        ]
        if not self.cluster:
            keys += [k.signals(k.signal_shard(name)), k.fleet_events(k.feed_shard(name))]
        args: list[str | int] = [
            task_id,
            INBOX_MAX_DEPTH,
            repr(now),
            name,
            SIGNALS_MAXLEN,
            event,
            EVENTS_MAXLEN,
            FLEET_EVENTS_MAXLEN,
            self._tasks_ttl_s(),
        ]
        verdict, value, *rest = await self._redrive_script(keys=keys, args=args)
        match _s(verdict):
            case "missing":
                return None
            case "gone":
                raise SendRefused(name, None)
            case "full":
                raise InboxFull(name, int(value), int(rest[0]))
        if self.cluster:
            await self._feed_copy(name, _s(rest[1]))
        await self._after_enqueue(name, held=bool(int(rest[0])))
        return _s(value)

    @translate
    async def dead_letters(self, name: str, *, count: int = 100) -> list[DeadLetter]:
        """The agent's dead letters, newest first (at most ``count``)."""
        k = self.keys
        ids = [_s(t) for t in await self._r.zrevrange(k.dead_order(name), 0, count - 1)]
        if not ids:
            return []
        raw = await self._r.hmget(k.dead(name), ids)
        return [
            DeadLetter({str(f): str(v) for f, v in json.loads(r).items()})
            for r in raw
            if r is not None
        ]

    @translate
    async def open_agent(self, name: str, consumer: str) -> AgentSnapshot:
        """Everything a new owner reads about an agent, in one round trip.

        Creates the inbox consumer group if missing, takes over the pending
        messages of any earlier reader (only the lease holder calls this) and reads the
        first new ones.
        """
        return (await self._open_many([name], consumer))[name]

    @translate
    async def open_agents(self, names: Sequence[str], consumer: str) -> dict[str, AgentSnapshot]:
        """:meth:`open_agent` for many agents, in two pipelines per 200 agents (a daemon
        starting 10,000 agents must not spend 10,000 round trips on it)."""
        out: dict[str, AgentSnapshot] = {}
        for i in range(0, len(names), 200):
            out |= await self._open_many(names[i : i + 200], consumer)
        return out

    async def _open_many(self, names: Sequence[str], consumer: str) -> dict[str, AgentSnapshot]:
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(k.status(name))
                pipe.get(k.state(name))
                pipe.xgroup_create(k.inbox(name), INBOX_GROUP, id="0", mkstream=True)
                pipe.xautoclaim(k.inbox(name), INBOX_GROUP, consumer, 0, start_id="0-0", count=1000)
                pipe.xreadgroup(INBOX_GROUP, consumer, {k.inbox(name): "0"}, count=10_000)
                pipe.hgetall(k.schedule(name))
                pipe.zrevrange(k.tasks(name), 0, UNFINISHED_SCAN - 1)
                pipe.xreadgroup(
                    INBOX_GROUP, consumer, {k.inbox(name): ">"}, count=OPEN_NEW_MESSAGES
                )
                pipe.hgetall(k.wait(name))
            replies = await pipe.execute(raise_on_error=False)
        opened: dict[str, tuple[Any, ...]] = {}
        recent: dict[str, list[str]] = {}
        for j, name in enumerate(names):
            status, state, created, claim, pending, schedule, ids, new, wait = replies[
                9 * j : 9 * j + 9
            ]
            for reply in (status, state, claim, pending, schedule, ids, new, wait):
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
            opened[name] = (status, state, pending, claimed, schedule, new, wait)
            recent[name] = [_s(i) for i in ids]
        records = await self._task_records_of(recent)
        return {
            name: AgentSnapshot(
                status={_s(a): _s(b) for a, b in status.items()},
                state=bytes(state) if state is not None else None,
                pending=_messages(pending),
                claimed=claimed,
                schedule={_s(a): float(b) for a, b in schedule.items()},
                unfinished=[t for t in records[name] if t.get("status") in ("queued", "running")],
                new=_messages(new),
                wait={_s(a): _s(b) for a, b in wait.items()},
            )
            for name, (status, state, pending, claimed, schedule, new, wait) in opened.items()
        }

    async def _task_records_of(
        self, ids: Mapping[str, Sequence[str]]
    ) -> dict[str, list[dict[str, str]]]:
        """Task records of several agents in one round trip (none when there are none)."""
        out: dict[str, list[dict[str, str]]] = {name: [] for name in ids}
        pairs = [(name, task_id) for name, task_ids in ids.items() for task_id in task_ids]
        if not pairs:
            return out
        async with self._r.pipeline(transaction=False) as pipe:
            for name, task_id in pairs:
                pipe.hgetall(self.keys.task(name, task_id))
            raw = await pipe.execute()
        for (name, _), h in zip(pairs, raw, strict=True):
            if h:
                out[name].append({_s(a): _s(b) for a, b in h.items()})
        return out

    async def _task_records(self, name: str, ids: Sequence[str]) -> list[dict[str, str]]:
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(self.keys.task(name, task_id))
            raw = await pipe.execute()
        return [{_s(a): _s(b) for a, b in h.items()} for h in raw if h]

    @translate
    async def tasks(
        self, name: str, *, count: int = 20, since: float | None = None
    ) -> list[dict[str, str]]:
        """The agent's most recent task records (created at ``since`` or later, when
        given), newest first."""
        if since is None:
            ids = await self._r.zrevrange(self.keys.tasks(name), 0, count - 1)
        else:
            ids = await self._r.zrevrangebyscore(
                self.keys.tasks(name), "+inf", repr(since), start=0, num=count
            )
        return await self._task_records(name, [_s(i) for i in ids])

    @translate
    async def set_task_outcome(
        self,
        name: str,
        task_id: str,
        *,
        outcome: str,
        verdict: str,
        day: str,
        agent_outcome: str = "",
    ) -> tuple[bool, str]:
        """Give a task that ended normally the verdict ``verdict`` (``outcome``: its JSON)
        and move its count in the usage of ``day`` (the record's ``counted_on``, or the
        day it finished when it was never counted) from the old verdict to it, for the
        agent and for the model that served its last call; keep ``agent_outcome`` (the
        agent's own verdict, JSON) beside it. Atomic, and a no-op on the counters when
        the verdict is the same.

        Returns ``(True, old verdict or "")``, or ``(False, why)``: ``missing`` (no such
        record), ``status`` (it did not end normally), ``day`` (counted on another day:
        read the record again).
        """
        k = self.keys
        reply = await self._outcome_script(
            keys=[k.task(name, task_id), k.usage(name, day), k.usage_days(name)],
            args=[outcome, verdict, day, math.ceil(self.retention.usage_s), agent_outcome],
        )
        return bool(int(reply[0])), _s(reply[1])

    @translate
    async def task(self, name: str, task_id: str) -> dict[str, str]:
        """One task record (empty when unknown)."""
        raw = await self._r.hgetall(self.keys.task(name, task_id))
        return {_s(a): _s(b) for a, b in raw.items()}

    @translate
    async def mark_cancel(self, name: str, task_id: str, by: str) -> bool:
        """Note on an existing task record that ``by`` cancelled it (``cancel_by``): a
        daemon that takes the agent over ends the task instead of running it. False when
        there is no such record."""
        key = self.keys.task(name, task_id)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.exists(key)
            pipe.hsetnx(key, "cancel_by", by)
            exists, _ = await pipe.execute()
        if not exists:
            await self._r.delete(key)  # the field alone: not a record
        return bool(exists)

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
        self,
        name: str,
        consumer: str,
        *,
        count: int = 1,
        pending: bool = False,
        lease: str | None = None,
    ) -> list[InboxMessage]:
        """Next messages for ``consumer``: its own unacknowledged ones if ``pending``, else new.

        With ``lease`` ("daemon|token") only while it is still the agent's lease (none
        otherwise): a daemon that was superseded takes no message the new owner misses.
        """
        start = "0" if pending else ">"
        if lease is None:
            reply = await self._r.xreadgroup(
                INBOX_GROUP, consumer, {self.keys.inbox(name): start}, count=count
            )
            return _messages(reply)
        k = self.keys
        held, *rest = await self._batch.run(
            self._read_fenced,
            [k.lease(name), k.inbox(name)],
            [lease, INBOX_GROUP, consumer, count, start],
        )
        if not int(held) or not rest or not rest[0]:
            return []
        return _messages(
            [(stream, [(i, _pairs(flat)) for i, flat in entries]) for stream, entries in rest[0]]
        )

    @translate
    async def inbox_lengths(self, names: Sequence[str]) -> dict[str, int]:
        """Entries in each agent's inbox (unacknowledged messages: acks delete them), in
        one pipeline per 1,000 agents."""
        out: dict[str, int] = {}
        for i in range(0, len(names), 1000):
            chunk = names[i : i + 1000]
            async with self._r.pipeline(transaction=False) as pipe:
                for name in chunk:
                    pipe.xlen(self.keys.inbox(name))
                out |= dict(zip(chunk, map(int, await pipe.execute()), strict=True))
        return out

    @translate
    async def inbox_depth(self, name: str) -> int:
        """Messages not yet acknowledged (pending + not yet delivered): the inbox's
        length, since every ack deletes its entry (and so does a drop or a move to the
        dead letters). The same count a checked send compares with ``maxDepth``; the
        consumer group's ``lag`` is not used, as Redis leaves it stale once an entry
        that was never delivered is deleted."""
        return int(await self._r.xlen(self.keys.inbox(name)))

    @translate
    async def inbox_has(self, name: str, message_id: str) -> bool:
        """Whether message ``message_id`` is still in the agent's inbox (not yet done)."""
        try:
            found = await self._r.xrange(self.keys.inbox(name), message_id, message_id, count=1)
        except rexc.ResponseError:  # not a stream id: no such message
            return False
        return bool(found)


def _pairs(flat: Any) -> dict[Any, Any]:
    """A script's flat [field, value, ...] list as a dict (empty: deleted while pending)."""
    return dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {}


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
