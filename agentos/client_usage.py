"""The client's side of quotas and metering: effective limits, policy explanations, usage.

``agentos quota``, ``agentos explain``, ``agentos usage`` and their HTTP endpoints are
built on these methods of :class:`agentos.client.Client`. They only read: the limits the
evaluator last stored (or the policies' base limits before it ran), usage counters per
class and agent, and metered usage per day priced with the applied Models' prices.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agentos.core.errors import NotFound
from agentos.core.fairness import day_window
from agentos.core.fleet import DEFAULT_CLASS
from agentos.core.metering import Prices, UsageRow, aggregate
from agentos.core.modelspec import ModelResource
from agentos.core.modelusage import ModelUsageRow, by_model
from agentos.core.policy import ClassQuota, Evaluation, RuleStatus, base_quotas, evaluate
from agentos.core.spec import Document, QuotaPolicyResource, parse_resource
from agentos.governor.evaluator import stored_policies

if TYPE_CHECKING:
    from agentos.store import Store

__all__ = ["UsageClientMixin"]


class UsageClientMixin:
    """Quota and usage reads of :class:`agentos.client.Client` (mixed in; uses its store)."""

    store: Store

    async def _quotas_now(self) -> dict[str, ClassQuota]:
        effective = await self.store.quota_effective()
        if effective is not None:
            return effective
        return base_quotas(stored_policies(await self.store.policies()))

    async def quota(self, *, now: float | None = None) -> dict[str, Any]:
        """Effective limits per class and per agent, usage now, and who is waiting."""
        now = time.time() if now is None else now
        quotas = await self._quotas_now()
        specs = await self.store.agent_specs()
        members: dict[str, list[tuple[str, int]]] = {}
        for agent, body in sorted(specs.items()):
            spec = body.get("spec", {})
            members.setdefault(str(spec.get("quotaClass", DEFAULT_CLASS)), []).append(
                (agent, int(spec.get("priority", 50)))
            )
        days = {n: day_window(q.timezone, now)[0] for n, q in quotas.items()}
        usage = await self.store.quota_usage(days, now=now)
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
                        "dayAgentSeconds": round(u.agent_day_seconds.get(agent, 0.0), 1)
                        if u
                        else 0,
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
        raw = await self.store.quota_state()
        if raw[1]:
            effective_at = raw[1].get("at")
        return {"at": now, "evaluatedAt": effective_at, "classes": classes}

    async def explain(
        self,
        name: str | None = None,
        *,
        documents: Sequence[Document] = (),
        now: float | None = None,
    ) -> tuple[Evaluation, dict[str, float], float | None]:
        """Evaluate the policies now, without writing anything.

        Uses the fleet metrics and rule memory the evaluator last stored. ``documents``
        (QuotaPolicy ones) stand in for the stored policies of the same name: what
        ``apply --dry-run`` shows. With ``name``, only that policy's rules are listed.
        Returns the evaluation, the metrics used and when they were measured.
        """
        now = time.time() if now is None else now
        policies = stored_policies(await self.store.policies())
        for doc in documents:
            if isinstance(doc.resource, QuotaPolicyResource):
                policies[doc.name] = doc.resource
        if name is not None and name not in policies:
            raise NotFound(f'policy "{name}" not found')
        memory, metrics_doc = await self.store.quota_state()
        metrics = {k: float(v) for k, v in metrics_doc.get("values", {}).items()}
        result = evaluate(policies, metrics, now, memory)
        if name is not None:
            rules: tuple[RuleStatus, ...] = tuple(r for r in result.rules if r.policy == name)
            result = Evaluation(result.quotas, result.memory, result.changes, rules)
        return result, metrics, metrics_doc.get("at")

    async def usage(
        self,
        *,
        by: str = "agent",
        since_days: int = 7,
        prices: Prices | None = None,
        now: float | None = None,
    ) -> list[UsageRow]:
        """Metered usage of the last ``since_days`` UTC days (today included), summed by
        ``agent``, ``class`` or ``day`` and priced with ``prices``."""
        specs = await self.store.agent_specs()
        classes = {
            n: str(b.get("spec", {}).get("quotaClass", "standard")) for n, b in specs.items()
        }
        end = time.time() if now is None else now
        days = [time.strftime("%Y-%m-%d", time.gmtime(end - 86400 * i)) for i in range(since_days)]
        records = await self.store.usage(sorted(specs), days)
        return aggregate(records, by=by, classes=classes, prices=prices or Prices())

    async def usage_by_model(
        self, *, since_days: int = 7, now: float | None = None
    ) -> list[ModelUsageRow]:
        """Tokens in, cached and out per model over the last ``since_days`` UTC days,
        priced with each applied Model's ``prices``."""
        specs = await self.store.agent_specs()
        end = time.time() if now is None else now
        days = [time.strftime("%Y-%m-%d", time.gmtime(end - 86400 * i)) for i in range(since_days)]
        records = await self.store.usage(sorted(specs), days)
        prices = {}
        for name, body in (await self.store.models()).items():
            resource = parse_resource(body)
            if isinstance(resource, ModelResource):
                prices[name] = resource.spec.prices
        return by_model(records, prices)
