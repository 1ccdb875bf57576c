"""Quota counters in Redis: admission, settlement, budgets and the fleet's quota documents.

Admission is one Lua script (``lua/quota_admit.lua``) per attempt, on the server's clock,
touching only keys with the class's ``{quota:CLASS}`` hash tag: the class's and the
agent's GCRA tokens-per-minute state, concurrency holders with lease expiries, a fair
waiting queue, and today's budget counters. Several daemons admitting against one class
therefore see one truth, and a daemon that dies mid-call gives its slots back when their
leases run out. ``quota_settle.lua`` replaces a call's estimate with what it really used.

The fleet-wide documents (effective limits, the rules' memory, published metrics) share
the ``{fleet}`` tag and are written by the one daemon that holds the evaluator lease,
checked inside the script that writes them (``quota_publish.lua``).

Every counter has a bound: GCRA states expire when they fall behind the clock, budget
days and minute counters expire, and the holder, waiter and sleeper sets of a class
that nobody uses any more expire a day after their last write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentos.core.policy import ClassQuota, Limits, RuleMemory
from agentos.store.batching import raise_first, run_many
from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.keys import event_fields
from agentos.store.raw import RawReply
from agentos.store.records import FLEET_EVENTS_MAXLEN

__all__ = ["AdmitReply", "AdmitRequest", "ClassUsage", "Quotas"]

BUDGET_TTL_S = 3 * 86_400  # a day's counters outlive the day, for `agentos quota` and reports
REPORTS_TTL_S = 3600  # the daemons' published samples, if no daemon reports any more
WAITER_TTL_MS = 2_000  # a queued caller that stops asking for this long loses its place
BURST_S = 10.0
"""A tokens-per-minute limit lets this many seconds' worth of tokens through at once (the
GCRA burst tolerance): over any minute at most 70/60 of the limit, over longer exactly it."""


@dataclass(frozen=True, slots=True)
class AdmitReply:
    """One admission attempt: ``status`` 1 admitted (sleep ``ms`` first), 0 queued (ask
    again in ``ms``), -1 rate limit past the caller's wait, -2 budget spent."""

    status: int
    ms: int
    what: str


@dataclass(slots=True)
class ClassUsage:
    """What one quota class is using now, as `agentos quota` shows it."""

    in_flight: dict[str, int] = field(default_factory=dict)  # agent -> calls holding slots
    queued: list[str] = field(default_factory=list)  # agents waiting for a slot, in order
    pacing: list[str] = field(default_factory=list)  # agents sleeping on a rate reservation
    day_tokens: int = 0
    day_seconds: float = 0.0
    agent_day_tokens: dict[str, int] = field(default_factory=dict)
    agent_day_seconds: dict[str, float] = field(default_factory=dict)
    tokens_last_minute: int = 0
    agent_tokens_last_minute: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """One call asking for admission (see :meth:`Quotas.quota_admit_many`)."""

    agent: str
    call: str
    estimate: int
    max_wait_s: float
    score: float
    agent_limits: Limits


def _limit_args(lim: Limits) -> list[int]:
    return [
        lim.tokens_per_minute or 0,
        lim.max_concurrent or 0,
        lim.daily_tokens or 0,
        lim.daily_agent_seconds or 0,
    ]


def _s(value: RawReply) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _minute_tokens(current: Mapping[str, int], previous: Mapping[str, int], frac: float) -> int:
    # Sliding window over two fixed minutes: all of this one, the unexpired part of the last.
    return round(sum(current.values()) + sum(previous.values()) * (1.0 - frac))


