"""Running one task of an agent: secure the session, record it, run the loop, judge it, close it.

A task secures the agent's engine session (a slot, its context restored,
:mod:`.securing`) before any agent code runs, records itself as running, runs
observe/plan/act/learn until observe says there is nothing left, acknowledges its
message with the first state it produced, and closes with its outcome in one fenced
write (:mod:`.closing`). While it runs, time triggers that fire follow their
``overlap`` policy.

Before the close, the task is judged: did it do its job? The Agent's evaluator
(``spec.evaluate``, :mod:`agentos.runtime.evaluate`) has the last word on a task that
ended normally, else the agent's own ``ctx.succeed`` / ``ctx.fail``, else nobody
(``unknown``). A task that ended failed (past a limit; raised until its retries ran
out, :mod:`.faults`) is ``fail`` and a cancelled one ``unknown``, by the runtime; neither
is shown to the evaluator (:mod:`.verdicts`).

What the task's loop ended with is one :class:`Ending` value; :func:`run_task` then
hands it to the one collaborator that deals with it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from agentos.core.lifecycle import PhaseEvent
from agentos.core.limits import TaskLimitExceeded
from agentos.core.outcomes import Outcome
from agentos.core.results import render_result
from agentos.core.tasks import Task, TaskStatus, overlap_action, queued_record
from agentos.core.waits import WaitRequested
from agentos.engine.base import EngineError, RouteExhausted
from agentos.runtime import faults, waits
from agentos.runtime.agentlog import current_task
from agentos.runtime.closing import after_step, close_task, duplicate_of
from agentos.runtime.endings import end_cancelled, end_exhausted, end_if_cancelled, end_limited
from agentos.runtime.intake import queued_write
from agentos.runtime.loop import AgentCodeError, TaskResult, no_span
from agentos.runtime.loop import run_task as run_loop
from agentos.runtime.securing import must_wake, secure
from agentos.runtime.toolcalls import attach_server_tools
from agentos.runtime.verdicts import judge_task
from agentos.runtime.watchdog import marked
from agentos.runtime.writer import LeaseLost
from agentos.sdk import TaskInfo
from agentos.store import StoreError, TaskWrite, Write
from agentos.telemetry import Telemetry
from agentos.tools import ToolServerUnavailable

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = ["Ending", "run_task"]

log = logging.getLogger("agentos.runner")


@dataclass(slots=True)
class Ending:
    """How a task's loop ended (at most one of the errors is set)."""

    result: TaskResult | None = None
    failure: AgentCodeError | None = None
    lost: LeaseLost | None = None
    infra: StoreError | None = None  # the runtime's own write after a step failed
    waited: WaitRequested | None = None  # a durable wait ended the iteration
    limited: str | None = None  # the task passed one of spec.limits


async def run_task(runner: AgentRunner, task: Task) -> None:
    """Run one queued task to its end (see the module docstring)."""
    s = runner.state
    # Busy from the first observe on: a holder that is looking for work is not idle.
    s.busy = True
    s.blocked_in_task = runner.mark.blocked = False
    token = current_task.set(task.id)  # its log lines name the task
    try:
        await _run(runner, task)
        if s.blocked:  # the task blocked the event loop: a crash, recorded now
            await faults.charge_blocked(runner)
    finally:
        current_task.reset(token)
        s.busy = False
        runner.task_over.set()  # for whoever waits for the end of a task (a restart)
        runner.task_over = anyio.Event()
        runner.arbiter.holder_idle()


