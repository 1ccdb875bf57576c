"""What the fleet cost: usage summed by agent, class, route or day, per successful task.

Operators pay for work that succeeded, not for GPU hours, so the figure that matters is
the cost per successful task. Daemons meter each agent per UTC day in Redis (active
seconds — wall time not hibernated —, tokens per model as counted by the engine, KV
byte-seconds stored, tasks succeeded and failed, and tasks by verdict: pass, fail,
unknown); this module turns those records into report rows.

Every view is priced from one source, the fleet's own specs: token prices from each
Model's ``spec.prices`` (per model, cached tokens at their own price), agent-hours and
KV GB-hours from the ``spec.prices`` of the one QuotaPolicy that declares them
(:func:`fleet_prices`; :func:`price_issues` refuses a second one at apply). ``--by
model`` prices tokens only: agent-hours and stored KV belong to agents, not to models,
so the model view's total is the token part (``tokenCost``) of the other views'.
Prices that are missing (a model without a Model, such as ``default``; a Model that
declares none; no fleet prices) cost 0 and are named by :func:`price_warnings`.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from agentos.core.modelusage import TOKEN_FIELDS, ModelUsageRow, TaskCounts, per_model, token_cost
from agentos.core.spec import Document, QuotaPolicyResource, SpecIssue
from agentos.core.spec.route import FleetPrices, ModelPrices

__all__ = [
    "BY",
    "PriceBook",
    "Prices",
    "UsageReport",
    "UsageRow",
    "aggregate",
    "fleet_prices",
    "price_issues",
    "price_warnings",
    "total",
]

GB = 1e9
BY = ("agent", "class", "route", "day", "model")
"""The ways ``agentos usage`` groups."""


class Prices(BaseModel):
    """A flat price table of your own (per 1k tokens for every model, per agent-hour,
    per GB-hour of KV) to price usage at other prices than the fleet's: a what-if for
    library callers. ``agentos usage`` takes none: the fleet's prices are on its Models
    and on ``QuotaPolicy.spec.prices``."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    per_1k_input_tokens: float = Field(default=0.0, ge=0, alias="per1kInputTokens")
    per_1k_output_tokens: float = Field(default=0.0, ge=0, alias="per1kOutputTokens")
    per_agent_hour: float = Field(default=0.0, ge=0)
    per_gb_hour_kv: float = Field(default=0.0, ge=0, alias="perGBHourKV")


