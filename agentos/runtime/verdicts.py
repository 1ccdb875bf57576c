"""The verdict on a finished task: who judges it, and how it is counted and traced.

A task that ended normally is judged by the Agent's ``spec.evaluate`` when it has one
(its verdict wins), else by what the agent said (``ctx.succeed`` / ``ctx.fail``), else
it is ``unknown``. An evaluator that fails gives ``unknown`` with its error and an
``EvaluationFailed`` event, never an agent crash. The verdict is counted in the day's
usage (``usage`` shows success rate and cost per successful task from it), put on the
task's span as ``gen_ai.evaluation.result`` and written on the record with the close.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from agentos.core.outcomes import Outcome
from agentos.core.tasks import Task, TaskStatus, short
from agentos.core.taskview import EvaluatedTask
from agentos.runtime.evaluate import evaluator_of
from agentos.store import StoreError, Write
from agentos.telemetry import Telemetry

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = ["count_outcome", "judge_task"]

log = logging.getLogger("agentos.runner")


async def judge_task(runner: AgentRunner, task: Task, summary: str, own: Outcome | None) -> Outcome:
    """The verdict on a task that ended normally: its evaluator's, else the agent's
    own (``own``), else ``unknown``. An evaluator that fails gives ``unknown`` with its
    error and a ``EvaluationFailed`` event; never an agent crash."""
    evaluator = evaluator_of(runner.resource.spec)
    if evaluator is None:
        return own if own is not None else Outcome("unknown", source="runtime")
    record: dict[str, str] = {
        "id": task.id,
        "agent": runner.name,
        "trigger": task.trigger,
        "status": TaskStatus.SUCCEEDED,
        "attempt": str(task.attempt),
        "result": summary,
    }
    if task.message is not None:  # what the record keeps: eval re-runs see the same
        record |= {"message_id": task.message.id, "payload": short(task.message.body)}
    if own is not None:
        record["agent_outcome"] = json.dumps(own.to_dict())
    evaluated = EvaluatedTask.from_record(runner.name, record)
    done, outcome = await runner.until_stopped(lambda: evaluator.judge(evaluated))
    if not done or outcome is None:
        outcome = Outcome(
            "unknown",
            source="evaluator",
            error="not judged: the agent was stopping (judge it with `agentos eval`)",
        )
    if outcome.error:
        log.warning("%s: task %s: evaluate %s", runner.name, task.id, outcome.error)
        with contextlib.suppress(StoreError):
            message = f"task {task.id}: evaluate {evaluator.name}: {outcome.error}; verdict unknown"
            event = runner.writer.event("EvaluationFailed", "evaluator", message)
            await runner.writer.write(Write(event=event))
    return outcome


def count_outcome(
    runner: AgentRunner, status: TaskStatus, outcome: Outcome, now: float, span: Any
) -> dict[str, object]:
    """Count ``outcome`` in the day's usage and the trace; the record's fields."""
    if status == TaskStatus.FAILED:
        runner.usage.add(tasks_failed=1)  # counts its fail verdict too
    else:
        runner.usage.judged(outcome.verdict)
    runner.dirty = True
    if span is not None:
        evaluator = evaluator_of(runner.resource.spec)
        who = {"agent": "agent", "runtime": "runtime"}.get(outcome.source)
        Telemetry.evaluation(
            span,
            name=who or (evaluator.name if evaluator is not None else outcome.source),
            verdict=outcome.verdict,
            score=outcome.score,
            reason=outcome.reason or outcome.error,
            error="evaluator_failed" if outcome.error else None,
        )
    fields: dict[str, object] = {
        "outcome": json.dumps(outcome.to_dict()),
        "verdict": outcome.verdict,
        "counted_on": time.strftime("%Y-%m-%d", time.gmtime(now)),
    }
    if runner.ctx is not None and runner.ctx.outcome is not None and outcome.source != "agent":
        fields["agent_outcome"] = json.dumps(runner.ctx.outcome.to_dict())
    return fields
