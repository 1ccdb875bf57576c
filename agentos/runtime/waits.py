"""The runner's side of durable waits: a task waits, the agent is released; it resumes.

When agent code reaches a wait with nothing recorded for it (``ctx.ask``, ``wait_for``,
``sleep_until``), the loop iteration ends with :class:`~agentos.core.waits.WaitRequested`
and :func:`wait_for` makes the task wait durably: the wait goes into its due shard (with
a provisional due time), the engine slot is given back (KV saved per ``keepKV``), one
fenced write records the task as ``waiting`` and the agent as ``Waiting`` and releases
the lease, the wait is armed at its deadline and the agent leaves the daemon's held set.
The runner then ends: nothing of the agent stays in any daemon.

A daemon that activates the agent (an answer, an event, the deadline, from the due index)
starts a runner as usual; :func:`resume_wait` reads the wait and does what
:func:`agentos.core.waits.on_activation` decides: resume the task with the resolution
appended to its recorded answers, arm the wait again (not resolved yet), or drop a stale
wait. (The store and the wait record keep their names: ``wait_park``, ``park_id``.)
"""

from __future__ import annotations

import functools
import json
import logging
from typing import TYPE_CHECKING, Any

from agentos.core.fairness import QuotaExceeded
from agentos.core.lifecycle import PhaseEvent
from agentos.core.messages import Message
from agentos.core.tasks import Task, TaskStatus, short
from agentos.core.waits import (
    Discard,
    Repark,
    Resolution,
    Resumed,
    WaitKind,
    WaitRecord,
    WaitRequested,
    WaitSpec,
    on_activation,
)
from agentos.runtime.securing import give_back_slot
from agentos.store import AgentSnapshot, StoreError, TaskWrite, Write
from agentos.store.retry import new_op_id

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = ["PARK_GRACE_S", "begin_waits", "resume_wait", "wait_for", "wait_for_budget"]

log = logging.getLogger("agentos.runner")

# A wait's record is due this soon until the release that commits it: if the daemon
# dies in between, the agent is activated again and the torn wait is discarded (the
# task re-runs).
PARK_GRACE_S = 30.0
_OUTCOME_EVENT = {
    "answered": "Answered",
    "event": "EventReceived",
    "timeout": "WaitTimedOut",
    "rollover": "BudgetRenewed",
    "released": "BudgetRaised",
}


def begin_waits(runner: AgentRunner, task: Task) -> None:
    """Before a task's loop: replay what a resumed task recorded, let it wait durably."""
    assert runner.ctx is not None
    ctx = runner.ctx
    ctx._waits.clock = runner.clock
    ctx._events = functools.partial(_send_event, runner)
    resumed: Resumed | None = task.resume
    if resumed is None:
        ctx._waits.begin()
        return
    ctx._waits.begin(resumed.answers, resumed.calls, tools=resumed.tools)
    if resumed.message_taken:
        ctx._message_taken = True


async def _send_event(runner: AgentRunner, agent: str, event: str, data: Any) -> bool:
    try:
        json.dumps(data)
    except (TypeError, ValueError):
        raise ValueError("ctx.send_event: data must be JSON-serialisable") from None
    resolution = Resolution("event", data, f"agent:{runner.name}", runner.clock())
    event_id = new_op_id()
    answered: bool = await runner.writer.call(
        lambda: runner.store.waits.event(
            agent, event, resolution, now=runner.clock(), event_id=event_id
        ),
        "send event",
    )
    if answered:
        await runner.writer.call(lambda: runner.store.signals.send("due", agent), "signal")
    return answered


async def wait_for(runner: AgentRunner, task: Task, request: WaitRequested) -> None:
    """The task waits durably and the agent is released (see the module docstring)."""
    await _wait_durably(runner, task, request.spec, request.seq)


async def wait_for_budget(
    runner: AgentRunner, task: Task, error: QuotaExceeded, resume_at: float
) -> None:
    """A spent budget makes the task wait like ``ctx.wait_for``: until the budget day ends, or a
    policy raises the limit; the agent is released meanwhile."""
    assert runner.ctx is not None
    spec = WaitSpec(WaitKind.BUDGET, str(error), None, resume_at)
    await _wait_durably(
        runner, task, spec, runner.ctx._waits.consumed, quota_class=runner.resource.spec.quota_class
    )


