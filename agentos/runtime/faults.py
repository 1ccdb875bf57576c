"""When a task does not succeed: restart, fail, retry later or park, as the supervisor decides.

The decision is pure (:func:`agentos.core.supervisor.decide`); this module classifies
the error and performs the decision: a crash (backoff and restart, or ``Failed``, its
message a dead letter) or a park (quota and infrastructure faults: the task is set
aside in the queue until ``not_before``, its slot given back, with an event that says
why; a spent budget waits durably instead, :mod:`.waits`). Only the agent's own
exceptions count toward its crash loop. Two faults come from outside
a task's own outcome: agent code that blocked the event loop (a ``BlockedLoop`` event,
counted toward the crash loop; the task it ran is not run again), and a task whose
every start was cut short (its daemon stopped, died or lost its lease before the task
ended): after ``crashLoopAfter`` such starts it fails instead of starting again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import anyio

from agentos.core.fairness import QuotaExceeded
from agentos.core.lifecycle import Phase, PhaseEvent
from agentos.core.supervisor import Action, Fault, Verdict, decide
from agentos.core.tasks import Task, TaskStatus, short
from agentos.core.waits import Resumed
from agentos.engine.base import EngineUnavailable, ModelMisconfigured, NoFreeSlot
from agentos.runtime import waits
from agentos.runtime.loop import AgentCodeError
from agentos.runtime.releasing import fail
from agentos.runtime.securing import give_back_slot
from agentos.runtime.starting import instantiate, load_class
from agentos.runtime.writer import LeaseLost
from agentos.store import StoreError, TaskWrite, Write
from agentos.tools import ToolServerUnavailable

if TYPE_CHECKING:
    from agentos.runtime.runner import AgentRunner

__all__ = ["INFRA_ERRORS", "abandon", "charge_blocked", "on_fault", "recover"]

log = logging.getLogger("agentos.runner")
# Errors raised under agent code that are the infrastructure's, never the agent's.
INFRA_ERRORS = (NoFreeSlot, EngineUnavailable, StoreError, ToolServerUnavailable)


async def on_fault(
    runner: AgentRunner, failure: AgentCodeError, task: Task, *, infra: bool = False
) -> None:
    """A task did not finish: restart, fail, retry or park, as the supervisor decides.

    ``infra``: the error came from the runtime's own work (securing the session,
    saving state), never the agent's fault whatever its type.
    """
    error = failure.error
    if isinstance(error, LeaseLost):  # raised by the runtime under agent code
        raise error
    retry_after = 0.0
    if infra:
        fault = Fault.INFRA
    elif isinstance(error, QuotaExceeded):
        fault = Fault.BUDGET if error.kind == "budget" else Fault.RATE
        retry_after = error.retry_after_s
    elif isinstance(error, INFRA_ERRORS):
        fault = Fault.INFRA
    else:
        fault = Fault.AGENT
    verdict = decide(
        fault,
        now=runner.clock(),
        policy=runner.policy,
        consecutive_failures=runner.consecutive_failures,
        infra_attempts=task.infra_attempts,
        retry_after_s=retry_after,
    )
    if verdict.crashed:
        await _crashed(runner, failure, task, verdict)
    else:
        await _park(runner, error, fault, task, verdict)


async def _park(
    runner: AgentRunner, error: BaseException, fault: Fault, task: Task, verdict: Verdict
) -> None:
    """Not the agent's fault: the task runs again later, the slot goes back meanwhile."""
    if fault is Fault.BUDGET and isinstance(error, QuotaExceeded) and runner.phase is Phase.RUNNING:
        # It waits durably, the agent released: agentos.runtime.waits.
        await waits.wait_for_budget(runner, task, error, verdict.resume_at)
        return
    runner.state.unacked = None
    runner.state.unacked_key = None
    kind = {
        Fault.RATE: "QuotaExceeded",
        Fault.BUDGET: "BudgetExhausted",
        Fault.INFRA: "InfrastructureError",
    }[fault]
    if isinstance(error, ModelMisconfigured):
        kind = "ModelMisconfigured"  # who must act: whoever owns the Model, not the agent
    until = time.strftime("%H:%M:%S", time.localtime(verdict.resume_at))
    what = f"{type(error).__name__}: {error}" if fault is Fault.INFRA else str(error)
    saved = await give_back_slot(runner)
    part = Write(
        status={
            **saved,
            "reason": kind,
            "message": f"{what}; task {task.id} resumes at {until} or sooner",
        },
        tasks=(
            TaskWrite(
                task.id,
                {
                    "status": TaskStatus.PARKED
                    if verdict.action is Action.PARK
                    else TaskStatus.RETRYING,
                    "error": short(what, 500),
                    "finished_at": repr(runner.clock()),
                    "resume_at": repr(verdict.resume_at),
                },
            ),
        ),
        event=runner.writer.event(
            kind,
            getattr(error, "kind", fault.value),
            f"{what}; task {task.id} parked for {verdict.delay_s:.0f}s (not a crash)",
        ),
    )
    if runner.phase is Phase.RUNNING:  # else it failed in a heartbeat's observe
        await runner.set_phase(PhaseEvent.IDLE, part)
    else:
        await runner.writer.write(part)
    runner.queue_next(
        replace(
            task,
            attempt=task.attempt + 1,
            recorded=True,
            not_before=verdict.resume_at,
            infra_attempts=verdict.infra_attempts,
            parked_for=fault.value,
            resume=_replay_of(runner, task),
            spent=runner.state.task_cost,
        )
    )


