"""The pure decisions of quota governance: who goes next, how much was used, when a day ends.

Admission itself happens in Redis (one Lua script, so that limits hold across daemons;
see ``agentos/store/quota.py``). What stays here is decided in-process and must be
testable by tables without a server:

* :func:`fair_order` / :func:`pick`: which waiting agent gets the next engine slot or
  inference turn. Strict priority between ``priority`` levels; within a level, least
  attained service first (the agent that has used the least recently), then the one
  that has waited longest. A busy agent therefore cannot starve a quiet one.
* :class:`AttainedService`: tokens used per agent, decayed exponentially with a
  half-life, so "recently" has a definite meaning and old usage is forgiven.
* :func:`fair_score`: the same order as one float, for the cross-daemon waiting queue
  kept in a Redis sorted set.
* :func:`day_window`: the calendar day (in a policy's timezone) that daily budgets count
  against, and how long until it ends (the retry-after of an exhausted budget).
* :class:`QuotaExceeded`: the typed error an agent sees when a call is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

__all__ = [
    "MAX_PRIORITY",
    "AttainedService",
    "QuotaExceeded",
    "Waiter",
    "burn_rate",
    "day_window",
    "fair_order",
    "fair_score",
    "fleet_metrics",
    "pick",
]

MAX_PRIORITY = 1000  # spec.AgentSpec.priority is 0..1000, higher goes first
_SERVICE_CAP = 1e12  # attained tokens above this tie; keeps fair_score exact in a float


class QuotaExceeded(Exception):
    """An inference call was refused by a quota.

    ``kind`` is ``rate`` (tokens per minute; the wait would exceed the caller's
    timeout), ``concurrency`` (no inference slot freed up within the timeout) or
    ``budget`` (a daily budget is spent: refused at once). ``scope`` is ``class`` or
    ``agent``; ``limit`` the limit's name as in the policy; ``retry_after_s`` when a
    retry may succeed (for a budget, when the policy's day ends).
    """

    def __init__(
        self,
        *,
        kind: str,
        scope: str,
        quota_class: str,
        limit: str,
        retry_after_s: float,
        agent: str = "",
    ) -> None:
        self.kind = kind
        self.scope = scope
        self.quota_class = quota_class
        self.limit = limit
        self.retry_after_s = max(0.0, retry_after_s)
        self.agent = agent
        whose = f'agent "{agent}" of class' if scope == "agent" and agent else "class"
        super().__init__(
            f'{kind} quota exceeded: {limit} of {whose} "{quota_class}"; '
            f"retry after {self.retry_after_s:.1f}s"
        )

    def __reduce__(self) -> tuple[object, ...]:  # keyword-only init: pickle by fields
        return (
            _rebuild,
            (
                self.kind,
                self.scope,
                self.quota_class,
                self.limit,
                self.retry_after_s,
                self.agent,
            ),
        )


def _rebuild(
    kind: str, scope: str, quota_class: str, limit: str, retry: float, agent: str
) -> QuotaExceeded:
    return QuotaExceeded(
        kind=kind,
        scope=scope,
        quota_class=quota_class,
        limit=limit,
        retry_after_s=retry,
        agent=agent,
    )


@dataclass(frozen=True, slots=True)
class Waiter:
    """An agent waiting for a turn: its priority, its attained service, since when it waits."""

    name: str
    priority: int
    attained: float
    since: float


def _key(w: Waiter) -> tuple[int, float, float, str]:
    return (-w.priority, min(w.attained, _SERVICE_CAP), w.since, w.name)


def fair_order(waiters: Iterable[Waiter]) -> list[Waiter]:
    """Waiters in the order they should be served (first = next)."""
    return sorted(waiters, key=_key)


def pick(waiters: Sequence[Waiter]) -> Waiter | None:
    """The waiter to serve next, or None when nobody waits."""
    return min(waiters, key=_key) if waiters else None


def fair_score(priority: int, attained: float) -> float:
    """:func:`fair_order`'s first two criteria as one number; lower goes first.

    Used as the score of the cross-daemon waiting queue (a Redis sorted set): priority
    levels are spaced wider than any attained service, so priority is strict.
    """
    level = MAX_PRIORITY - max(0, min(MAX_PRIORITY, priority))
    return level * _SERVICE_CAP * 2 + min(max(attained, 0.0), _SERVICE_CAP)


class AttainedService:
    """Tokens each agent was served, decayed with a half-life (``half_life_s``).

    ``value`` is the agent's recent usage: a call of N tokens adds N, which halves
    every ``half_life_s`` seconds. Agents unseen for long drop out (``forget``).
    """

    def __init__(self, half_life_s: float = 60.0) -> None:
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        self._rate = math.log(2) / half_life_s
        self._value: dict[str, tuple[float, float]] = {}  # name -> (value, as of)

    def value(self, name: str, now: float) -> float:
        """The agent's decayed usage at ``now``."""
        entry = self._value.get(name)
        if entry is None:
            return 0.0
        amount, at = entry
        return amount * math.exp(-self._rate * max(0.0, now - at))

    def add(self, name: str, tokens: float, now: float) -> None:
        """Record that ``name`` was served ``tokens`` at ``now``."""
        self._value[name] = (self.value(name, now) + max(0.0, tokens), now)

    def forget(self, name: str) -> None:
        """Drop an agent (it left this daemon)."""
        self._value.pop(name, None)


def day_window(timezone: str, now: float) -> tuple[str, float]:
    """The day ``now`` falls on in ``timezone`` (``YYYY-MM-DD``) and seconds until it ends.

    Days are calendar days in the zone, so they are 23 or 25 hours long across a DST
    change.
    """
    zone = ZoneInfo(timezone)
    local = datetime.fromtimestamp(now, zone)
    next_midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), zone)
    return local.date().isoformat(), max(0.0, next_midnight.timestamp() - now)


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def fleet_metrics(
    reports: Iterable[Mapping[str, Any]], budget_burn: Iterable[float] = ()
) -> dict[str, float]:
    """Merge every daemon's recent samples into the metrics policy rules read.

    ``queue_wait_p95_s``: 95th percentile of the time calls waited for quota and an
    engine turn; ``throttle_rate`` and ``error_rate``: shares of calls throttled and
    failed; ``slot_utilisation``: engine slots held over slots there are;
    ``budget_burn_rate``: the highest of ``budget_burn`` (share of a daily budget spent
    over share of the day gone; above 1 runs out before the day ends). A metric without
    data is left out, so rules on it do not fire.
    """
    waits: list[float] = []
    calls = throttled = failed = held = total = 0
    for r in reports:
        waits.extend(float(w) for w in r.get("waits", ()))
        calls += int(r.get("calls", 0))
        throttled += int(r.get("throttled", 0))
        failed += int(r.get("failed", 0))
        held += int(r.get("slots_held", 0))
        total += int(r.get("slots_total", 0))
    out: dict[str, float] = {}
    if waits:
        out["queue_wait_p95_s"] = _p95(waits)
    if calls:
        out["throttle_rate"] = throttled / calls
        out["error_rate"] = failed / calls
    if total:
        out["slot_utilisation"] = held / total
    burns = list(budget_burn)
    if burns:
        out["budget_burn_rate"] = max(burns)
    return out


def burn_rate(used: float, budget: float, day_left_s: float, day_s: float = 86_400.0) -> float:
    """Share of ``budget`` used over share of the day gone (at least one hour counted)."""
    gone = max(day_s - day_left_s, 3_600.0) / day_s
    return (used / budget) / gone if budget > 0 else 0.0
