"""``agentos eval``: an Agent's evaluator run again over its recorded tasks.

It runs here, in the client's process (the evaluator's code must be importable here,
as on a daemon), records each task's verdict and moves each changed verdict's count
in the usage of the day it was counted on. Judging again with the same verdicts
changes no count. It is the one client job that loads agent code, so it lives apart
from the reads in :mod:`agentos.client.usage`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentos.client.usage import day_of
from agentos.core.errors import ClientError, NotFound
from agentos.core.modelusage import TaskCounts
from agentos.core.outcomes import Outcome
from agentos.core.spec import AgentResource, parse_resource
from agentos.core.taskview import EvaluatedTask, record_outcome
from agentos.runtime.evaluate import Evaluator
from agentos.runtime.loop import EntrypointError
from agentos.store import Store

__all__ = ["EVAL_MAX_TASKS", "EvalReport", "EvalRow", "NoEvaluator", "evaluate_tasks"]

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


async def evaluate_tasks(
    name: str,
    *,
    store: Store,
    task_id: str | None,
    since_s: float | None,
    now: float | None,
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
    body = await store.specs.agent(name)
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
        record = await store.tasks.get(name, task_id)
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
        records = await store.tasks.recent(name, count=EVAL_MAX_TASKS, since=since)
    rows: list[EvalRow] = []
    skipped = 0
    for record in reversed(records):  # oldest first
        if record.get("status") != "succeeded" or not _counts(record):
            skipped += 1
            continue
        row = await _judge_again(name, evaluator, record, store=store)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    return EvalReport(name, evaluator.name, tuple(rows), skipped)


async def _judge_again(
    name: str, evaluator: Evaluator, record: Mapping[str, str], *, store: Store
) -> EvalRow | None:
    """Judge one task and record it; None when its record went meanwhile."""
    task_id = record.get("id", "")
    before = record_outcome(record)
    task = EvaluatedTask.from_record(name, record)
    outcome = await evaluator.judge(task)
    own = "" if task.outcome is None else json.dumps(task.outcome.to_dict())
    for _ in range(3):  # its day is read again if a daemon counted it meanwhile
        day = record.get("counted_on") or day_of(_epoch(record))
        done, why = await store.tasks.set_outcome(
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
        record = await store.tasks.get(name, task_id)
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