def _replay_of(runner: AgentRunner, task: Task) -> Resumed | None:
    """What the retry of ``task`` replays: the tools it already called (never run
    twice) and the model calls before them, when it called any; else as before."""
    before: Resumed | None = task.resume
    ctx = runner.ctx
    if ctx is None or not ctx._waits.tools:
        return before
    log = ctx._waits
    # The iteration runs again from its start: it takes its message again (unless a
    # wait before said an earlier iteration had taken it).
    taken = before is not None and before.message_taken
    return Resumed(tuple(log.answers), tuple(log.made), taken, dict(log.tools))


async def _crashed(
    runner: AgentRunner, error: AgentCodeError, task: Task, verdict: Verdict
) -> None:
    runner.consecutive_failures = verdict.consecutive_failures
    runner.tasks_failed += 1
    runner.restarts += 1
    log.warning("agent %s: %s", runner.name, error)
    failed = verdict.action is Action.FAIL
    if failed and task.message is not None:
        # The message failed crashLoopAfter times in a row: it goes to the dead
        # letters. If the message before it went there too, with no success between,
        # every message fails: the agent is at fault, and the crash loop stops it.
        await _dead_letter(runner, task, verdict.consecutive_failures, str(error))
        runner.dead_letters_in_row += 1
        if runner.dead_letters_in_row < 2:
            await _go_on_after_dead_letter(runner, task, error)
            return
        runner.usage.add(tasks_failed=1)
        runner.dirty = True
        runner.telemetry.tasks.add(
            1, {"agentos.task.status": TaskStatus.FAILED, "gen_ai.agent.name": runner.name}
        )
        await fail(
            runner,
            "CrashLoop",
            f"{error} ({verdict.consecutive_failures} failures in a row; the last two "
            "messages are dead letters)",
            error.tb,
        )
        return
    if failed:
        runner.usage.add(tasks_failed=1)
        runner.dirty = True
    status = TaskStatus.FAILED if failed else TaskStatus.RETRYING
    runner.telemetry.tasks.add(1, {"agentos.task.status": status, "gen_ai.agent.name": runner.name})
    outcome = {
        "status": status,
        "error": short(str(error), 500),
        "finished_at": repr(runner.clock()),
    }
    await runner.writer.write(Write(tasks=(TaskWrite(task.id, outcome),)))
    # The message stays unacknowledged: the next attempt (or, after Failed, the
    # operator's wake) runs it again.
    retry = replace(
        task,
        attempt=task.attempt + 1,
        recorded=True,
        not_before=0.0,
        parked_for="",
        spent=runner.state.task_cost,
    )
    if failed:
        runner.queue_next(retry)
        await fail(
            runner,
            "CrashLoop",
            f"{error} ({verdict.consecutive_failures} failures in a row)",
            error.tb,
        )
        return
    saved = await give_back_slot(runner)
    await runner.set_phase(
        PhaseEvent.CRASH,
        Write(
            status={
                **saved,
                **runner.task_counters(),
                "last_error": str(error),
                "last_traceback": error.tb,
                "last_error_at": repr(runner.clock()),
                "reason": "BackOff",
                "message": f"restarting in {verdict.delay_s:g}s after: {error}",
            },
            event=runner.writer.event(
                "BackOff", error.phase, f"{error}; restart in {verdict.delay_s:g}s"
            ),
        ),
    )
    await runner.until_stopped(lambda: anyio.sleep(verdict.delay_s))
    if runner.stop_reason is not None:
        runner.queue_next(retry)
        return
    if await instantiate(runner):
        runner.move(PhaseEvent.START)
        await runner.writer.write(
            Write(status={"phase": runner.phase.value, "reason": "Restarted", "message": ""})
        )
        runner.queue_next(retry)