async def _wait_durably(
    runner: AgentRunner, task: Task, spec: WaitSpec, seq: int, *, quota_class: str = ""
) -> None:
    assert runner.ctx is not None
    now = runner.clock()
    budget = spec.kind is WaitKind.BUDGET
    record = WaitRecord(
        agent=runner.name,
        task_id=task.id,
        park_id=new_op_id(),
        kind=spec.kind,
        question=spec.question,
        choices=spec.choices,
        deadline=spec.deadline,
        default=spec.default,
        has_default=spec.has_default,
        since=now,
        seq=seq,
        quota_class=quota_class,
        tool=spec.tool,
        arguments=spec.arguments,
    )
    answers = [a.to_json() for a in runner.ctx._waits.answers[:seq]]
    calls = list(runner.ctx._waits.made)
    taken = runner.ctx.message_taken and runner.state.unacked is None  # acked in an earlier step
    await runner.writer.call(
        lambda: runner.store.waits.put(record, provisional_at=now + PARK_GRACE_S), "park"
    )
    saved = await give_back_slot(runner)
    runner.state.unacked = None  # stays pending: the resumed task is the same task
    runner.state.unacked_key = None
    runner.move(PhaseEvent.WAIT, path=True)
    what = spec.describe()
    until = f" until {spec.deadline:.0f}" if spec.deadline is not None else ""
    runner.dirty = False
    await runner.writer.write(
        Write(
            status={
                **saved,
                **runner.task_counters(),
                **runner.counters(),
                "phase": runner.phase.value,
                "owner": "",  # released: no daemon holds it while it waits
                "updated_at": repr(now),
                "reason": "BudgetExhausted" if budget else "Waiting",
                "message": f"task {task.id} {what}{until}",
                "wait_task": task.id,
                "wait_park_id": record.park_id,
                "waiting_since": repr(now),
            },
            usage=runner.usage_delta(),
            tasks=(
                TaskWrite(
                    task.id,
                    {
                        "status": TaskStatus.PARKED if budget else TaskStatus.WAITING,
                        "wait_tool": spec.tool,
                        "wait_kind": spec.kind.value,
                        "wait_question": short(spec.question, 500),
                        "wait_choices": json.dumps(list(spec.choices)) if spec.choices else "",
                        "wait_deadline": repr(spec.deadline) if spec.deadline is not None else "",
                        "waiting_since": repr(now),
                        "answers": json.dumps(answers),
                        "calls": json.dumps(calls),
                        "tools": json.dumps(runner.ctx._waits.tools),
                        "message_taken": "1" if taken else "",
                        "spent": repr(runner.state.task_cost),  # the resumed run goes on from it
                        **_message_fields(task),
                    },
                ),
            ),
            event=runner.writer.event(
                "BudgetExhausted" if budget else "Waiting",
                spec.kind.value,
                f"task {task.id} {what}{until} (not a crash)",
            ),
        ),
        release=True,
    )
    runner._apply_released(f"task {task.id} {what}")
    try:
        answered = await runner.writer.call(lambda: runner.store.waits.arm(record, now=now), "arm")
        if answered:
            await runner.writer.call(
                lambda: runner.store.signals.send("due", runner.name), "signal"
            )
        await runner.writer.call(
            lambda: runner.store.waits.held_remove(runner.daemon_id, [runner.name]), "release"
        )
    except StoreError as e:  # the provisional due time activates it anyway
        log.warning(
            "%s: could not arm the wait (%s); due in %.0fs anyway", runner.name, e, PARK_GRACE_S
        )


async def resume_wait(runner: AgentRunner, snapshot: AgentSnapshot, *, fresh: bool = False) -> bool:
    """At start: resume, re-arm or drop the agent's wait. False when it still waits
    (the lease is released again: the runner must end)."""
    unfinished = {r.get("id", ""): r for r in snapshot.unfinished}
    for task in runner.state.queue:  # resumed before and interrupted: replay the same answers
        prior = unfinished.get(task.id)
        if prior is not None and task.resume is None:
            task.resume = Resumed.from_record(prior)
    # Read with the open (after the lease was taken); again only after a re-arm.
    if fresh:
        wait = await runner.writer.call(lambda: runner.store.waits.get(runner.name), "read wait")
    else:
        wait = WaitRecord.from_fields(snapshot.wait) if snapshot.wait else None
    if wait is None:
        return True
    record = await runner.writer.call(
        lambda: runner.store.tasks.get(runner.name, wait.task_id), "task"
    )
    recorded = json.loads(record.get("answers") or "[]") if record else []
    action = on_activation(
        wait,
        committed=snapshot.status.get("wait_park_id") == wait.park_id,
        consumed=len(recorded) > wait.seq,
        now=runner.clock(),
    )
    if isinstance(action, Discard):
        log.info("%s: dropping a wait: %s", runner.name, action.why)
        await runner.writer.call(
            lambda: runner.store.waits.clear(runner.name, wait.park_id), "clear"
        )
        return True
    if isinstance(action, Repark):
        armed = await runner.writer.call(
            lambda: runner.store.waits.arm(wait, now=runner.clock()), "arm"
        )
        if armed:  # answered meanwhile after all
            return await resume_wait(runner, snapshot, fresh=True)
        await runner.writer.call(
            lambda: runner.store.leases.release(runner.name, runner.lease_value), "release"
        )
        await runner.writer.call(
            lambda: runner.store.waits.held_remove(runner.daemon_id, [runner.name]), "release"
        )
        runner._apply_released(f"task {wait.task_id} still waits")
        return False
    await _resume(runner, wait, record, recorded, action.resolution)
    return True


