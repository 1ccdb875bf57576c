"""How a task ends before its loop is done: past one of ``spec.limits``, cancelled by
an operator (``agentos tasks cancel``), or with no model of its route able to serve
(``onExhausted: fail``).

Either way the task is over: recorded (``failed`` with the limit, or ``cancelled``
with who), with its event, its message acknowledged; it is not retried and it is not
a crash. Its verdict is the runtime's, not the evaluator's: ``fail`` past a limit (it
did not finish its job), ``unknown`` when cancelled (nobody judged what it did).

A cancel that reaches the runner while the task is not running (queued,
waiting for a slot, in a crash backoff, or noted on the record by another daemon's
client) is kept in the runner's ``state.cancels`` until the task comes up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from agentos.core.outcomes import Outcome
from agentos.core.tasks import Task, TaskStatus, queued_record
from agentos.runtime.closing import close_task
from agentos.store import TaskWrite, Write

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = [
    "end_cancelled",
    "end_exhausted",
    "end_if_cancelled",
    "end_limited",
    "noted_cancels",
]

log = logging.getLogger("agentos.runner")


async def end_limited(runner: AgentRunner, task: Task, reason: str, span: Any) -> None:
    """Past one of ``spec.limits``: failed and done (not retried, not a crash); counted
    in ``tasks_failed`` (a ``fail`` verdict) when it closes."""
    runner.tasks_failed += 1
    runner.dirty = True
    limit = reason.split(":", 1)[0]
    span.set_attribute("agentos.task.status", TaskStatus.FAILED)
    span.set_attribute("agentos.task.limit", limit)
    log.warning("%s: task %s stopped: %s", runner.name, task.id, reason)
    await runner.writer.write(Write(event=runner.writer.event("TaskLimitExceeded", limit, reason)))
    await close_task(
        runner,
        task,
        TaskStatus.FAILED,
        f"stopped: {reason}",
        error=reason,
        outcome=Outcome("fail", reason=reason, source="runtime"),
        span=span,
    )


async def end_exhausted(runner: AgentRunner, task: Task, reason: str, span: Any) -> None:
    """No model of the agent's route could serve a call and the route says ``onExhausted:
    fail``: the agent's code let :class:`RouteExhausted` through, so the task failed, for
    a reason that is not the agent's code (not retried, not a crash; the route wrote its
    ``RouteExhausted`` event)."""
    runner.tasks_failed += 1
    runner.dirty = True
    span.set_attribute("agentos.task.status", TaskStatus.FAILED)
    log.warning("%s: task %s failed: %s", runner.name, task.id, reason)
    await close_task(
        runner,
        task,
        TaskStatus.FAILED,
        f"failed: {reason}",
        error=f"RouteExhausted: {reason}",
        outcome=Outcome("fail", reason=reason, source="runtime"),
        span=span,
    )


async def end_if_cancelled(runner: AgentRunner, task: Task) -> bool:
    """A task cancelled before it started is recorded cancelled, its message
    acknowledged, without waking the agent or running its code. True when it was."""
    if task.id in runner.state.cancels:
        task.cancelled_by, task.cancel_recorded = runner.state.cancels.pop(task.id)
    if task.cancelled_by is None or task.resume is not None:
        return False  # a resumed wait ends inside its task (its record is written)
    reason = f"cancelled by {task.cancelled_by}"
    now = runner.clock()
    fields: dict[str, object] = {
        "status": TaskStatus.CANCELLED,
        "finished_at": repr(now),
        "result": reason,
        "error": reason,
    }
    if not task.recorded:
        fields = {**queued_record(task, runner.name, now), **fields}
    event = None
    if not task.cancel_recorded:
        event = runner.writer.event("TaskCancelled", "operator", f"task {task.id} {reason}")
    await runner.writer.write(
        Write(
            tasks=(TaskWrite(task.id, fields, created_at=None if task.recorded else now),),
            ack_id=task.message.id if task.message is not None else None,
            event=event,
        )
    )
    return True


async def end_cancelled(runner: AgentRunner, task: Task, by: str, span: Any) -> None:
    """Cancelled while it ran (or as it resumed): done, not retried, not a crash; what it
    recorded before (tool calls, state) stays."""
    runner.dirty = True
    span.set_attribute("agentos.task.status", TaskStatus.CANCELLED)
    reason = f"cancelled by {by}"
    if not task.cancel_recorded:
        await runner.writer.write(
            Write(
                event=runner.writer.event("TaskCancelled", "operator", f"task {task.id} {reason}")
            )
        )
    await close_task(
        runner,
        task,
        TaskStatus.CANCELLED,
        reason,
        error=reason,
        outcome=Outcome("unknown", reason=reason, source="runtime"),
        span=span,
    )


def noted_cancels(unfinished: Iterable[Mapping[str, str]]) -> dict[str, tuple[str, bool]]:
    """The cancels noted on unfinished task records (``cancel_by``, written while another
    daemon held the agent): task id -> (who, recorded already: no)."""
    return {r.get("id", ""): (r["cancel_by"], False) for r in unfinished if r.get("cancel_by")}
