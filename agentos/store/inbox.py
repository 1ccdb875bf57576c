"""Agent inboxes and task records: sending, taking an agent over, reading and trimming.

Messages wait in one stream per agent, read through a consumer group so that a new owner
can take over what a dead daemon had read but not finished (``open_agent``,
``claim_inbox``). Sends can be made at most once with a send id (``lua/inbox_send.lua``).
The task records and idempotency keys that fenced writes leave behind are read and
trimmed here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis import exceptions as rexc

from agentos.store.batching import ScriptBatcher
from agentos.store.errors import SendRefused, translate
from agentos.store.keys import INBOX_GROUP, Keys
from agentos.store.records import SIGNALS_MAXLEN, AgentSnapshot, InboxMessage, Retention, _s

__all__ = ["InboxOps"]

SEND_DEDUPE_TTL_S = 3600  # a send retried later than this is a new message
UNFINISHED_SCAN = 200  # recent task records a new owner looks at for interrupted work
OPEN_NEW_MESSAGES = 100  # new messages a new owner reads with the rest


class InboxOps:
    """Inbox and task-record methods of :class:`agentos.store.Store` (mixed in; uses its
    client, keys, retention and the ``inbox_send`` script)."""

    _r: Any
    _send_once: Any
    _read_fenced: Any
    _batch: ScriptBatcher
    keys: Keys
    due_now: Any  # agentos.store.waits.WaitOps
    retention: Retention
    cluster: bool

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
    ) -> str:
        """Put a message in the agent's inbox and nudge the daemons. Returns the message id.

        With ``send_id`` the send is applied at most once (for an hour): sending
        again with the same id (a retry after a lost reply) adds nothing and returns the
        first message's id. With ``check_limit`` too, the send checks in the same step
        that the agent is applied and the message fits its inbox (``check_limit`` is the
        size limit when the agent's index entry names none) and raises
        :class:`SendRefused` otherwise.
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
        args: list[str | int] = [ttl, name, SIGNALS_MAXLEN, check, len(body.encode())]
        for f, v in fields.items():
            args += [f, v]
        keys = [k.sent(name, send_id or "-"), k.inbox(name), k.applied(name), k.lease(name)]
        if not self.cluster:
            keys.append(signals)
        verdict, value, *rest = await self._batch.run(self._send_once, keys, args)
        if _s(verdict) != "ok":
            raise SendRefused(name, None if _s(verdict) == "missing" else int(value))
        if not int(rest[0]):
            # No daemon holds the agent: it is due now, and whoever has room activates it
            # (the message waits in the inbox meanwhile). A repeat too: the first attempt
            # may have died before this step.
            await self.due_now([name], now=time.time())
        elif self.cluster:
            # The message first, then the signal: a daemon nudged by the signal finds
            # the message; if the sender dies in between, the inbox sweep finds it.
            await self._nudge(signals, name)
        return _s(value)

    async def _nudge(self, signals: str, name: str) -> None:
        await self._batch.command(
            "XADD", signals, "MAXLEN", "~", SIGNALS_MAXLEN, "*", "cmd", "message", "agent", name
        )

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