async def _resume(
    runner: AgentRunner,
    wait: WaitRecord,
    record: dict[str, str],
    recorded: list[dict[str, Any]],
    resolution: Resolution,
) -> None:
    now = runner.clock()
    answers = list(recorded[: wait.seq])
    if wait.kind is not WaitKind.BUDGET:  # agent code waited: it gets the resolution
        answers.append(resolution.to_json())
    resumed = Resumed(
        tuple(Resolution.from_json(a) for a in answers),
        tuple(json.loads(record.get("calls") or "[]")),
        record.get("message_taken") == "1",
        json.loads(record.get("tools") or "{}"),
    )
    queued = runner.take_queued(wait.task_id)
    task = queued[0] if queued else _task_of(record, wait.task_id)
    task.resume = resumed
    task.spent = _float(record.get("spent"))
    task.recorded = True
    if resolution.outcome == "cancelled":  # `agentos tasks cancel` on a waiting task
        task.cancelled_by = resolution.by or "an operator"
    runner.queue_next(task)
    waited_s = max(0.0, now - wait.since)
    shown = resolution.value if resolution.outcome != "timeout" else "(deadline)"
    what = f"task {wait.task_id}: {resolution.outcome} {short(shown, 120)!r}"
    if resolution.by:
        what += f" by {resolution.by}"
    await runner.writer.write(
        Write(
            tasks=(
                TaskWrite(
                    wait.task_id,
                    {
                        "status": TaskStatus.QUEUED,
                        "answers": json.dumps(answers),
                        "wait_outcome": resolution.outcome,
                        "answer": json.dumps(resolution.value),
                        "answered_by": resolution.by,
                        "answered_at": repr(resolution.at or now),
                        "waited_s": f"{waited_s:.3f}",
                        # A daemon that takes the agent over ends it too, never replays it.
                        **({"cancel_by": task.cancelled_by} if task.cancelled_by else {}),
                    },
                ),
            ),
            event=runner.writer.event(
                _OUTCOME_EVENT.get(resolution.outcome, "WaitOver"),
                wait.kind.value,
                f"{what} after {waited_s:.1f}s",
            ),
        )
    )
    await runner.writer.call(lambda: runner.store.waits.clear(runner.name, wait.park_id), "clear")
    attrs: dict[str, Any] = {
        "gen_ai.agent.name": runner.name,
        "agentos.task.id": wait.task_id,
        "agentos.wait.kind": wait.kind.value,
        "agentos.wait.outcome": resolution.outcome,
        "agentos.wait.waited_s": waited_s,
        "agentos.wait.answered_by": resolution.by,
    }
    if getattr(runner.telemetry, "capture_content", False):
        attrs["agentos.wait.question"] = wait.question
    with runner.telemetry.span("agentos.wait", **attrs):
        pass


def _message_fields(task: Task) -> dict[str, str]:
    """What a waiting task keeps of its message so that it resumes with all of it: the
    message is acknowledged by then, and the record's payload is only a preview."""
    m = task.message
    if m is None:
        return {}
    return {
        "message_body": m.body,
        "message_sent_at": repr(m.sent_at or 0.0),
        "message_traceparent": m.traceparent or "",
    }


def _task_of(record: dict[str, str], task_id: str) -> Task:
    """A waiting task from its record, when its message is no longer pending (or it has
    none)."""
    index = record.get("trigger_index")
    scheduled = record.get("scheduled_at")
    message = None
    if record.get("message_id"):
        # Acknowledged (with its idempotency key) by an earlier iteration: no key here,
        # or the resumed task would be skipped as a duplicate of itself.
        # The whole message, as the wait kept it (the payload is a 200-character preview,
        # all that records written before the wait kept the whole body have).
        message = Message(
            record["message_id"],
            record.get("message_body", record.get("payload", "")),
            None,
            float(record.get("message_sent_at") or 0.0),
            record.get("message_traceparent") or None,
        )
    return Task(
        record.get("trigger") or "wake",
        message,
        attempt=int(record.get("attempt") or 1),
        id=task_id,
        index=int(index) if index else None,
        scheduled_at=float(scheduled) if scheduled else None,
        recorded=True,
    )


def _float(raw: str | None) -> float:
    """A number a record keeps (0 for none or garbage)."""
    try:
        return float(raw or 0.0)
    except ValueError:
        return 0.0