async def _run(runner: AgentRunner, task: Task) -> None:
    if await end_if_cancelled(runner, task):
        return
    runner.usage.begin_task()
    assert runner.agent is not None
    assert runner.ctx is not None
    m = task.message
    if m is not None and m.key:
        # An awake agent checks the key inside its task-start write (no round trip
        # of its own); one that would have to wake checks first, so a duplicate
        # costs no wake. The script checks before it applies a deferred close,
        # so a keyed message never starts with one deferred (its key may be in it).
        await runner.writer.flush()
        if must_wake(runner):
            key = m.key
            done = await runner.writer.call(
                lambda: runner.store.tasks.idempotency_done(runner.name, key), "idempotency"
            )
            if done:
                await runner.writer.write(
                    Write(ack_id=m.id, tasks=(duplicate_of(runner, task).task,))
                )
                return
    starts = runner.state.interrupted_starts.get(task.id, 0)
    if starts >= runner.policy.crash_loop_after:
        # Every start so far was cut short (the daemon lost control each time): a
        # task that takes its daemon down with it must not run again without end.
        await faults.abandon(runner, task, starts)
        return
    info = TaskInfo(
        id=task.id,
        trigger=task.trigger,
        attempt=task.attempt,
        message=m,
        started_at=runner.clock(),
    )
    runner.ctx.begin(info)
    first_observation: Any = None
    if task.trigger in ("heartbeat", "start") and task.resume is None:
        await runner.writer.flush()  # agent code next: the last task's close goes first
        # A heartbeat (or a start) only asks; an agent with nothing to do stays as it
        # is, asleep or idle, and costs nothing: no task, no record, no slot.
        try:
            first_observation = await marked(runner.mark, runner.agent.observe(runner.ctx))
        except Exception as e:
            await faults.on_fault(runner, AgentCodeError("observe", e), task)
            return
        if first_observation is None:
            return
    runner.state.phase_path = [runner.phase.value]
    # The session before any agent code that may call the model.
    try:
        # An agent that uses the model gets its slot now, not inside its first call;
        # one that never did (a pure tool or router agent) takes no slot for nothing.
        secured = await secure(runner, task.trigger, slot=runner.state.uses_model)
    except (StoreError, EngineError) as e:
        await faults.on_fault(runner, AgentCodeError("wake", e), task, infra=True)
        return
    if not secured:
        runner.queue_next(task)  # stopping: the task stays queued for the next owner
        return
    with runner.telemetry.task(
        agent=runner.name,
        agent_id=runner.resource.metadata.name,
        task_id=task.id,
        trigger=task.trigger,
        attempt=task.attempt,
        daemon_id=runner.daemon_id,
        provider=runner.engine.name,
        traceparent=m.traceparent if m is not None else None,
    ) as span:
        try:
            await _run_traced(runner, task, first_observation, span)
        finally:
            span.set_attribute("agentos.phase_path", " > ".join(runner.state.phase_path))


async def _record_start(runner: AgentRunner, task: Task) -> bool:
    """Record the task as running (the agent Running); False when its message's key
    completed before (acknowledged and recorded as skipped instead)."""
    started = runner.clock()
    record: dict[str, object] = {
        "status": TaskStatus.RUNNING,
        "started_at": repr(started),
        "attempt": task.attempt,
    }
    if task.id in runner.state.interrupted_starts:  # kept with the record: counted on
        record["interrupted"] = runner.state.interrupted_starts[task.id]
    if not task.recorded:
        record = {**queued_record(task, runner.name, started), **record}
    fresh = await runner.set_phase(
        PhaseEvent.TASK,
        Write(
            status={"task": task.id, "trigger": task.trigger},
            tasks=(TaskWrite(task.id, record, created_at=None if task.recorded else started),),
        ),
        duplicate=duplicate_of(runner, task) if task.message and task.message.key else None,
    )
    task.recorded = True
    return fresh


async def _run_traced(runner: AgentRunner, task: Task, first_observation: Any, span: Any) -> None:
    s = runner.state
    s.task_tokens = (runner.tokens_in, runner.tokens_out)
    s.task_cost = task.spent  # a retried or resumed task's budget is not fresh
    if task.queued_at is not None:
        runner.telemetry.queue_wait.record(
            runner.clock() - task.queued_at, {"gen_ai.agent.name": runner.name}
        )
    if not await _record_start(runner, task):
        runner.move(PhaseEvent.IDLE)
        span.set_attribute("agentos.task.status", TaskStatus.SKIPPED)
        return
    s.unacked = task.message.id if task.message is not None else None
    s.unacked_key = task.message.key if task.message is not None else None
    if not await _attach_tools(runner, task):
        return
    if task.id in s.cancels:  # cancelled while it started
        task.cancelled_by, task.cancel_recorded = s.cancels.pop(task.id)
    if task.cancelled_by is not None:  # ... or while it waited for an answer
        await end_cancelled(runner, task, task.cancelled_by, span)
        return
    scope = anyio.CancelScope()
    ending = await _loop(runner, task, first_observation, scope)
    if ending.lost is not None:
        raise ending.lost
    await _conclude(runner, task, ending, scope, span)