class Quotas:
    """Quota admission, settlement, budgets and the fleet's quota documents
    (``store.quotas``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self._batch = conn.batch
        self.keys = conn.keys
        self._acquire = conn.scripts.lease_acquire
        self._release = conn.scripts.lease_release
        sc = conn.scripts
        self._q_admit = sc.quota_admit
        self._q_settle = sc.quota_settle
        self._q_renew = sc.quota_renew
        self._q_publish = sc.quota_publish
        self._q_charge = sc.quota_charge

    # ------------------------------------------------------------------ admission

    @translate
    async def admit(
        self,
        *,
        quota_class: str,
        agent: str,
        call: str,
        estimate: int,
        max_wait_s: float,
        lease_s: float,
        score: float,
        limits: Limits,
        agent_limits: Limits,
        day: str,
        day_left_s: float,
    ) -> AdmitReply:
        """One admission attempt (see ``quota_admit.lua``)."""
        (reply,) = await self.admit_many(
            quota_class=quota_class,
            limits=limits,
            day=day,
            day_left_s=day_left_s,
            lease_s=lease_s,
            requests=[AdmitRequest(agent, call, estimate, max_wait_s, score, agent_limits)],
        )
        return reply

    @translate
    async def admit_many(
        self,
        *,
        quota_class: str,
        limits: Limits,
        day: str,
        day_left_s: float,
        lease_s: float,
        requests: Sequence[AdmitRequest],
    ) -> list[AdmitReply]:
        """Admission attempts for several calls of one class in one round trip, decided
        in the order given (callers sort them fairly)."""
        q = self.keys.quota
        keys = [
            q(quota_class, "tat"),
            q(quota_class, "holders"),
            q(quota_class, "waiters"),
            q(quota_class, "waiters:ttl"),
            q(quota_class, f"day:{day}"),
            q(quota_class, "sleepers"),
        ]
        args: list[object] = [
            len(requests),
            max(1, int(lease_s * 1000)),
            WAITER_TTL_MS,
            *_limit_args(limits),
            max(0, int(day_left_s * 1000)),
            BUDGET_TTL_S,
            int(BURST_S * 1000),
        ]
        for r in requests:
            keys += [q(quota_class, f"tat:{r.agent}"), q(quota_class, f"holders:{r.agent}")]
            args += [
                r.agent,
                r.call,
                max(0, int(r.estimate)),
                max(0, int(r.max_wait_s * 1000)),
                repr(float(r.score)),
                *_limit_args(r.agent_limits),
            ]
        raw = await self._batch.run(self._q_admit, keys, args)
        return [
            AdmitReply(int(raw[i]), int(raw[i + 1]), _s(raw[i + 2])) for i in range(0, len(raw), 3)
        ]

    @translate
    async def settle(
        self,
        *,
        quota_class: str,
        agent: str,
        call: str,
        estimate: int,
        actual: int,
        limits: Limits,
        agent_limits: Limits,
        day: str,
        minute: int,
    ) -> None:
        """Free the call's slot and correct its estimate to ``actual`` tokens.

        Settlements of one event-loop tick (every call that ended together, of any
        class) share one round trip, as admissions do."""
        q = self.keys.quota
        await self._batch.run(
            self._q_settle,
            [
                q(quota_class, "tat"),
                q(quota_class, f"tat:{agent}"),
                q(quota_class, "holders"),
                q(quota_class, f"holders:{agent}"),
                q(quota_class, f"day:{day}"),
                q(quota_class, f"min:{minute}"),
                q(quota_class, "sleepers"),
            ],
            [
                agent,
                call,
                int(estimate),
                int(actual),
                limits.tokens_per_minute or 0,
                agent_limits.tokens_per_minute or 0,
                BUDGET_TTL_S,
                0,
            ],
        )

    @translate
    async def renew(self, calls: Sequence[tuple[str, tuple[str, str]]], *, lease_s: float) -> None:
        """Extend admitted calls' concurrency leases (waiting or running; never shortened):
        (call id, (class, agent)) each."""
        q = self.keys.quota
        batch = [
            (
                [q(quota_class, "holders"), q(quota_class, f"holders:{agent}")],
                [agent, call, max(1, int(lease_s * 1000))],
            )
            for call, (quota_class, agent) in calls
        ]
        raise_first(await run_many(self._r, self._q_renew, batch))

    @translate
    async def unqueue(self, *, quota_class: str, agent: str, call: str) -> None:
        """Leave the class's waiting queue (the caller gave up)."""
        q = self.keys.quota
        member = f"{agent}|{call}"
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.zrem(q(quota_class, "waiters"), member)
            pipe.zrem(q(quota_class, "waiters:ttl"), member)
            await pipe.execute()

    @translate
    async def charge_seconds(
        self, charges: Sequence[tuple[str, str, str, float]], *, op_id: str | None = None
    ) -> None:
        """Add active agent-seconds to daily budgets: (class, agent, day, seconds) each.

        With ``op_id`` a repeat of the same charges (a retry after a lost reply) is not
        counted again.
        """
        if not charges:
            return
        by_day: dict[tuple[str, str], list[str]] = {}
        for quota_class, agent, day, seconds in charges:
            by_day.setdefault((quota_class, day), []).extend([agent, repr(float(seconds))])
        q = self.keys.quota
        batch = [
            (
                [q(quota_class, f"charged:{op_id or ''}:{day}"), q(quota_class, f"day:{day}")],
                [op_id or "", BUDGET_TTL_S, *pairs],
            )
            for (quota_class, day), pairs in by_day.items()
        ]
        raise_first(await run_many(self._r, self._q_charge, batch))

    # ------------------------------------------------------------------ reading usage

    @translate
    async def usage(
        self, days: Mapping[str, str], *, now: float | None = None
    ) -> dict[str, ClassUsage]:
        """What each class in ``days`` (class -> its current budget day) is using now."""
        now = time.time() if now is None else now
        now_ms = int(now * 1000)
        minute = int(now // 60)
        frac = (now % 60) / 60
        classes = list(days)
        q = self.keys.quota
        async with self._r.pipeline(transaction=False) as pipe:
            for c in classes:
                pipe.zrangebyscore(q(c, "holders"), now_ms, "+inf")
                pipe.zrange(q(c, "waiters"), 0, -1)
                pipe.zrangebyscore(q(c, "waiters:ttl"), now_ms, "+inf")
                pipe.zrangebyscore(q(c, "sleepers"), now_ms, "+inf")
                pipe.hgetall(q(c, f"day:{days[c]}"))
                pipe.hgetall(q(c, f"min:{minute}"))
                pipe.hgetall(q(c, f"min:{minute - 1}"))
            raw = await pipe.execute()
        out: dict[str, ClassUsage] = {}
        for i, c in enumerate(classes):
            holders, waiters, alive, sleepers, day, cur, prev = raw[7 * i : 7 * i + 7]
            u = ClassUsage()
            for m in holders:
                name = _s(m).rsplit("|", 1)[0]
                u.in_flight[name] = u.in_flight.get(name, 0) + 1
            live = {_s(m) for m in alive}
            u.queued = list(
                dict.fromkeys(_s(m).rsplit("|", 1)[0] for m in waiters if _s(m) in live)
            )
            u.pacing = [_s(m) for m in sleepers]
            for key, value in ((_s(a), _s(b)) for a, b in day.items()):
                if key == "tokens":
                    u.day_tokens = int(float(value))
                elif key == "seconds":
                    u.day_seconds = float(value)
                elif key.startswith("tokens:"):
                    u.agent_day_tokens[key[7:]] = int(float(value))
                elif key.startswith("seconds:"):
                    u.agent_day_seconds[key[8:]] = float(value)
            now_counts = {_s(a): int(b) for a, b in cur.items()}
            prev_counts = {_s(a): int(b) for a, b in prev.items()}
            u.tokens_last_minute = _minute_tokens(
                {"": now_counts.get("", 0)}, {"": prev_counts.get("", 0)}, frac
            )
            for name in (set(now_counts) | set(prev_counts)) - {""}:
                u.agent_tokens_last_minute[name] = _minute_tokens(
                    {name: now_counts.get(name, 0)}, {name: prev_counts.get(name, 0)}, frac
                )
            out[c] = u
        return out

    # ------------------------------------------------------------------ fleet documents

    @translate
    async def effective(self) -> dict[str, ClassQuota] | None:
        """The effective limits the evaluator last wrote, or None before it first ran."""
        raw = await self._r.get(self.keys.quota_effective)
        if raw is None:
            return None
        data = json.loads(raw)
        return {name: ClassQuota.from_json(body) for name, body in data["classes"].items()}

    @translate
    async def state(self) -> tuple[dict[str, RuleMemory], dict[str, Any]]:
        """The rules' memory and the fleet metrics the evaluator last used (with ``at``)."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.quota_memory)
            pipe.get(self.keys.quota_fleet_metrics)
            memory_raw, metrics_raw = await pipe.execute()
        memory = {k: RuleMemory.from_json(v) for k, v in json.loads(memory_raw or "{}").items()}
        return memory, json.loads(metrics_raw or "{}")

    @translate
    async def publish(
        self,
        *,
        lease_value: str,
        quotas: Mapping[str, ClassQuota],
        memory: Mapping[str, RuleMemory],
        metrics: Mapping[str, Any],
        events: Sequence[tuple[str, str, str, str]],
    ) -> bool:
        """Write the evaluator's result and its rescale events (policy, type, reason,
        message) in one step, only while ``lease_value`` is the evaluator lease.

        Returns False (and writes nothing) when the lease is no longer the caller's.
        """
        k = self.keys
        now = time.time()
        doc = {"at": now, "classes": {n: q.to_json() for n, q in quotas.items()}}
        args: list[str | int] = [
            lease_value,
            json.dumps(doc, sort_keys=True),
            json.dumps({n: m.to_json() for n, m in memory.items()}, sort_keys=True),
            json.dumps(dict(metrics), sort_keys=True),
        ]
        ok = await self._q_publish(
            keys=[k.quota_lease, k.quota_effective, k.quota_memory, k.quota_fleet_metrics],
            args=args,
        )
        if ok and events:
            # The feed is sharded (by policy name here): its copies follow the write.
            async with self._r.pipeline(transaction=False) as pipe:
                for policy, type_, reason, message in events:
                    pipe.xadd(
                        k.fleet_events(k.feed_shard(policy)),
                        event_fields(policy, now, type_, reason, message, ""),
                        maxlen=FLEET_EVENTS_MAXLEN,
                        approximate=True,
                    )
                await pipe.execute()
        return bool(ok)

    @translate
    async def evaluator_lease(self, daemon_id: str, ttl_ms: int) -> str | None:
        """Take or extend the evaluator lease; returns its value ("daemon|token") or None."""
        k = self.keys
        token = int(
            await self._acquire(keys=[k.quota_lease, k.quota_fence], args=[daemon_id, ttl_ms])
        )
        return f"{daemon_id}|{token}" if token else None

    @translate
    async def evaluator_release(self, value: str) -> None:
        """Give the evaluator lease up (at shutdown), if it is still ours."""
        await self._release(keys=[self.keys.quota_lease], args=[value])

    @translate
    async def report(self, daemon_id: str, sample: Mapping[str, Any]) -> None:
        """Publish this daemon's recent inference samples for the evaluator."""
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.quota_metrics, daemon_id, json.dumps(dict(sample)))
            # Stale entries are dropped by the evaluator; the hash goes when all are gone.
            pipe.expire(self.keys.quota_metrics, REPORTS_TTL_S)
            await pipe.execute()

    @translate
    async def reports(self, *, max_age_s: float) -> dict[str, dict[str, Any]]:
        """Every daemon's published samples younger than ``max_age_s``; stale ones are removed."""
        raw = await self._r.hgetall(self.keys.quota_metrics)
        now = time.time()
        fresh: dict[str, dict[str, Any]] = {}
        stale: list[str] = []
        for a, b in raw.items():
            body = json.loads(b)
            if now - float(body.get("at", 0)) <= max_age_s:
                fresh[_s(a)] = body
            else:
                stale.append(_s(a))
        if stale:
            await self._r.hdel(self.keys.quota_metrics, *stale)
        return fresh

    @translate
    async def budget_used(self, days: Mapping[str, str]) -> dict[str, tuple[int, float]]:
        """Class -> (tokens, agent-seconds) used on its current day."""
        classes = list(days)
        async with self._r.pipeline(transaction=False) as pipe:
            for c in classes:
                pipe.hmget(self.keys.quota(c, f"day:{days[c]}"), "tokens", "seconds")
            raw = await pipe.execute()
        return {
            c: (int(float(r[0] or 0)), float(r[1] or 0)) for c, r in zip(classes, raw, strict=True)
        }

    @translate
    async def add_cost(self, costs: Mapping[tuple[str, str], float]) -> None:
        """Add money spent to classes' budget days: (class, day) -> amount (the ``cost``
        field of the day's counters, beside its tokens and seconds)."""
        if not costs:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for (quota_class, day), amount in costs.items():
                key = self.keys.quota(quota_class, f"day:{day}")
                pipe.hincrbyfloat(key, "cost", float(amount))
                pipe.expire(key, BUDGET_TTL_S)
            await pipe.execute()

    @translate
    async def cost_used(self, days: Mapping[str, str]) -> dict[str, float]:
        """Class -> money spent on its current day (``days``: class -> that day)."""
        classes = list(days)
        async with self._r.pipeline(transaction=False) as pipe:
            for c in classes:
                pipe.hget(self.keys.quota(c, f"day:{days[c]}"), "cost")
            raw = await pipe.execute()
        return {c: float(r or 0) for c, r in zip(classes, raw, strict=True)}

    @translate
    async def budget_warn_once(self, quota_class: str, day: str, limit: str) -> bool:
        """True the first time it is asked for (class, day, limit); kept two days."""
        key = self.keys.quota(quota_class, f"warned:{day}:{limit}")
        return bool(await self._r.set(key, "1", nx=True, ex=2 * 86_400))
