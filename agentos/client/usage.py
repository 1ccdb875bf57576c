"""The client's side of quotas and metering: effective limits, policy explanations, usage.

``agentos quota``, ``agentos explain``, ``agentos usage`` and their HTTP endpoints are
built on these functions (through :class:`agentos.client.Client`). They only read: the
limits the evaluator last stored (or the policies' base limits before it ran), usage
counters per class and agent, and metered usage per day priced from the fleet's one
price source (:class:`agentos.core.metering.PriceBook`: each applied Model's prices,
and the fleet's prices on the QuotaPolicy that declares them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from agentos.core.errors import NotFound
from agentos.core.fairness import day_window
from agentos.core.fleet import DEFAULT_CLASS
from agentos.core.metering import (
    BY,
    PriceBook,
    Prices,
    UsageReport,
    UsageRow,
    aggregate,
    fleet_prices,
    price_warnings,
    total,
)
from agentos.core.modelspec import ModelResource
from agentos.core.modelusage import ModelUsageRow, by_model, model_total
from agentos.core.policy import ClassQuota, Evaluation, RuleStatus, base_quotas, evaluate
from agentos.core.spec import (
    AgentResource,
    Document,
    QuotaPolicyResource,
    SpecError,
    parse_resource,
)
from agentos.governor.evaluator import stored_policies
from agentos.store import Store

__all__ = [
    "day_of",
    "explain",
    "price_book",
    "quota",
    "quotas_now",
    "usage",
    "usage_by_model",
    "usage_report",
]


def day_of(epoch: float) -> str:
    """The UTC day of ``epoch``, as usage counters name it (YYYY-MM-DD)."""
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def _days(since_days: int, now: float | None) -> list[str]:
    end = time.time() if now is None else now
    return [day_of(end - 86400 * i) for i in range(since_days)]


def _route_keys(specs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    routes = {}
    for name, body in specs.items():
        try:
            resource = parse_resource(body)
        except SpecError:
            continue
        if isinstance(resource, AgentResource):
            routes[name] = resource.spec.route_key
    return routes


async def quotas_now(*, store: Store) -> dict[str, ClassQuota]:
    """The effective limits the evaluator last stored, or the policies' base limits."""
    effective = await store.quotas.effective()
    if effective is not None:
        return effective
    return base_quotas(stored_policies(await store.specs.policies()))


async def quota(*, store: Store, now: float | None) -> dict[str, Any]:
    """Effective limits per class and per agent, usage now, and who is waiting."""
    now = time.time() if now is None else now
    quotas = await quotas_now(store=store)
    specs = await store.specs.agents()
    members: dict[str, list[tuple[str, int]]] = {}
    for agent, body in sorted(specs.items()):
        spec = body.get("spec", {})
        members.setdefault(str(spec.get("quotaClass", DEFAULT_CLASS)), []).append(
            (agent, int(spec.get("priority", 50)))
        )
    days = {n: day_window(q.timezone, now)[0] for n, q in quotas.items()}
    usage = await store.quotas.usage(days, now=now)
    classes = []
    for name in sorted(set(quotas) | set(members)):
        q = quotas.get(name)
        u = usage.get(name)
        agents = []
        for agent, priority in members.get(name, []):
            waiting = ""
            if u is not None and agent in u.queued:
                waiting = "queued"
            elif u is not None and agent in u.pacing:
                waiting = "paced"
            agents.append(
                {
                    "name": agent,
                    "priority": priority,
                    "tokensLastMinute": u.agent_tokens_last_minute.get(agent, 0) if u else 0,
                    "dayTokens": u.agent_day_tokens.get(agent, 0) if u else 0,
                    "dayAgentSeconds": round(u.agent_day_seconds.get(agent, 0.0), 1) if u else 0,
                    "inFlight": u.in_flight.get(agent, 0) if u else 0,
                    "waiting": waiting,
                }
            )
        classes.append(
            {
                "name": name,
                "policy": q.policy if q else None,
                "timezone": q.timezone if q else None,
                "day": days.get(name),
                "limits": q.limits.to_json() if q else {},
                "perAgent": q.per_agent.to_json() if q else {},
                "base": q.base.to_json() if q else {},
                "basePerAgent": q.base_per_agent.to_json() if q else {},
                "rules": list(q.rules) if q else [],
                "usage": {
                    "tokensLastMinute": u.tokens_last_minute if u else 0,
                    "inFlight": sum(u.in_flight.values()) if u else 0,
                    "queued": u.queued if u else [],
                    "paced": u.pacing if u else [],
                    "dayTokens": u.day_tokens if u else 0,
                    "dayAgentSeconds": round(u.day_seconds, 1) if u else 0,
                },
                "agents": agents,
            }
        )
    effective_at = None
    raw = await store.quotas.state()
    if raw[1]:
        effective_at = raw[1].get("at")
    return {"at": now, "evaluatedAt": effective_at, "classes": classes}


