"""Budget warnings as a pure decision: which class budgets are past 80% today.

Operators want to hear about a budget before tasks start parking on it (a spent budget
parks a task like a durable wait, :mod:`agentos.core.waits`). The evaluator daemon asks
:func:`budget_warnings` after each evaluation (``agentos.governor.budgets``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["BUDGET_WARN_AT", "BudgetWarning", "budget_warnings"]

BUDGET_WARN_AT = 0.8  # a class's budget warning fires once a day at this share spent


@dataclass(frozen=True, slots=True)
class BudgetWarning:
    """A class has spent ``share`` of one of its daily budgets today."""

    quota_class: str
    limit: str  # dailyTokens or dailyAgentSeconds
    used: float
    allowed: float
    day: str

    @property
    def share(self) -> float:
        return self.used / self.allowed if self.allowed else 0.0

    def message(self) -> str:
        return (
            f"class {self.quota_class} has used {self.share:.0%} of its {self.limit} "
            f"({self.used:g} of {self.allowed:g}) on {self.day}; at 100% its tasks park "
            "until the day ends or the policy is raised"
        )


def budget_warnings(
    limits: Mapping[str, tuple[float | None, float | None]],
    used: Mapping[str, tuple[float, float]],
    days: Mapping[str, str],
    *,
    at: float = BUDGET_WARN_AT,
) -> list[BudgetWarning]:
    """The class budgets spent past ``at``: ``limits`` and ``used`` are class ->
    (dailyTokens, dailyAgentSeconds); ``days`` class -> its budget day."""
    out = []
    for name, (tokens, seconds) in sorted(limits.items()):
        spent_tokens, spent_seconds = used.get(name, (0.0, 0.0))
        for limit, allowed, spent in (
            ("dailyTokens", tokens, spent_tokens),
            ("dailyAgentSeconds", seconds, spent_seconds),
        ):
            if allowed and spent >= at * allowed:
                out.append(BudgetWarning(name, limit, spent, allowed, days.get(name, "")))
    return out
