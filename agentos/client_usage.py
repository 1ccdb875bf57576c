"""The client's side of quotas and metering: effective limits, policy explanations, usage, eval.

``agentos quota``, ``agentos explain``, ``agentos usage``, ``agentos eval`` and their
HTTP endpoints are built on these methods of :class:`agentos.client.Client`. All but
``eval`` only read: the limits the evaluator last stored (or the policies' base limits
before it ran), usage counters per class and agent, and metered usage per day priced
from the fleet's one price source (:class:`agentos.core.metering.PriceBook`: each
applied Model's prices, and the fleet's prices on the QuotaPolicy that declares them).
``eval`` runs an Agent's evaluator again over its recorded tasks, here in the client's
process (its code must be importable here, as on a daemon), and moves each changed
verdict's count in the usage of the day it was counted on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentos.core.errors import ClientError, NotFound
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
from agentos.core.modelusage import ModelUsageRow, TaskCounts, by_model, model_total
from agentos.core.outcomes import Outcome
from agentos.core.policy import ClassQuota, Evaluation, RuleStatus, base_quotas, evaluate
from agentos.core.spec import (
    AgentResource,
    Document,
    QuotaPolicyResource,
    SpecError,
    parse_resource,
)
from agentos.core.taskview import EvaluatedTask, record_outcome
from agentos.governor.evaluator import stored_policies
from agentos.runtime.evaluate import Evaluator
from agentos.runtime.loop import EntrypointError

if TYPE_CHECKING:
    from agentos.store import Store

__all__ = ["EvalReport", "EvalRow", "NoEvaluator", "UsageClientMixin"]

EVAL_MAX_TASKS = 10_000
"""The most task records one ``agentos eval`` judges (the newest)."""


class NoEvaluator(ClientError):
    """``agentos eval`` on an agent without a usable ``spec.evaluate``."""


@dataclass(frozen=True, slots=True)
class EvalRow:
    """One task judged again: its verdict before (None: never judged) and now."""

    task_id: str
    old: str | None
    new: Outcome

    @property
    def changed(self) -> bool:
        """Whether the verdict changed."""
        return self.old != self.new.verdict

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``-o json|yaml``."""
        return {
            "taskId": self.task_id,
            "old": self.old,
            "new": self.new.verdict,
            "score": self.new.score,
            "reason": self.new.reason,
            "error": self.new.error,
            "changed": self.changed,
        }


