"""Usage by model: tokens in, cached and out per model and agent, priced from each Model.

A fleet that mixes a cheap local model with a large hosted one pays per model, and a
hosted API bills cached prompt tokens at a lower price. Runners add per-model amounts
to the agent's daily usage hash under ``model:{name}:{what}`` fields next to the
agent totals; this module names those fields and turns the records into rows priced
with each model's ``prices`` (per 1k tokens). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agentos.core.modelspec import ModelPrices

__all__ = ["ModelUsageRow", "by_model", "model_usage"]

_PREFIX = "model:"
_WHAT = ("in", "cached", "out", "calls")


def model_usage(model: str, *, tokens_in: int, cached: int, tokens_out: int) -> dict[str, float]:
    """Usage-hash amounts of one call to ``model`` (``tokens_in``: prefilled, not cached)."""
    return {
        f"{_PREFIX}{model}:in": float(tokens_in),
        f"{_PREFIX}{model}:cached": float(cached),
        f"{_PREFIX}{model}:out": float(tokens_out),
        f"{_PREFIX}{model}:calls": 1.0,
    }


@dataclass(frozen=True, slots=True)
class ModelUsageRow:
    """One line of ``agentos usage --by model``."""

    model: str
    calls: int
    tokens_in: int
    tokens_cached: int
    tokens_out: int
    cost: float

    def to_dict(self) -> dict[str, object]:
        """Plain data for ``-o json|yaml``."""
        return {
            "key": self.model,
            "calls": self.calls,
            "tokensIn": self.tokens_in,
            "tokensCached": self.tokens_cached,
            "tokensOut": self.tokens_out,
            "cost": round(self.cost, 6),
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
        for key, value in amounts.items():
            if not key.startswith(_PREFIX):
                continue
            model, _, what = key[len(_PREFIX) :].rpartition(":")
            if what in _WHAT and model:
                acc = sums.setdefault(model, {})
                acc[what] = acc.get(what, 0.0) + value
    rows = []
    for model in sorted(sums):
        a = sums[model]
        p = prices.get(model, ModelPrices())
        cached_price = p.input if p.cached_input is None else p.cached_input
        tin, tcached, tout = (round(a.get(w, 0.0)) for w in ("in", "cached", "out"))
        cost = (tin * p.input + tcached * cached_price + tout * p.output) / 1000
        rows.append(ModelUsageRow(model, round(a.get("calls", 0.0)), tin, tcached, tout, cost))
    return rows