@dataclass(frozen=True, slots=True)
class PriceBook:
    """The fleet's prices: each applied Model's (by name) and the fleet's per agent-hour
    and per GB-hour of KV (None: no QuotaPolicy declares them)."""

    models: Mapping[str, ModelPrices] = field(default_factory=dict)
    fleet: FleetPrices | None = None
    fleet_policy: str | None = None  # the QuotaPolicy that declares ``fleet``


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One line of ``agentos usage`` (by agent, class, route or day).

    ``tasks_succeeded`` / ``tasks_failed`` count how tasks ended (failed: raised until
    the retries ran out, or passed a limit); ``tasks`` counts verdicts, whether the task
    did its job (``ctx.succeed`` / ``ctx.fail``, the Agent's evaluator, or the runtime's
    for failed and cancelled tasks).
    """

    key: str  # the agent, class, route or day
    agent_hours: float
    tokens_in: int
    tokens_out: int
    kv_gb_hours: float
    tasks_succeeded: int
    tasks_failed: int
    cost: float
    token_cost: float = 0.0  # the part of ``cost`` that is tokens
    tasks: TaskCounts = field(default_factory=TaskCounts)

    @property
    def cost_per_task(self) -> float | None:
        """Cost divided by completed tasks; None when no task completed."""
        return self.cost / self.tasks_succeeded if self.tasks_succeeded else None

    @property
    def tokens(self) -> int:
        """Tokens prefilled and decoded."""
        return self.tokens_in + self.tokens_out

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
            "tokenCost": round(self.token_cost, 6),
            **self.tasks.to_dict(cost=self.cost, tokens=self.tokens),
        }


@dataclass(frozen=True, slots=True)
class UsageReport:
    """``agentos usage``: its rows, their total, and what prices were missing."""

    by: str
    rows: Sequence[UsageRow | ModelUsageRow]
    total: UsageRow | ModelUsageRow | None  # None when there are no rows
    warnings: tuple[str, ...] = ()

    @property
    def judged(self) -> bool:
        """Whether any row counts tasks by verdict (usage metered by a daemon that
        records outcomes): the outcome columns are worth showing."""
        return any(r.tasks.counted for r in self.rows)

    def to_json(self) -> list[dict[str, object]]:
        """The rows and the total as plain data (an empty list when there is no usage)."""
        if self.total is None:
            return []
        return [r.to_dict() for r in [*self.rows, self.total]]


def aggregate(
    records: Mapping[tuple[str, str], Mapping[str, float]],
    *,
    by: str,
    classes: Mapping[str, str] | None = None,
    routes: Mapping[str, str] | None = None,
    book: PriceBook | None = None,
    prices: Prices | None = None,
) -> list[UsageRow]:
    """Sum ``records`` ((agent, day) -> amounts) by ``agent``, ``class``, ``route`` or
    ``day``, priced with ``book`` (or, when given, the flat table ``prices`` instead).

    ``classes`` maps agents to their quota class, ``routes`` to their route key
    (:attr:`agentos.core.spec.AgentSpec.route_key`); an agent missing there is ``?``.
    Rows are sorted by key; a total is not included (see :func:`total`).
    """
    if by not in ("agent", "class", "route", "day"):
        raise ValueError(f"cannot group usage by {by!r}: agent, class, route or day")
    groups = {"class": classes or {}, "route": routes or {}}.get(by, {})
    sums: dict[str, dict[str, float]] = {}
    for (agent, day), amounts in records.items():
        key = agent if by == "agent" else day if by == "day" else groups.get(agent, "?")
        acc = sums.setdefault(key, {})
        for name, value in amounts.items():
            acc[name] = acc.get(name, 0.0) + value
    return [_row(key, sums[key], book or PriceBook(), prices) for key in sorted(sums)]


def total(rows: Sequence[UsageRow]) -> UsageRow:
    """The sum of ``rows`` (key ``total``)."""
    tasks = TaskCounts()
    for r in rows:
        tasks += r.tasks
    return UsageRow(
        "total",
        sum(r.agent_hours for r in rows),
        sum(r.tokens_in for r in rows),
        sum(r.tokens_out for r in rows),
        sum(r.kv_gb_hours for r in rows),
        sum(r.tasks_succeeded for r in rows),
        sum(r.tasks_failed for r in rows),
        sum(r.cost for r in rows),
        sum(r.token_cost for r in rows),
        tasks,
    )


def _row(key: str, a: Mapping[str, float], book: PriceBook, prices: Prices | None) -> UsageRow:
    hours = a.get("active_s", 0.0) / 3600
    tokens_in = round(a.get("tokens_in", 0.0))
    tokens_out = round(a.get("tokens_out", 0.0))
    kv_gb_hours = a.get("kv_byte_s", 0.0) / GB / 3600
    if prices is not None:
        tokens = (
            tokens_in / 1000 * prices.per_1k_input_tokens
            + tokens_out / 1000 * prices.per_1k_output_tokens
        )
        rest = hours * prices.per_agent_hour + kv_gb_hours * prices.per_gb_hour_kv
    else:
        tokens = token_cost(a, book.models)
        fleet = book.fleet or FleetPrices()
        rest = hours * fleet.per_agent_hour + kv_gb_hours * fleet.per_gb_hour_kv
    return UsageRow(
        key,
        hours,
        tokens_in,
        tokens_out,
        kv_gb_hours,
        round(a.get("tasks_succeeded", 0.0)),
        round(a.get("tasks_failed", 0.0)),
        tokens + rest,
        tokens,
        TaskCounts.of(a),
    )


def price_warnings(
    records: Mapping[tuple[str, str], Mapping[str, float]], book: PriceBook, *, by: str
) -> list[str]:
    """What the report could not price, one sentence each: tokens of a model with no
    Model (``default``: the daemon's ``--engine``) or with no prices, and agent-hours or
    KV storage with no fleet prices (not for ``by="model"``, which leaves them out)."""
    tokens: dict[str, float] = {}
    hours = kv = 0.0
    for amounts in records.values():
        hours += amounts.get("active_s", 0.0)
        kv += amounts.get("kv_byte_s", 0.0)
        for model, a in per_model(amounts).items():
            tokens[model] = tokens.get(model, 0.0) + sum(a.get(w, 0.0) for w in TOKEN_FIELDS)
    warnings = []
    for model in sorted(m for m, n in tokens.items() if n > 0):
        count = round(tokens[model])
        prices = book.models.get(model)
        if prices is None:
            if model == "default":
                warnings.append(
                    f'model "default" has no prices (the daemon\'s --engine, which has no '
                    f"Model): its {count} tokens cost 0; declare them with the fleet's prices "
                    "(spec.prices.defaultModel: {input, output})"
                )
            else:
                warnings.append(
                    f'model "{model}" has no prices (no Model of that name is applied): its '
                    f"{count} tokens cost 0"
                )
        elif not (prices.input or prices.output or prices.cached_input):
            warnings.append(f'model "{model}" declares no spec.prices: its {count} tokens cost 0')
    if by != "model" and book.fleet is None and (hours > 0 or kv > 0):
        warnings.append(
            "no QuotaPolicy declares spec.prices (perAgentHour, perGBHourKV): agent-hours "
            "and KV storage cost 0"
        )
    return warnings


def fleet_prices(policies: Mapping[str, QuotaPolicyResource]) -> tuple[str, FleetPrices] | None:
    """The fleet's prices and the policy that declares them (the first by name, should
    more than one have been stored before :func:`price_issues` refused that); None when
    no policy does."""
    for name in sorted(policies):
        prices = policies[name].spec.prices
        if prices is not None:
            return name, prices
    return None


def price_issues(
    documents: Sequence[Document], policies: Mapping[str, QuotaPolicyResource]
) -> list[SpecIssue]:
    """A QuotaPolicy among ``documents`` that declares ``spec.prices`` while another one
    (stored, or applied with it) does: the fleet's prices are declared once."""
    applied = [(d, d.resource) for d in documents if isinstance(d.resource, QuotaPolicyResource)]
    names = {d.name for d, _ in applied}
    owner = next(
        (n for n in sorted(policies) if n not in names and policies[n].spec.prices is not None),
        None,
    )
    stored = owner is not None
    issues = []
    for doc, policy in applied:
        if policy.spec.prices is None:
            continue
        if owner is None:
            owner = doc.name
            continue
        issues.append(
            SpecIssue(
                doc.source,
                doc.line_of("spec", "prices"),
                "spec.prices",
                f'the fleet\'s prices are already declared by QuotaPolicy "{owner}" '
                f"({'stored' if stored else 'applied with it'}); declare them in one policy "
                "only",
            )
        )
    return issues