@dataclass(frozen=True, slots=True)
class EvalReport:
    """What ``agentos eval`` did: each task judged, and the tasks it left alone (they
    did not end normally: a failed task stays ``fail``, a cancelled one ``unknown``)."""

    agent: str
    evaluator: str
    rows: tuple[EvalRow, ...]
    skipped: int

    @property
    def counts(self) -> TaskCounts:
        """The new verdicts, counted."""
        verdicts = [r.new.verdict for r in self.rows]
        return TaskCounts(verdicts.count("pass"), verdicts.count("fail"), verdicts.count("unknown"))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``-o json|yaml``."""
        counts = self.counts
        rate = counts.success_rate
        return {
            "agent": self.agent,
            "evaluator": self.evaluator,
            "tasks": [r.to_dict() for r in self.rows],
            "summary": {
                "judged": len(self.rows),
                "pass": counts.passed,
                "fail": counts.failed,
                "unknown": counts.unknown,
                "changed": sum(1 for r in self.rows if r.changed),
                "skipped": self.skipped,
                "successRate": None if rate is None else round(rate, 6),
            },
        }


def _day(epoch: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch))


def _days(since_days: int, now: float | None) -> list[str]:
    end = time.time() if now is None else now
    return [_day(end - 86400 * i) for i in range(since_days)]


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

    async def price_book(self) -> PriceBook:
        """The fleet's prices: each applied Model's, and the fleet's on the QuotaPolicy
        that declares ``spec.prices``."""
        models = {}
        for name, body in (await self.store.models()).items():
            try:
                resource = parse_resource(body)
            except SpecError:
                continue
            if isinstance(resource, ModelResource):
                models[name] = resource.spec.prices
        declared = fleet_prices(stored_policies(await self.store.policies()))
        if declared is None:
            return PriceBook(models)
        if declared[1].default_model is not None:  # the daemons' own engine's, declared once
            models.setdefault("default", declared[1].default_model)
        return PriceBook(models, declared[1], declared[0])

    async def _usage_records(
        self, since_days: int, now: float | None
    ) -> tuple[dict[tuple[str, str], dict[str, float]], dict[str, dict[str, Any]]]:
        specs = await self.store.agent_specs()
        return await self.store.usage(sorted(specs), _days(since_days, now)), specs

    async def usage_report(
        self, *, by: str = "agent", since_days: int = 7, now: float | None = None
    ) -> UsageReport:
        """Metered usage of the last ``since_days`` UTC days (today included), summed by
        ``agent``, ``class``, ``route``, ``day`` or ``model``, priced from the fleet's
        prices (:meth:`price_book`), with a total and what could not be priced. ``model``
        prices tokens only (agent-hours and KV storage belong to agents).

        Raises ValueError for another ``by``.
        """
        if by not in BY:
            raise ValueError(f"cannot group usage by {by!r}: one of {', '.join(BY)}")
        records, specs = await self._usage_records(since_days, now)
        book = await self.price_book()
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
        self,
        *,
        by: str = "agent",
        since_days: int = 7,
        prices: Prices | None = None,
        now: float | None = None,
    ) -> list[UsageRow]:
        """The rows of :meth:`usage_report` by ``agent``, ``class``, ``route`` or ``day``
        (no total); with ``prices``, priced with that flat table instead of the fleet's."""
        if prices is None:
            report = await self.usage_report(by=by, since_days=since_days, now=now)
            return [r for r in report.rows if isinstance(r, UsageRow)]
        records, specs = await self._usage_records(since_days, now)
        classes = {
            n: str(b.get("spec", {}).get("quotaClass", DEFAULT_CLASS)) for n, b in specs.items()
        }
        routes = _route_keys(specs) if by == "route" else None
        return aggregate(records, by=by, classes=classes, routes=routes, prices=prices)

    async def usage_by_model(
        self, *, since_days: int = 7, now: float | None = None
    ) -> list[ModelUsageRow]:
        """Tokens in, cached and out per model over the last ``since_days`` UTC days,
        priced with each applied Model's ``prices``, with the tasks each model served
        last (no total)."""
        report = await self.usage_report(by="model", since_days=since_days, now=now)
        return [r for r in report.rows if isinstance(r, ModelUsageRow)]

    async def evaluate_tasks(
        self,
        name: str,
        *,
        task_id: str | None = None,
        since_s: float | None = None,
        now: float | None = None,
    ) -> EvalReport:
        """Run agent ``name``'s evaluator again over its recorded tasks that ended
        normally (one task with ``task_id``; those created in the last ``since_s``
        seconds; else every recorded one, at most :data:`EVAL_MAX_TASKS`), record each
        verdict and move its count in the usage of the day it was counted on. Judging
        again with the same verdicts changes no count.

        Raises :class:`NotFound` (no such agent or task), :class:`NoEvaluator` (the agent
        declares no ``spec.evaluate``, or it cannot be imported here) and
        :class:`ClientError` (``task_id`` did not end normally): nothing is changed then.
        """
        body = await self.store.agent_spec(name)
        if body is None:
            raise NotFound(f'agent "{name}" not found')
        resource = parse_resource(body)
        assert isinstance(resource, AgentResource)
        spec = resource.spec
        if spec.evaluate is None:
            raise NoEvaluator(
                f'agent "{name}" declares no spec.evaluate; add '
                "`evaluate: {entrypoint: module:function}` to its spec and apply it"
            )
        evaluator = Evaluator(spec.evaluate, code_path=spec.code_path, code_hash=spec.code_hash)
        try:
            evaluator.load()
        except EntrypointError as e:
            raise NoEvaluator(str(e)) from None
        if task_id is not None:
            record = await self.store.task(name, task_id)
            if not record:
                raise NotFound(f'agent "{name}" has no task "{task_id}"')
            if record.get("status") != "succeeded" or not _counts(record):
                raise ClientError(
                    f'task "{task_id}" is {record.get("status") or "unknown"}: only tasks that '
                    "ended normally and did something are judged (a failed task is fail, a "
                    "cancelled one unknown)"
                )
            records = [record]
        else:
            since = None if since_s is None else (time.time() if now is None else now) - since_s
            records = await self.store.tasks(name, count=EVAL_MAX_TASKS, since=since)
        rows: list[EvalRow] = []
        skipped = 0
        for record in reversed(records):  # oldest first
            if record.get("status") != "succeeded" or not _counts(record):
                skipped += 1
                continue
            row = await self._judge_again(name, evaluator, record)
            if row is None:
                skipped += 1
            else:
                rows.append(row)
        return EvalReport(name, evaluator.name, tuple(rows), skipped)

    async def _judge_again(
        self, name: str, evaluator: Evaluator, record: Mapping[str, str]
    ) -> EvalRow | None:
        """Judge one task and record it; None when its record went meanwhile."""
        task_id = record.get("id", "")
        before = record_outcome(record)
        task = EvaluatedTask.from_record(name, record)
        outcome = await evaluator.judge(task)
        own = "" if task.outcome is None else json.dumps(task.outcome.to_dict())
        for _ in range(3):  # its day is read again if a daemon counted it meanwhile
            day = record.get("counted_on") or _day(_epoch(record))
            done, why = await self.store.set_task_outcome(
                name,
                task_id,
                outcome=json.dumps(outcome.to_dict()),
                verdict=outcome.verdict,
                day=day,
                agent_outcome=own,
            )
            if done:
                return EvalRow(task_id, before.verdict if before is not None else None, outcome)
            if why != "day":
                return None
            record = await self.store.task(name, task_id)
        return None


def _epoch(record: Mapping[str, str]) -> float:
    """When a task finished (or was created), epoch seconds; 0 when unreadable."""
    try:
        return float(record.get("finished_at") or record.get("created_at") or 0.0)
    except ValueError:
        return 0.0


def _counts(record: Mapping[str, str]) -> bool:
    """Whether a finished task did something (a wake-up with nothing to do is no task)."""
    try:
        return int(float(record.get("steps") or 0)) > 0
    except ValueError:
        return False
