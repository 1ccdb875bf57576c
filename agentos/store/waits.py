"""The due-time index, parked waits and held sets: where an agent lives while no daemon holds it.

An agent is either held by one daemon (a runner, a lease, a place in that daemon's
:meth:`~agentos.store.keys.Keys.held` set) or released: hibernated, waiting or never
started, with nothing of it in any daemon. A released agent is one entry of the fleet's
due-time index (a sorted set per ``{due:N}`` shard: agent -> when it must be activated):
its next trigger fire, a wait's deadline, now for a message, a wake, an answer or a new
apply; +inf when only an event can wake it. Daemons read the head of each shard (one
command per shard, whatever the size of the fleet), claim what is due
(``lua/wait_claim.lua``: atomic, and it expires, so a claimer that dies leaves the agent
due again), take its lease and drop the claim (``lua/due_unclaim.lua``).

A task that waits (for a person, an event, a time) is parked here too: one hash per
agent (the wait: question, choices, deadline, answer) beside its due entry, under the
same hash tag, so that an answer and the activation it causes are one atomic step even on
Redis Cluster.

The held sets are how a dead daemon's agents come back: a daemon adds the agents it
activates to its set and removes them as it releases them; when its heartbeat is older
than a lease, another daemon makes every agent of its set due now (:meth:`recover_held`).

Every script touches the keys of one slot only; each says which in its header.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

from agentos.core.waits import Resolution, WaitRecord
from agentos.store import steps
from agentos.store.batching import raise_first, run_many
from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.keys import DUE_SHARDS
from agentos.store.records import SIGNALS_MAXLEN, _s

__all__ = [
    "BUFFERED_EVENTS_MAX",
    "BUFFERED_EVENT_BYTES_MAX",
    "DUE_HEAD",
    "DUE_PEEK",
    "EVENTS_KEPT_S",
    "EventsFull",
    "Waits",
]

EVENTS_KEPT_S = 7 * 86_400  # an event nobody waited for is forgotten after a week
# What one agent keeps of events sent while it did not wait for them: a sender cannot
# fill Redis through an agent that never waits (latest of each name; a new name past
# the count, or bytes past the total, is refused).
BUFFERED_EVENTS_MAX = 100
BUFFERED_EVENT_BYTES_MAX = 1_048_576


class EventsFull(Exception):
    """An event was refused, nothing kept: the agent does not wait for it and already
    keeps ``BUFFERED_EVENTS_MAX`` other events (``what`` "count"), or keeping it would
    pass ``BUFFERED_EVENT_BYTES_MAX`` bytes (``what`` "bytes"); ``limit`` is that bound."""

    def __init__(self, name: str, event: str, what: str, limit: int) -> None:
        self.name, self.event, self.what, self.limit = name, event, what, limit
        held = f"{limit} events" if what == "count" else f"{limit} bytes of events"
        super().__init__(
            f'agent "{name}" does not wait for event "{event}" and already keeps {held} '
            "sent while it was not waiting; it takes more once it waits for them "
            "(or after a week)"
        )


DUE_PEEK = 8  # entries read per shard and pass: the earliest ones, never the whole index
DUE_HEAD = 256  # ... and at most this many due ones of a shard that has more due


def _score(at: float | None) -> str:
    return "+inf" if at is None or math.isinf(at) else repr(at)


class Waits:
    """Parked waits, the due-time index and the daemons' held sets (``store.waits``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys
        sc = conn.scripts
        self._wait_scripts = {
            "park": sc.wait_park,
            "arm": sc.wait_arm,
            "answer": sc.wait_answer,
            "event": sc.wait_event,
            "claim": sc.wait_claim,
            "clear": sc.wait_clear,
        }
        self._unclaim = sc.due_unclaim
        self._wake = sc.agent_wake

    def _wait_keys(self, name: str) -> tuple[str, str]:
        k = self.keys
        return k.wait(name), k.due(k.due_shard(name))

    @translate
    async def put(self, record: WaitRecord, *, provisional_at: float) -> bool:
        """Write ``record`` and make its agent due at ``provisional_at`` (the fenced park
        follows, then :meth:`arm`). Returns True when a buffered event answered it."""
        wait, due = self._wait_keys(record.agent)
        args: list[str] = [record.agent, _score(provisional_at), record.kind.value, record.question]
        for f, v in record.to_fields().items():
            args += [f, v]
        script = self._wait_scripts["park"]
        return bool(await script(keys=[wait, due, self.keys.wait_events(record.agent)], args=args))

    @translate
    async def arm(self, record: WaitRecord, *, now: float) -> bool:
        """After the park committed: due at the deadline, or now if already answered.
        Returns True when it is answered (the caller signals the daemons)."""
        wait, due = self._wait_keys(record.agent)
        reply = await self._wait_scripts["arm"](
            keys=[wait, due],
            args=[record.agent, record.park_id, _score(record.deadline), repr(now)],
        )
        return int(reply) == 1

    @translate
    async def get(self, name: str) -> WaitRecord | None:
        """The agent's parked wait, or None."""
        raw = await self._r.hgetall(self.keys.wait(name))
        if not raw:
            return None
        return WaitRecord.from_fields({_s(a): _s(b) for a, b in raw.items()})

    @translate
    async def answer(
        self, record: WaitRecord, resolution: Resolution, *, answer_id: str, now: float
    ) -> int:
        """Record ``resolution`` as the answer of ``record`` (as read and validated), once.

        Returns 1 recorded, 0 the task no longer waits, 2 answered before, 3 the wait
        changed since it was read (see ``lua/wait_answer.lua``).
        """
        wait, due = self._wait_keys(record.agent)
        return int(
            await self._wait_scripts["answer"](
                keys=[wait, due],
                args=[
                    record.agent,
                    record.task_id,
                    record.park_id,
                    json.dumps(resolution.to_json()),
                    answer_id,
                    repr(now),
                ],
            )
        )

    @translate
    async def event(
        self, name: str, event: str, resolution: Resolution, *, now: float, event_id: str
    ) -> bool:
        """Deliver ``event`` to agent ``name``: True when it answered the agent's wait,
        False when it is kept for the agent's next ``wait_for`` of that name. A retry
        with the same ``event_id`` after a lost reply is not applied twice.

        Raises :class:`EventsFull` when it would be kept past the agent's bound
        (:data:`BUFFERED_EVENTS_MAX` names, :data:`BUFFERED_EVENT_BYTES_MAX` bytes).
        """
        wait, due = self._wait_keys(name)
        verdict = int(
            await self._wait_scripts["event"](
                keys=[wait, due, self.keys.wait_events(name)],
                args=[
                    name,
                    event,
                    json.dumps(resolution.to_json()),
                    repr(now),
                    EVENTS_KEPT_S,
                    event_id,
                    BUFFERED_EVENTS_MAX,
                    BUFFERED_EVENT_BYTES_MAX,
                ],
            )
        )
        if verdict == -1:
            raise EventsFull(name, event, "count", BUFFERED_EVENTS_MAX)
        if verdict == -2:
            raise EventsFull(name, event, "bytes", BUFFERED_EVENT_BYTES_MAX)
        return verdict == 1

    @translate
    async def clear(self, name: str, park_id: str) -> bool:
        """Remove the agent's wait (if it is still ``park_id``) and its due entry."""
        wait, due = self._wait_keys(name)
        return bool(await self._wait_scripts["clear"](keys=[wait, due], args=[name, park_id]))

    @translate
    async def due_head(
        self, count: int = DUE_PEEK, *, now: float | None = None
    ) -> dict[str, float]:
        """The earliest entries of every shard with their due times: what is due now and
        when the next one is, in one small read per shard however large the index.

        ``count`` entries per shard; with ``now``, a shard whose ``count`` entries are all
        due is read again for up to :data:`DUE_HEAD` of its due ones.
        """
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for shard in range(DUE_SHARDS):
                pipe.zrange(k.due(shard), 0, count - 1, withscores=True)
            replies = await pipe.execute()
        full = [
            shard
            for shard, reply in enumerate(replies)
            if now is not None and len(reply) == count and float(reply[-1][1]) <= now
        ]
        if full:
            async with self._r.pipeline(transaction=False) as pipe:
                for shard in full:
                    pipe.zrangebyscore(
                        k.due(shard), "-inf", repr(now), start=0, num=DUE_HEAD, withscores=True
                    )
                for shard, reply in zip(full, await pipe.execute(), strict=True):
                    replies[shard] = reply
        return {_s(m): float(s) for reply in replies for m, s in reply}

    @translate
    async def due_scan(self) -> dict[str, float]:
        """Every agent in the due index with its due time (the whole index: for rare work
        such as a policy change, never on a timer)."""
        k = self.keys
        out: dict[str, float] = {}
        for shard in range(DUE_SHARDS):
            async for member, score in self._r.zscan_iter(k.due(shard), count=1000):
                out[_s(member)] = float(score)
        return out

    @translate
    async def due_count(self) -> int:
        """How many agents are released (in the due index)."""
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for shard in range(DUE_SHARDS):
                pipe.zcard(k.due(shard))
            return sum(int(n) for n in await pipe.execute())

    @translate
    async def due_now(self, names: Sequence[str], *, now: float, new: bool = False) -> None:
        """Make released agents due at ``now`` (never later than they already are) and
        nudge the daemons. With ``new`` only agents not in the index yet are added
        (freshly applied ones: their first activation runs their start task)."""
        await steps.due_now(self.conn, names, now=now, new=new)

    @translate
    async def due_release(
        self, name: str, daemon_id: str, at: float, *, now: float, look: bool = True
    ) -> float:
        """After the agent's lease was given up: it is due at ``at`` (or earlier, if
        something made it due meanwhile), or now when its inbox holds messages nobody
        took or a wake is pending; it leaves the daemon's held set. Returns the due time.

        Looking after the release is what makes it safe: a message sent before it is seen
        here, one sent after it found no lease and made the agent due itself. Without
        ``look`` the agent is due at ``at`` whatever its inbox holds (a retry later).
        """
        k = self.keys
        if look:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hget(k.status(name), "woken")
                pipe.xlen(k.inbox(name))
                woken, length = await pipe.execute()
            if woken or (int(length) and await steps.inbox_depth(self.conn, name)):
                at = now
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zadd(k.due(k.due_shard(name)), {name: _score(at)}, lt=True)
            pipe.srem(k.held(daemon_id), name)
            if at <= now:
                pipe.xadd(
                    k.signals(k.signal_shard(name)),
                    {"cmd": "due", "agent": name},
                    maxlen=SIGNALS_MAXLEN,
                    approximate=True,
                )
            await pipe.execute()
        return at

    @translate
    async def due_unclaim(self, claims: Mapping[str, float]) -> None:
        """Drop claims (agent -> claim score) that are still what the index holds."""
        if not claims:
            return
        k = self.keys
        calls = [([k.due(k.due_shard(n))], [n, repr(at)]) for n, at in claims.items()]
        raise_first(await run_many(self._r, self._unclaim, calls))

    @translate
    async def due_defer(self, due: Mapping[str, float]) -> None:
        """Move agents that are in the index to new due times (a claim whose lease was
        still held by a dead daemon: due again when that lease expires)."""
        if not due:
            return
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for name, at in due.items():
                pipe.zadd(k.due(k.due_shard(name)), {name: at}, xx=True)
            await pipe.execute()

    # ---------------------------------------------------------------- held sets

    @translate
    async def held_add(self, daemon_id: str, names: Sequence[str]) -> None:
        """Record that ``daemon_id`` holds ``names`` (and that it is a holder)."""
        if not names:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.sadd(self.keys.holders, daemon_id)
            pipe.sadd(self.keys.held(daemon_id), *names)
            await pipe.execute()

    @translate
    async def held_remove(self, daemon_id: str, names: Sequence[str]) -> None:
        """``daemon_id`` no longer holds ``names``."""
        if names:
            await self._r.srem(self.keys.held(daemon_id), *names)

    @translate
    async def is_holder(self, daemon_id: str) -> bool:
        """Whether the daemon is still listed as a holder (others recover a dead one's)."""
        return bool(await self._r.sismember(self.keys.holders, daemon_id))

    @translate
    async def holders(self) -> set[str]:
        """Ids of the daemons that hold (or held, and were not recovered) agents."""
        return {_s(d) for d in await self._r.smembers(self.keys.holders)}

    @translate
    async def recover_held(self, daemon_id: str, *, now: float) -> list[str]:
        """A daemon is gone (its heartbeat older than a lease): make every agent it held
        due now, then forget its set. Returns those agents. Safe to run on several
        daemons at once: the claims decide who activates each."""
        k = self.keys
        names = sorted(_s(n) for n in await self._r.smembers(k.held(daemon_id)))
        for i in range(0, len(names), 1000):
            await steps.due_now(self.conn, names[i : i + 1000], now=now)
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.delete(k.held(daemon_id))
            pipe.srem(k.holders, daemon_id)
            await pipe.execute()
        return names

    @translate
    async def still_held(self, daemon_id: str) -> int:
        """How many agents the daemon's held set still lists."""
        return int(await self._r.scard(self.keys.held(daemon_id)))

    @translate
    async def held_counts(self, daemon_ids: Sequence[str]) -> dict[str, int]:
        """How many agents each daemon holds (the size of its held set)."""
        if not daemon_ids:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for daemon_id in daemon_ids:
                pipe.scard(self.keys.held(daemon_id))
            counts = await pipe.execute()
        return {d: int(n) for d, n in zip(daemon_ids, counts, strict=True)}

    @translate
    async def leave_holders(self, daemon_id: str) -> None:
        """A daemon that released everything leaves the holders on its way out."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.srem(self.keys.holders, daemon_id)
            pipe.delete(self.keys.held(daemon_id))
            await pipe.execute()

    @translate
    async def wake(self, name: str, *, now: float) -> bool:
        """Ask for a wake task; True when a daemon holds the agent (then signal it), False
        when the agent was released (it is made due now here)."""
        k = self.keys
        held = bool(int(await self._wake(keys=[k.lease(name), k.status(name)], args=[repr(now)])))
        if not held:
            await steps.due_now(self.conn, [name], now=now)
        return held

    @translate
    async def due_claim(self, names: Sequence[str], *, now: float, claim_s: float) -> list[str]:
        """Claim the agents of ``names`` that are due by ``now`` (each for ``claim_s``:
        if this daemon dies they are due again then). Returns the ones claimed."""
        if not names:
            return []
        k = self.keys
        calls = [([k.due(k.due_shard(n))], [n, repr(now), repr(now + claim_s)]) for n in names]
        replies = raise_first(await run_many(self._r, self._wait_scripts["claim"], calls))
        return [n for n, ok in zip(names, replies, strict=True) if int(ok)]

    @translate
    async def pending(self, names: Sequence[str] | None = None) -> list[WaitRecord]:
        """The parked waits of ``names`` (default: every agent in the due index)."""
        if names is None:
            names = sorted(await self.due_scan())
        out: list[WaitRecord] = []
        for i in range(0, len(names), 1000):
            async with self._r.pipeline(transaction=False) as pipe:
                for name in names[i : i + 1000]:
                    pipe.hgetall(self.keys.wait(name))
                raw = await pipe.execute()
            out += [WaitRecord.from_fields({_s(a): _s(b) for a, b in h.items()}) for h in raw if h]
        return out

    @translate
    async def purge(self, name: str) -> None:
        """Forget a deleted agent's wait, buffered events and due entry."""
        await steps.purge_waits(self.conn, name)