async def _loop(
    runner: AgentRunner, task: Task, first_observation: Any, scope: anyio.CancelScope
) -> Ending:
    """Run the task's observe/plan/act/learn loop; how it ended."""
    agent, ctx = runner.agent, runner.ctx
    assert agent is not None
    assert ctx is not None
    ending = Ending()
    limits = runner.resource.spec.limits
    timeout = limits.task_timeout if limits is not None else None
    clock = anyio.CancelScope(
        deadline=anyio.current_time() + timeout if timeout is not None else math.inf
    )
    waits.begin_waits(runner, task)

    async def body() -> None:
        # Errors are kept, not raised: inside a task group they would arrive as an
        # ExceptionGroup, and a handler for LeaseLost would silently never run.
        with scope, clock:
            try:
                # Marked for the watchdog: a block of the loop is charged to us.
                ending.result = await marked(
                    runner.mark,
                    run_loop(
                        agent,
                        ctx,
                        after_step=lambda step, outcome: after_step(runner),
                        first_observation=first_observation,
                        max_steps=limits.max_steps if limits is not None else None,
                        # Disabled telemetry must cost nothing per loop step.
                        phase_span=runner.telemetry.span if runner.telemetry.enabled else no_span,
                        before_step=runner.writer.flush,
                    ),
                )
            except TaskLimitExceeded as e:
                ending.limited = e.reason
            except AgentCodeError as e:
                ending.failure = e
            except LeaseLost as e:
                ending.lost = e
            except StoreError as e:
                ending.infra = e
            except WaitRequested as e:
                ending.waited = e

    runner.state.running = (task, scope)
    try:
        if any(t.kind in ("schedule", "every", "at") for t in runner.resource.spec.triggers):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_overlaps, runner, task, scope)
                await body()
                tg.cancel_scope.cancel()
        else:  # no time trigger can fire during the task: nothing to watch
            await body()
    except anyio.get_cancelled_exc_class():
        runner.state.interrupted = True
        raise
    finally:
        runner.state.running = None
    if clock.cancelled_caught and limits is not None and ending.limited is None:
        ending.limited = limits.timeout_reason()
    if ending.result is not None and ending.result.limited and limits is not None:
        ending.limited = limits.steps_reason()
    return ending


async def _conclude(
    runner: AgentRunner, task: Task, ending: Ending, scope: anyio.CancelScope, span: Any
) -> None:
    """Hand the task's ending to the collaborator that deals with it."""
    # Cut short by `tasks cancel` (whatever the agent's code made of the cancellation).
    if task.cancelled_by is not None and scope.cancel_called:
        await end_cancelled(runner, task, task.cancelled_by, span)
        return
    if ending.limited is not None:
        await end_limited(runner, task, ending.limited, span)
        return
    failure, result = ending.failure, ending.result
    if failure is not None and isinstance(failure.error, RouteExhausted):
        await end_exhausted(runner, task, str(failure.error), span)
        return
    if ending.waited is not None:
        span.set_attribute("agentos.task.waiting", ending.waited.spec.kind.value)
        await waits.wait_for(runner, task, ending.waited)
        return
    if ending.infra is not None:
        await faults.on_fault(runner, AgentCodeError("save", ending.infra), task, infra=True)
        return
    if failure is not None:
        Telemetry.fail(span, failure.error)
        span.set_attribute("agentos.task.phase", failure.phase)
        await faults.on_fault(runner, failure, task)
        return
    if result is None:  # cancelled by a newer fire of the same trigger
        reason = "cancelled by a newer fire (overlap)"
        unknown = Outcome("unknown", reason=reason, source="runtime")
        await close_task(runner, task, TaskStatus.CANCELLED, reason, outcome=unknown, span=span)
        return
    s = runner.state
    if result.stopped and result.steps == 0:
        # Stopped before doing anything: the task stays queued for the next owner.
        s.unacked = None
        runner.queue_next(task)
        await runner.set_phase(
            PhaseEvent.IDLE, Write(tasks=(TaskWrite(task.id, {"status": TaskStatus.QUEUED}),))
        )
        return
    s.interrupted_starts.pop(task.id, None)
    if not (s.blocked_in_task or runner.mark.blocked):  # blocking the loop: a crash
        runner.consecutive_failures = 0
    if result.steps:
        # A wake-up whose first observe found nothing to do is not a task.
        runner.tasks_succeeded += 1
        runner.dead_letters_in_row = 0
        runner.usage.add(tasks_succeeded=1)
        runner.dirty = True
    span.set_attribute("agentos.task.steps", result.steps)
    runner.last_activity = runner.clock()
    ctx = runner.ctx
    assert ctx is not None
    if ctx.has_result:
        summary = render_result(ctx.result)
    else:
        summary = render_result(result.outcome) if result.steps else "nothing to do"
    # A wake-up that did nothing is not a task: nothing to judge, nothing counted.
    outcome = await judge_task(runner, task, summary, ctx.outcome) if result.steps else None
    await close_task(
        runner, task, TaskStatus.SUCCEEDED, summary, steps=result.steps, outcome=outcome, span=span
    )


