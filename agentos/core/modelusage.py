"""The usage hash's per-model and per-verdict fields, and usage by model priced from each Model.

A fleet that mixes a cheap local model with a large hosted one pays per model, and a
hosted API bills cached prompt tokens at a lower price. Runners add per-model amounts
to the agent's daily usage hash under ``model:{name}:{what}`` fields next to the
agent totals, and count each finished task by its verdict (``tasks_pass``,
``tasks_fail``, ``tasks_unknown``, and ``model:{name}:pass|fail|unknown`` for the model
that served the task's last call: the one whose answer was judged). This module names
those fields, prices calls with a Model's ``prices`` (per 1k tokens; the one price
source every ``agentos usage`` view uses), and turns the records into ``--by model``
rows. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentos.core.outcomes import VERDICTS, Verdict
from agentos.core.spec.route import ModelPrices

__all__ = [
    "TOKEN_FIELDS",
    "ModelUsageRow",
    "TaskCounts",
    "by_model",
    "call_cost",
    "model_total",
    "model_usage",
    "per_model",
    "served_model",
    "token_cost",
    "verdict_usage",
]

_PREFIX = "model:"
TOKEN_FIELDS = ("in", "cached", "out")
_WHAT = (*TOKEN_FIELDS, "calls", *VERDICTS)


def model_usage(model: str, *, tokens_in: int, cached: int, tokens_out: int) -> dict[str, float]:
    """Usage-hash amounts of one call to ``model`` (``tokens_in``: prefilled, not cached)."""
    return {
        f"{_PREFIX}{model}:in": float(tokens_in),
        f"{_PREFIX}{model}:cached": float(cached),
        f"{_PREFIX}{model}:out": float(tokens_out),
        f"{_PREFIX}{model}:calls": 1.0,
    }


def verdict_usage(verdict: Verdict, model: str | None, count: float = 1.0) -> dict[str, float]:
    """Usage-hash amounts of ``count`` tasks judged ``verdict`` (negative: taken back),
    the last of whose calls ``model`` served (None: the task made no model call)."""
    amounts = {f"tasks_{verdict}": count}
    if model:
        amounts[f"{_PREFIX}{model}:{verdict}"] = count
    return amounts


def served_model(field: str) -> str | None:
    """The model a usage field counts one call of (``model:{name}:calls``), else None."""
    if field.startswith(_PREFIX) and field.endswith(":calls"):
        return field[len(_PREFIX) : -len(":calls")] or None
    return None


def per_model(amounts: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """The ``model:{name}:{what}`` fields of one usage hash (or a sum of them) by model."""
    out: dict[str, dict[str, float]] = {}
    for key, value in amounts.items():
        if not key.startswith(_PREFIX):
            continue
        model, _, what = key[len(_PREFIX) :].rpartition(":")
        if what in _WHAT and model:
            acc = out.setdefault(model, {})
            acc[what] = acc.get(what, 0.0) + value
    return out


def call_cost(prices: ModelPrices, *, tokens_in: int, cached: int, tokens_out: int) -> float:
    """What a call costs at ``prices`` (per 1k tokens; cached tokens at ``cachedInput``,
    or at the input price when the Model gives none)."""
    cached_price = prices.input if prices.cached_input is None else prices.cached_input
    return (tokens_in * prices.input + cached * cached_price + tokens_out * prices.output) / 1000


def token_cost(amounts: Mapping[str, float], prices: Mapping[str, ModelPrices]) -> float:
    """The tokens of ``amounts`` (one usage hash, or a sum) priced per model; a model
    without prices (``default``, one deleted since) costs 0."""
    cost = 0.0
    for model, a in per_model(amounts).items():
        tin, tcached, tout = (round(a.get(w, 0.0)) for w in TOKEN_FIELDS)
        p = prices.get(model, ModelPrices())
        cost += call_cost(p, tokens_in=tin, cached=tcached, tokens_out=tout)
    return cost


@dataclass(frozen=True, slots=True)
class TaskCounts:
    """Finished tasks by verdict, and what success cost: the outcome columns that every
    ``usage`` view has."""

    passed: int = 0
    failed: int = 0
    unknown: int = 0

    @classmethod
    def of(cls, amounts: Mapping[str, float], *, prefix: str = "tasks_") -> TaskCounts:
        """The counts in ``amounts`` (``tasks_pass``... or, with another ``prefix``, the
        fields of one model: ``pass``...)."""
        return cls(*(max(0, round(amounts.get(f"{prefix}{v}", 0.0))) for v in VERDICTS))

    def __add__(self, other: TaskCounts) -> TaskCounts:
        return TaskCounts(
            self.passed + other.passed, self.failed + other.failed, self.unknown + other.unknown
        )

    @property
    def counted(self) -> bool:
        """Whether any task was counted (by a daemon that records outcomes)."""
        return bool(self.passed or self.failed or self.unknown)

    @property
    def success_rate(self) -> float | None:
        """pass / (pass + fail); None when no task was judged (unknowns are left out)."""
        judged = self.passed + self.failed
        return self.passed / judged if judged else None

    def per_success(self, amount: float) -> float | None:
        """``amount`` divided by the tasks that passed; None when none did."""
        return amount / self.passed if self.passed else None

    def to_dict(self, *, cost: float, tokens: int) -> dict[str, Any]:
        """The outcome keys of a row (``tasksPass``, ``successRate``, ``costPerSuccess``...)."""
        rate = self.success_rate
        cost_per = self.per_success(cost)
        tokens_per = self.per_success(tokens)
        return {
            "tasksPass": self.passed,
            "tasksFail": self.failed,
            "tasksUnknown": self.unknown,
            "successRate": None if rate is None else round(rate, 6),
            # Significant digits: a small model's cost per task is far below a cent.
            "costPerSuccess": None if cost_per is None else float(f"{cost_per:.9g}"),
            "tokensPerSuccess": None if tokens_per is None else round(tokens_per, 1),
        }


@dataclass(frozen=True, slots=True)
class ModelUsageRow:
    """One line of ``agentos usage --by model``; ``tasks`` counts the tasks whose last
    call this model served (each task once, so the rows add up to the fleet's)."""

    model: str
    calls: int
    tokens_in: int
    tokens_cached: int
    tokens_out: int
    cost: float
    tasks: TaskCounts = field(default_factory=TaskCounts)

    @property
    def key(self) -> str:
        """The row's key (the model), as in the other views."""
        return self.model

    @property
    def tokens(self) -> int:
        """Tokens prefilled and decoded (cached ones left out, as in the agent view)."""
        return self.tokens_in + self.tokens_out

    def to_dict(self) -> dict[str, object]:
        """Plain data for ``-o json|yaml``."""
        return {
            "key": self.model,
            "calls": self.calls,
            "tokensIn": self.tokens_in,
            "tokensCached": self.tokens_cached,
            "tokensOut": self.tokens_out,
            "cost": round(self.cost, 6),
            **self.tasks.to_dict(cost=self.cost, tokens=self.tokens),
        }


def by_model(
    records: Mapping[tuple[str, str], Mapping[str, float]],
    prices: Mapping[str, ModelPrices],
) -> list[ModelUsageRow]:
    """Sum the per-model fields of ``records`` ((agent, day) -> amounts) by model, sorted.

    A model without prices (``default``, or one deleted since) costs 0.
    """
    sums: dict[str, dict[str, float]] = {}
    for amounts in records.values():
        for model, a in per_model(amounts).items():
            acc = sums.setdefault(model, {})
            for what, value in a.items():
                acc[what] = acc.get(what, 0.0) + value
    rows = []
    for model in sorted(sums):
        a = sums[model]
        tin, tcached, tout = (round(a.get(w, 0.0)) for w in TOKEN_FIELDS)
        p = prices.get(model, ModelPrices())
        cost = call_cost(p, tokens_in=tin, cached=tcached, tokens_out=tout)
        rows.append(
            ModelUsageRow(
                model,
                round(a.get("calls", 0.0)),
                tin,
                tcached,
                tout,
                cost,
                TaskCounts.of(a, prefix=""),
            )
        )
    return rows


def model_total(rows: list[ModelUsageRow]) -> ModelUsageRow:
    """The sum of ``rows`` (key ``total``)."""
    tasks = TaskCounts()
    for r in rows:
        tasks += r.tasks
    return ModelUsageRow(
        "total",
        sum(r.calls for r in rows),
        sum(r.tokens_in for r in rows),
        sum(r.tokens_cached for r in rows),
        sum(r.tokens_out for r in rows),
        sum(r.cost for r in rows),
        tasks,
    )
