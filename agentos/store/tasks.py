"""Task records and idempotency keys: reading, judging again and trimming them.

Fenced writes (:mod:`~agentos.store.writes`) leave a record per task (a hash, listed in
the agent's ``tasks`` index by creation time) and an idempotency key per completed
message; they are read and trimmed here, and a finished task's verdict is judged again
here (``set_task_outcome``, ``lua/task_outcome.lua``: the record and the day's usage
counters in one step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.records import _s

__all__ = ["Tasks", "task_records_of"]


async def task_records_of(
    conn: Conn, ids: Mapping[str, Sequence[str]]
) -> dict[str, list[dict[str, str]]]:
    """Task records of several agents in one round trip (none when there are none)."""
    out: dict[str, list[dict[str, str]]] = {name: [] for name in ids}
    pairs = [(name, task_id) for name, task_ids in ids.items() for task_id in task_ids]
    if not pairs:
        return out
    async with conn.r.pipeline(transaction=False) as pipe:
        for name, task_id in pairs:
            pipe.hgetall(conn.keys.task(name, task_id))
        raw = await pipe.execute()
    for (name, _), h in zip(pairs, raw, strict=True):
        if h:
            out[name].append({_s(a): _s(b) for a, b in h.items()})
    return out


class Tasks:
    """Task records of agents (``store.tasks``; ``recent`` was ``Store.tasks``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys
        self._outcome_script = conn.scripts.task_outcome

    async def _task_records(self, name: str, ids: Sequence[str]) -> list[dict[str, str]]:
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hgetall(self.keys.task(name, task_id))
            raw = await pipe.execute()
        return [{_s(a): _s(b) for a, b in h.items()} for h in raw if h]

    @translate
    async def recent(
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
    async def set_outcome(
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
            args=[outcome, verdict, day, math.ceil(self.conn.retention.usage_s), agent_outcome],
        )
        return bool(int(reply[0])), _s(reply[1])

    @translate
    async def get(self, name: str, task_id: str) -> dict[str, str]:
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
    async def trim(self, name: str, *, keep: int, max_age_s: float) -> int:
        """Drop task records beyond the newest ``keep`` or older than ``max_age_s``, and
        idempotency keys older than ``max_age_s``. Returns how many records went."""
        return await self.trim_many([name], keep=keep, max_age_s=max_age_s)

    @translate
    async def trim_many(self, names: Sequence[str], *, keep: int, max_age_s: float) -> int:
        """:meth:`trim` for many agents in two pipelines per 500 agents; also forgets
        usage days past the usage retention. Returns how many task records went."""
        k = self.keys
        removed = 0
        cutoff = time.time() - max_age_s
        oldest_day = time.strftime(
            "%Y-%m-%d", time.gmtime(time.time() - self.conn.retention.usage_s)
        )
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