async def explain(
    name: str | None,
    *,
    store: Store,
    documents: Sequence[Document],
    now: float | None,
) -> tuple[Evaluation, dict[str, float], float | None]:
    """Evaluate the policies now, without writing anything.

    Uses the fleet metrics and rule memory the evaluator last stored. ``documents``
    (QuotaPolicy ones) stand in for the stored policies of the same name: what
    ``apply --dry-run`` shows. With ``name``, only that policy's rules are listed.
    Returns the evaluation, the metrics used and when they were measured.
    """
    now = time.time() if now is None else now
    policies = stored_policies(await store.specs.policies())
    for doc in documents:
        if isinstance(doc.resource, QuotaPolicyResource):
            policies[doc.name] = doc.resource
    if name is not None and name not in policies:
        raise NotFound(f'policy "{name}" not found')
    memory, metrics_doc = await store.quotas.state()
    metrics = {k: float(v) for k, v in metrics_doc.get("values", {}).items()}
    result = evaluate(policies, metrics, now, memory)
    if name is not None:
        rules: tuple[RuleStatus, ...] = tuple(r for r in result.rules if r.policy == name)
        result = Evaluation(result.quotas, result.memory, result.changes, rules)
    return result, metrics, metrics_doc.get("at")


async def price_book(*, store: Store) -> PriceBook:
    """The fleet's prices: each applied Model's, and the fleet's on the QuotaPolicy
    that declares ``spec.prices``."""
    models = {}
    for name, body in (await store.models.read()).items():
        try:
            resource = parse_resource(body)
        except SpecError:
            continue
        if isinstance(resource, ModelResource):
            models[name] = resource.spec.prices
    declared = fleet_prices(stored_policies(await store.specs.policies()))
    if declared is None:
        return PriceBook(models)
    if declared[1].default_model is not None:  # the daemons' own engine's, declared once
        models.setdefault("default", declared[1].default_model)
    return PriceBook(models, declared[1], declared[0])


async def _usage_records(
    since_days: int, now: float | None, *, store: Store
) -> tuple[dict[tuple[str, str], dict[str, float]], dict[str, dict[str, Any]]]:
    specs = await store.specs.agents()
    return await store.usage.read(sorted(specs), _days(since_days, now)), specs


async def usage_report(*, store: Store, by: str, since_days: int, now: float | None) -> UsageReport:
    """Metered usage of the last ``since_days`` UTC days (today included), summed by
    ``agent``, ``class``, ``route``, ``day`` or ``model``, priced from the fleet's
    prices (:func:`price_book`), with a total and what could not be priced. ``model``
    prices tokens only (agent-hours and KV storage belong to agents).

    Raises ValueError for another ``by``.
    """
    if by not in BY:
        raise ValueError(f"cannot group usage by {by!r}: one of {', '.join(BY)}")
    records, specs = await _usage_records(since_days, now, store=store)
    book = await price_book(store=store)
    warnings = tuple(price_warnings(records, book, by=by))
    if by == "model":
        model_rows = by_model(records, book.models)
        return UsageReport(
            by, model_rows, model_total(model_rows) if model_rows else None, warnings
        )
    rows = aggregate(
        records,
        by=by,
        classes={
            n: str(b.get("spec", {}).get("quotaClass", DEFAULT_CLASS)) for n, b in specs.items()
        },
        routes=_route_keys(specs) if by == "route" else None,
        book=book,
    )
    return UsageReport(by, rows, total(rows) if rows else None, warnings)


async def usage(
    *,
    store: Store,
    by: str,
    since_days: int,
    prices: Prices | None,
    now: float | None,
) -> list[UsageRow]:
    """The rows of :func:`usage_report` by ``agent``, ``class``, ``route`` or ``day``
    (no total); with ``prices``, priced with that flat table instead of the fleet's."""
    if prices is None:
        report = await usage_report(store=store, by=by, since_days=since_days, now=now)
        return [r for r in report.rows if isinstance(r, UsageRow)]
    records, specs = await _usage_records(since_days, now, store=store)
    classes = {n: str(b.get("spec", {}).get("quotaClass", DEFAULT_CLASS)) for n, b in specs.items()}
    routes = _route_keys(specs) if by == "route" else None
    return aggregate(records, by=by, classes=classes, routes=routes, prices=prices)


async def usage_by_model(
    *, store: Store, since_days: int, now: float | None
) -> list[ModelUsageRow]:
    """Tokens in, cached and out per model over the last ``since_days`` UTC days,
    priced with each applied Model's ``prices``, with the tasks each model served
    last (no total)."""
    report = await usage_report(store=store, by="model", since_days=since_days, now=now)
    return [r for r in report.rows if isinstance(r, ModelUsageRow)]
