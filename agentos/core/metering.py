"""What the fleet cost: usage summed by agent, class or day, priced per completed task.

Operators pay for completed work, not for GPU hours, so the figure that matters is the
cost per completed task. Daemons meter each agent per UTC day in Redis (active seconds
— wall time not hibernated —, tokens in and out as counted by the engine, KV
byte-seconds stored, tasks succeeded and failed); this module turns those records and
a price table into report rows. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

__all__ = ["Prices", "UsageRow", "aggregate"]

GB = 1e9


class Prices(BaseModel):
    """Prices in any currency unit; a missing price is 0."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    per_1k_input_tokens: float = Field(default=0.0, ge=0, alias="per1kInputTokens")
    per_1k_output_tokens: float = Field(default=0.0, ge=0, alias="per1kOutputTokens")
    per_agent_hour: float = Field(default=0.0, ge=0)
    per_gb_hour_kv: float = Field(default=0.0, ge=0, alias="perGBHourKV")


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One line of `agentos usage`."""

    key: str  # the agent, class or day
    agent_hours: float
    tokens_in: int
    tokens_out: int
    kv_gb_hours: float
    tasks_succeeded: int
    tasks_failed: int
    cost: float

    @property
    def cost_per_task(self) -> float | None:
        """Cost divided by completed tasks; None when no task completed."""
        return self.cost / self.tasks_succeeded if self.tasks_succeeded else None

    def to_dict(self) -> dict[str, object]:
        """Plain data for `-o json|yaml`."""
        return {
            "key": self.key,
            "agentHours": round(self.agent_hours, 6),
            "tokensIn": self.tokens_in,
            "tokensOut": self.tokens_out,
            "kvGBHours": round(self.kv_gb_hours, 9),
            "tasksSucceeded": self.tasks_succeeded,
            "tasksFailed": self.tasks_failed,
            "cost": round(self.cost, 6),
            "costPerTask": None if self.cost_per_task is None else round(self.cost_per_task, 6),
        }


def aggregate(
    records: Mapping[tuple[str, str], Mapping[str, float]],
    *,
    by: str,
    classes: Mapping[str, str],
    prices: Prices,
) -> list[UsageRow]:
    """Sum ``records`` ((agent, day) -> amounts) by ``agent``, ``class`` or ``day``.

    ``classes`` maps agents to their quota class. Rows are sorted by key; a total is
    not included (the caller adds one if it wants).
    """
    sums: dict[str, dict[str, float]] = {}
    for (agent, day), amounts in records.items():
        key = {"agent": agent, "class": classes.get(agent, "?"), "day": day}[by]
        acc = sums.setdefault(key, {})
        for field, value in amounts.items():
            acc[field] = acc.get(field, 0.0) + value
    return [_row(key, sums[key], prices) for key in sorted(sums)]


def total(rows: list[UsageRow]) -> UsageRow:
    """The sum of ``rows`` (key ``total``)."""
    return UsageRow(
        "total",
        sum(r.agent_hours for r in rows),
        sum(r.tokens_in for r in rows),
        sum(r.tokens_out for r in rows),
        sum(r.kv_gb_hours for r in rows),
        sum(r.tasks_succeeded for r in rows),
        sum(r.tasks_failed for r in rows),
        sum(r.cost for r in rows),
    )


def _row(key: str, a: Mapping[str, float], prices: Prices) -> UsageRow:
    hours = a.get("active_s", 0.0) / 3600
    tokens_in = round(a.get("tokens_in", 0.0))
    tokens_out = round(a.get("tokens_out", 0.0))
    kv_gb_hours = a.get("kv_byte_s", 0.0) / GB / 3600
    cost = (
        tokens_in / 1000 * prices.per_1k_input_tokens
        + tokens_out / 1000 * prices.per_1k_output_tokens
        + hours * prices.per_agent_hour
        + kv_gb_hours * prices.per_gb_hour_kv
    )
    return UsageRow(
        key,
        hours,
        tokens_in,
        tokens_out,
        kv_gb_hours,
        round(a.get("tasks_succeeded", 0.0)),
        round(a.get("tasks_failed", 0.0)),
        cost,
    )