async def _attach_tools(runner: AgentRunner, task: Task) -> bool:
    """The agent's ToolServers' tools join ``ctx.tools``; False (the task retried, an
    event naming the server) when one cannot be reached."""
    tools = runner.resource.spec.tools
    if tools is None or not tools.servers or runner.tool_servers is None:
        return True
    assert runner.ctx is not None
    try:
        await attach_server_tools(runner.ctx.tools, runner.tool_servers, tools.servers)
    except (ToolServerUnavailable, ValueError) as e:
        error = e if isinstance(e, ToolServerUnavailable) else ToolServerUnavailable(str(e))
        await faults.on_fault(runner, AgentCodeError("tools", error), task, infra=True)
        return False
    return True


async def _watch_overlaps(runner: AgentRunner, current: Task, scope: anyio.CancelScope) -> None:
    """While a task runs, apply each time trigger's overlap policy to its fires."""
    triggers = runner.triggers
    try:
        while True:
            next_at = triggers.next_at
            await anyio.sleep(60.0 if next_at is None else max(0.0, next_at - runner.clock()))
            fires = [f for f in triggers.due_fires(runner.clock()) if f.kind != "heartbeat"]
            if fires:
                try:
                    await _overlapping(runner, fires, current, scope)
                except StoreError as e:
                    log.warning("%s: could not record a fire during a task: %s", runner.name, e)
    except LeaseLost:
        scope.cancel()  # the task's body sees the lease is gone on its next write


async def _overlapping(
    runner: AgentRunner, fires: list[Any], current: Task, scope: anyio.CancelScope
) -> None:
    schedule = runner.triggers.persisted()
    for fire in fires:
        trigger = runner.triggers.triggers[fire.index]
        task = Task(fire.kind, scheduled_at=fire.at, index=fire.index)
        record = queued_write(runner, task)
        action = overlap_action(trigger.overlap, running_index=current.index, fire_index=fire.index)
        if action == "skip":
            skipped = {
                "status": TaskStatus.SKIPPED,
                "result": "previous run still going (overlap: skip)",
            }
            await runner.writer.write(
                Write(
                    tasks=(
                        TaskWrite(
                            task.id, {**record.fields, **skipped}, created_at=record.created_at
                        ),
                    ),
                    schedule=schedule,
                    event=runner.writer.event(
                        "FireSkipped",
                        "overlap: skip",
                        f"{fire.kind} trigger #{fire.index} fired while a task ran",
                    ),
                )
            )
            continue
        await runner.writer.write(Write(tasks=(record,), schedule=schedule))
        task.recorded = True
        if action == "queue":
            runner.queue_last(task)
        else:
            runner.queue_next(task)
            if action == "cancel-previous":
                scope.cancel()
