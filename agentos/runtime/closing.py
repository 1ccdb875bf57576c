"""What a task writes as it goes and as it ends: each step's state and ack, and its close.

After each step the state it produced (if it changed), the message's ack (with the
first state) and the cleared tool ledger are deferred until the next step's plan or
the task's close, whichever comes first: one write fewer for a one-step task, atomic
either way. The close records the task's status, result, verdict (``outcome``), cost
(``cost``, its calls priced with each Model's prices) and the models that served it
(``models``, the last one credited in ``usage --by model``), with the agent back to
Idle, its state and its ack, in one fenced write; when the next task is already
queued the close is deferred and rides with that task's start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agentos.core.lifecycle import PhaseEvent
from agentos.core.outcomes import Outcome
from agentos.core.tasks import Task, TaskStatus, queued_record
from agentos.runtime.verdicts import count_outcome
from agentos.store import Duplicate, TaskWrite, Write

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = ["after_step", "close_task", "duplicate_of", "encode_state"]


async def close_task(
    runner: AgentRunner,
    task: Task,
    status: TaskStatus,
    result: str,
    *,
    steps: int = 0,
    error: str = "",
    outcome: Outcome | None = None,
    span: Any = None,
) -> None:
    """Back to Idle, with the task's result, verdict and cost, its state and its ack
    in one write. ``outcome`` None: not a task that counts (it did nothing); a
    ``failed`` task counts in ``tasks_failed`` (and so as a ``fail`` verdict)."""
    s = runner.state
    runner.telemetry.tasks.add(1, {"agentos.task.status": status, "gen_ai.agent.name": runner.name})
    state = encode_state(runner)
    now = runner.clock()
    fields: dict[str, object] = {
        "status": status,
        "finished_at": repr(now),
        "steps": steps,
        "tokens_in": runner.tokens_in - s.task_tokens[0],
        "tokens_out": runner.tokens_out - s.task_tokens[1],
        "result": result,
        "error": error,
        "cost": repr(round(s.task_cost, 9)),
    }
    served = runner.usage.served
    if served:
        fields["models"] = ",".join(served)
    if outcome is not None:
        fields |= count_outcome(runner, status, outcome, now, span)
    close = TaskWrite(task.id, fields, idempotency_key=s.unacked_key if s.unacked else None)
    await runner.set_phase(
        PhaseEvent.IDLE,
        Write(status=runner.task_counters(), state=state, ack_id=s.unacked, tasks=(close,)),
        defer=runner.next_due(pop=False) is not None and runner.stop_reason is None,
    )
    s.unacked = None
    s.unacked_key = None
    if state is not None:
        s.saved_state = state


def duplicate_of(runner: AgentRunner, task: Task) -> Duplicate:
    """What the start of ``task`` does instead if its message's key completed."""
    m = task.message
    assert m is not None
    assert m.key
    now = runner.clock()
    return Duplicate(
        m.key,
        m.id,
        TaskWrite(
            task.id,
            {
                **(queued_record(task, runner.name, now) if not task.recorded else {}),
                "status": TaskStatus.SKIPPED,
                "finished_at": repr(now),
                "result": f"duplicate: idempotency key {m.key!r} already completed",
            },
            created_at=None if task.recorded else now,
        ),
    )


async def after_step(runner: AgentRunner) -> None:
    """After each completed step: count it and defer what it produced (see the module
    docstring)."""
    s = runner.state
    runner.steps += 1
    runner.last_activity = runner.clock()
    runner.dirty = True
    state = encode_state(runner)
    ctx = runner.ctx
    # The message that started the task is acknowledged in the same atomic write
    # as the first state it produced: a crash can never keep one without the other.
    ack = s.unacked if ctx is not None and ctx.message_taken else None
    # A completed iteration's tool ledger is not replayed by the next one.
    cleared = runner.ledger.cleared() if runner.ledger is not None else None
    if state is None and ack is None and cleared is None:
        return
    record = None
    if (ack is not None or cleared is not None) and ctx is not None:
        # Completing the key with the ack: a redelivered duplicate is skipped.
        fields = {**(cleared or {}), **({"acked_at": repr(runner.clock())} if ack else {})}
        record = TaskWrite(
            ctx.task.id, fields, idempotency_key=s.unacked_key if ack is not None else None
        )
    # Deferred until the next step's plan or the task's close, whichever comes
    # first (one write fewer for a one-step task); atomic either way.
    runner.writer.defer(
        Write(state=state, ack_id=ack, tasks=(record,) if record is not None else ())
    )
    if ack is not None:
        s.unacked = None
    if state is not None:
        s.saved_state = state


def encode_state(runner: AgentRunner) -> bytes | None:
    """The state's bytes if they differ from what Redis holds, else None."""
    assert runner.codec is not None
    assert runner.ctx is not None
    data = runner.codec.encode(runner.ctx.state)
    return None if data == runner.state.saved_state else data