async def _dead_letter(runner: AgentRunner, task: Task, attempts: int, error: str) -> None:
    """Move ``task``'s message to the agent's dead letters (acknowledged, kept with its
    error; its task recorded ``dead``). Raises :class:`LeaseLost` if the lease is gone."""
    assert task.message is not None
    message_id = task.message.id
    await runner.writer.flush()  # a deferred close of the previous task goes first
    moved = await runner.writer.call(
        lambda: runner.store.poison.dead_letter(
            runner.name,
            runner.lease_value,
            message_id,
            task_id=task.id,
            attempts=attempts,
            error=short(error, 500),
            now=runner.clock(),
            daemon=runner.daemon_id,
        ),
        "dead letter",
    )
    if moved == "not-held":
        raise LeaseLost(runner.name)
    runner.state.unacked = None
    runner.state.unacked_key = None
    runner.telemetry.tasks.add(
        1, {"agentos.task.status": TaskStatus.DEAD, "gen_ai.agent.name": runner.name}
    )


async def _go_on_after_dead_letter(runner: AgentRunner, task: Task, error: AgentCodeError) -> None:
    """A fresh instance goes on with the next message (the dead one is not retried)."""
    runner.consecutive_failures = 0
    runner.usage.add(tasks_failed=1)
    runner.dirty = True
    saved = await give_back_slot(runner)
    await runner.set_phase(
        PhaseEvent.CRASH,
        Write(
            status={
                **saved,
                **runner.task_counters(),
                "last_error": str(error),
                "last_traceback": error.tb,
                "last_error_at": repr(runner.clock()),
                "reason": "DeadLettered",
                "message": f"task {task.id} failed {runner.policy.crash_loop_after} times in a "
                "row; its message is a dead letter, the agent goes on with the next",
            }
        ),
    )
    if runner.stop_reason is None and await instantiate(runner):
        runner.move(PhaseEvent.START)
        await runner.writer.write(
            Write(status={"phase": runner.phase.value, "reason": "Restarted", "message": ""})
        )


async def charge_blocked(runner: AgentRunner) -> None:
    """Record the event-loop blocks the watchdog charged to this agent, each counted
    as a crash; at ``crashLoopAfter`` in a row the agent is Failed (CrashLoop)."""
    while runner.state.blocked:
        stall = runner.state.blocked.pop(0)
        runner.consecutive_failures += 1
        count, limit = runner.consecutive_failures, runner.policy.crash_loop_after
        message = (
            f"agent code blocked the event loop for {stall.seconds:.1f}s at {stall.where}; "
            f"every agent of daemon {runner.daemon_id} waited meanwhile (crash {count} of "
            f"{limit}): run blocking code with anyio.to_thread.run_sync or anyio.run_process"
        )
        log.warning("agent %s: %s", runner.name, message)
        await runner.writer.write(
            Write(
                status={
                    **runner.task_counters(),
                    "last_error": message,
                    "last_traceback": "",
                    "last_error_at": repr(runner.clock()),
                },
                event=runner.writer.event("BlockedLoop", stall.where, message),
            )
        )
        if count >= limit and not runner.failed:
            await fail(runner, "CrashLoop", f"{message} ({count} failures in a row)", "")


async def abandon(runner: AgentRunner, task: Task, starts: int) -> None:
    """Fail ``task`` instead of starting it again: ``starts`` starts of it were cut
    short. Its message is acknowledged (never redelivered); the agent goes on."""
    message = (
        f"task {task.id} started {starts} time(s) without finishing: each time the daemon "
        "running it stopped, died or lost the agent's lease before the task ended "
        f"(restartPolicy.crashLoopAfter is {runner.policy.crash_loop_after}); not run again"
    )
    log.warning("agent %s: %s", runner.name, message)
    runner.state.interrupted_starts.pop(task.id, None)
    runner.tasks_failed += 1
    runner.usage.add(tasks_failed=1)
    runner.dirty = True
    runner.telemetry.tasks.add(
        1, {"agentos.task.status": TaskStatus.FAILED, "gen_ai.agent.name": runner.name}
    )
    if task.message is not None:  # kept as a dead letter, to look at and re-drive
        await _dead_letter(runner, task, starts, message)
        await runner.writer.write(Write(status=runner.task_counters()))
        return
    await runner.writer.write(
        Write(
            status=runner.task_counters(),
            tasks=(
                TaskWrite(
                    task.id,
                    {
                        "status": TaskStatus.FAILED,
                        "error": message,
                        "finished_at": repr(runner.clock()),
                        "interrupted": starts,
                    },
                ),
            ),
            event=runner.writer.event("TaskFailed", "Interrupted", message),
        )
    )


async def recover(runner: AgentRunner) -> bool:
    """An operator woke a Failed agent: start over with a clean failure count. False
    when its code or state still does not load (Failed again)."""
    runner._apply_recovered()
    runner.consecutive_failures = 0
    if runner.agent_cls is None and not await load_class(runner):
        return False
    if not await instantiate(runner):
        return False
    runner.move(PhaseEvent.START)
    await runner.writer.write(
        Write(
            status={
                "phase": runner.phase.value,
                "reason": "Recovered",
                "message": "",
                "consecutive_failures": 0,
            },
            event=runner.writer.event("Recovered", "wake", "woken by operator after failure"),
        )
    )
    return True
