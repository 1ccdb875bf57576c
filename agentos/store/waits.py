"""Parked waits and the due-time index: where a waiting agent lives while no daemon holds it.

A task that waits (for a person, an event, a time) is parked here and its agent released:
no runner, lease or timer anywhere. What it waits for is one hash per agent (the wait:
question, choices, deadline, answer) and one entry in the fleet's due-time index (a
sorted set: agent -> when it must be activated), both under the agent's ``{due:N}``
hash tag, so that an answer and the activation it causes are one atomic step even on
Redis Cluster. Daemons read the index (one command per shard, whatever the number of
waiting agents) and claim what is due (``lua/wait_claim.lua``). The index is the
general activation mechanism: anything that makes an agent due later goes in it.

Every script touches the keys of one slot only; each says which in its header.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from agentos.core.waits import Resolution, WaitRecord
from agentos.store.batching import raise_first, run_many
from agentos.store.errors import translate
from agentos.store.keys import DUE_SHARDS, Keys
from agentos.store.records import _s

__all__ = ["EVENTS_KEPT_S", "WaitOps"]

EVENTS_KEPT_S = 7 * 86_400  # an event nobody waited for is forgotten after a week


def _score(at: float | None) -> str:
    return "+inf" if at is None or math.isinf(at) else repr(at)


class WaitOps:
    """Wait and due-index methods of :class:`agentos.store.Store` (mixed in)."""

    _r: Any
    keys: Keys
    _wait_scripts: dict[str, Any]

    def _waits_scripts(self, client: Any, load: Any) -> None:
        self._wait_scripts = {
            n: client.register_script(load(f"wait_{n}"))
            for n in ("park", "arm", "answer", "event", "claim", "clear")
        }

    def _wait_keys(self, name: str) -> tuple[str, str]:
        k = self.keys
        return k.wait(name), k.due(k.due_shard(name))

    @translate
    async def wait_park(self, record: WaitRecord, *, provisional_at: float) -> bool:
        """Write ``record`` and make its agent due at ``provisional_at`` (the fenced park
        follows, then :meth:`wait_arm`). Returns True when a buffered event answered it."""
        wait, due = self._wait_keys(record.agent)
        args: list[str] = [record.agent, _score(provisional_at), record.kind.value, record.question]
        for f, v in record.to_fields().items():
            args += [f, v]
        script = self._wait_scripts["park"]
        return bool(await script(keys=[wait, due, self.keys.wait_events(record.agent)], args=args))

    @translate
    async def wait_arm(self, record: WaitRecord, *, now: float) -> bool:
        """After the park committed: due at the deadline, or now if already answered.
        Returns True when it is answered (the caller signals the daemons)."""
        wait, due = self._wait_keys(record.agent)
        reply = await self._wait_scripts["arm"](
            keys=[wait, due],
            args=[record.agent, record.park_id, _score(record.deadline), repr(now)],
        )
        return int(reply) == 1

    @translate
    async def wait_get(self, name: str) -> WaitRecord | None:
        """The agent's parked wait, or None."""
        raw = await self._r.hgetall(self.keys.wait(name))
        if not raw:
            return None
        return WaitRecord.from_fields({_s(a): _s(b) for a, b in raw.items()})

    @translate
    async def wait_answer(
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
    async def wait_event(
        self, name: str, event: str, resolution: Resolution, *, now: float, event_id: str
    ) -> bool:
        """Deliver ``event`` to agent ``name``: True when it answered the agent's wait,
        False when it is kept for the agent's next ``wait_for`` of that name. A retry
        with the same ``event_id`` after a lost reply is not applied twice."""
        wait, due = self._wait_keys(name)
        return bool(
            await self._wait_scripts["event"](
                keys=[wait, due, self.keys.wait_events(name)],
                args=[
                    name,
                    event,
                    json.dumps(resolution.to_json()),
                    repr(now),
                    EVENTS_KEPT_S,
                    event_id,
                ],
            )
        )

    @translate
    async def wait_clear(self, name: str, park_id: str) -> bool:
        """Remove the agent's wait (if it is still ``park_id``) and its due entry."""
        wait, due = self._wait_keys(name)
        return bool(await self._wait_scripts["clear"](keys=[wait, due], args=[name, park_id]))

    @translate
    async def due_scan(self) -> dict[str, float]:
        """Every agent in the due index with its due time: one command per shard."""
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            for shard in range(DUE_SHARDS):
                pipe.zrange(k.due(shard), 0, -1, withscores=True)
            replies = await pipe.execute()
        return {_s(m): float(s) for reply in replies for m, s in reply}

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
    async def due_defer(self, name: str, at: float) -> None:
        """Move an agent that is in the due index to ``at`` (a claim that could not start)."""
        k = self.keys
        await self._r.zadd(k.due(k.due_shard(name)), {name: at}, xx=True)

    @translate
    async def pending_waits(self, names: Sequence[str] | None = None) -> list[WaitRecord]:
        """The parked waits of ``names`` (default: every agent in the due index)."""
        if names is None:
            names = sorted(await self.due_scan())
        if not names:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.keys.wait(name))
            raw = await pipe.execute()
        return [WaitRecord.from_fields({_s(a): _s(b) for a, b in h.items()}) for h in raw if h]

    @translate
    async def purge_waits(self, name: str) -> None:
        """Forget a deleted agent's wait, buffered events and due entry."""
        k = self.keys
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.delete(k.wait(name), k.wait_events(name))
            pipe.zrem(k.due(k.due_shard(name)), name)
            await pipe.execute()

    @translate
    async def budget_warn_once(self, quota_class: str, day: str, limit: str) -> bool:
        """True the first time it is asked for (class, day, limit); kept two days."""
        key = self.keys.quota(quota_class, f"warned:{day}:{limit}")
        return bool(await self._r.set(key, "1", nx=True, ex=2 * 86_400))
