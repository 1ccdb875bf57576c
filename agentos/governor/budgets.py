"""Budget warnings: one fleet event per class, limit and day when 80% of a budget is spent.

Operators want to hear about a budget before tasks start parking on it. The evaluator
daemon (one at a time, under its lease) calls :func:`warn_budgets` after each
evaluation; the decision is pure (:func:`agentos.core.budgets.budget_warnings`) and a
``SET NX`` per class, limit and day makes each warning fire once even if the lease moves.
"""

from __future__ import annotations

from collections.abc import Mapping

from agentos.core.budgets import BudgetWarning, budget_warnings
from agentos.core.fairness import day_window
from agentos.core.policy import ClassQuota
from agentos.store import Store

__all__ = ["warn_budgets"]


async def warn_budgets(
    store: Store, quotas: Mapping[str, ClassQuota], now: float, *, by: str
) -> list[BudgetWarning]:
    """Record a ``BudgetWarning`` fleet event for each class budget past 80% today
    (once per day); returns the warnings recorded now."""
    limits = {
        n: (q.limits.daily_tokens, q.limits.daily_agent_seconds)
        for n, q in quotas.items()
        if q.limits.daily_tokens or q.limits.daily_agent_seconds
    }
    if not limits:
        return []
    days = {n: day_window(quotas[n].timezone, now)[0] for n in limits}
    used = await store.quotas.budget_used(days)
    fired = []
    for w in budget_warnings(limits, {n: (float(t), s) for n, (t, s) in used.items()}, days):
        if await store.quotas.budget_warn_once(w.quota_class, w.day, w.limit):
            await store.events.record_fleet_event(
                "", "BudgetWarning", w.quota_class, w.message(), by
            )
            fired.append(w)
    return fired
