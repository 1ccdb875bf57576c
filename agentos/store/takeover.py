"""Taking an agent over: everything a new owner reads about an agent, in one round trip.

A daemon that has just taken an agent's lease reads its status, state, schedule, parked
wait and recent task records, creates the inbox's consumer group if missing, takes over
the messages an earlier reader had read but not finished and reads the first new ones:
nine commands per agent in one pipeline, for two hundred agents at a time. It reads
what :mod:`~agentos.store.inbox` and :mod:`~agentos.store.tasks` keep, so it sits above
them and takes them as arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.inbox import OPEN_NEW_MESSAGES, Inbox
from agentos.store.keys import INBOX_GROUP
from agentos.store.raw import RawReply
from agentos.store.records import AgentSnapshot, _s, messages_of
from agentos.store.tasks import task_records_of

__all__ = ["UNFINISHED_SCAN", "Takeover"]

UNFINISHED_SCAN = 200  # recent task records a new owner looks at for interrupted work


class Takeover:
    """Opening agents for a new owner (``store.takeover``)."""

    def __init__(self, conn: Conn, inbox: Inbox) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys
        self._inbox = inbox

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
        opened: dict[str, tuple[RawReply, ...]] = {}
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
                claimed += await self._inbox.claim(name, consumer)
                pending = await self._r.xreadgroup(
                    INBOX_GROUP, consumer, {k.inbox(name): "0"}, count=10_000
                )
            opened[name] = (status, state, pending, claimed, schedule, new, wait)
            recent[name] = [_s(i) for i in ids]
        records = await task_records_of(self.conn, recent)
        return {
            name: AgentSnapshot(
                status={_s(a): _s(b) for a, b in status.items()},
                state=bytes(state) if state is not None else None,
                pending=messages_of(pending),
                claimed=claimed,
                schedule={_s(a): float(b) for a, b in schedule.items()},
                unfinished=[t for t in records[name] if t.get("status") in ("queued", "running")],
                new=messages_of(new),
                wait={_s(a): _s(b) for a, b in wait.items()},
            )
            for name, (status, state, pending, claimed, schedule, new, wait) in opened.items()
        }
