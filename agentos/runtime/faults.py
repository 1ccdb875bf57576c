"""When a task does not succeed: restart, fail, retry later or park, as the supervisor decides.

The decision is pure (:func:`agentos.core.supervisor.decide`); this module classifies
the error and performs the decision. Only the agent's own exceptions count toward its
crash loop; quota, budget and infrastructure faults park the task (its slot given
back) and run it again later, with an event that says why. Two faults come from outside
a task's own outcome: agent code that blocked the event loop (a ``BlockedLoop`` event,
counted toward the crash loop; the task it ran is not run again), and a task whose
every start was cut short (its daemon stopped, died or lost its lease before the task
ended): after ``crashLoopAfter`` such starts it fails instead of starting again.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import replace

import anyio

from agentos.core.fairness import QuotaExceeded
from agentos.core.lifecycle import Phase, PhaseEvent
from agentos.core.supervisor import Action, Fault, Verdict, decide
from agentos.core.tasks import (
    Work,
    short,
)
from agentos.core.waits import Resumed
from agentos.engine.base import ModelMisconfigured
from agentos.runtime.base import INFRA_ERRORS, RunnerBase
from agentos.runtime.loop import (
    AgentCodeError,
)
from agentos.runtime.writer import LeaseLost
from agentos.store import TaskWrite

__all__ = ["FaultMixin"]

log = logging.getLogger("agentos.runner")


class FaultMixin(RunnerBase):
    """The fault-handling job of the runner."""

    async def _on_fault(self, failure: AgentCodeError, work: Work, *, infra: bool = False) -> None:
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
            now=self.clock(),
            policy=self._policy,
            consecutive_failures=self.consecutive_failures,
            infra_attempts=work.infra_attempts,
            retry_after_s=retry_after,
        )
        if verdict.crashed:
            await self._crashed(failure, work, verdict)
        else:
            await self._park(error, fault, work, verdict)

    async def _park(self, error: BaseException, fault: Fault, work: Work, verdict: Verdict) -> None:
        """Not the agent's fault: the task runs again later, the slot goes back meanwhile."""
        if (
            fault is Fault.BUDGET
            and isinstance(error, QuotaExceeded)
            and self.phase is Phase.RUNNING
        ):
            # Parked durably, the agent released: agentos.runtime.waits.
            await self._park_budget(work, error, verdict.resume_at)
            return
        self._unacked = None
        self._unacked_key = None
        kind = {
            Fault.RATE: "QuotaExceeded",
            Fault.BUDGET: "BudgetExhausted",
            Fault.INFRA: "InfrastructureError",
        }[fault]
        if isinstance(error, ModelMisconfigured):
            kind = "ModelMisconfigured"  # who must act: whoever owns the Model, not the agent
        until = time.strftime("%H:%M:%S", time.localtime(verdict.resume_at))
        what = f"{type(error).__name__}: {error}" if fault is Fault.INFRA else str(error)
        saved = await self._release_slot()
        write = self.writer.write
        if self.phase is Phase.RUNNING:  # else it failed in a heartbeat's observe
            write = functools.partial(self._set_phase, PhaseEvent.IDLE)
        await write(
            status={
                **saved,
                "reason": kind,
                "message": f"{what}; task {work.id} resumes at {until} or sooner",
            },
            task=TaskWrite(
                work.id,
                {
                    "status": "parked" if verdict.action is Action.PARK else "retrying",
                    "error": short(what, 500),
                    "finished_at": repr(self.clock()),
                    "resume_at": repr(verdict.resume_at),
                },
            ),
            event=self.writer.event(
                kind,
                getattr(error, "kind", fault.value),
                f"{what}; task {work.id} parked for {verdict.delay_s:.0f}s (not a crash)",
            ),
        )
        self._queue.appendleft(
            replace(
                work,
                attempt=work.attempt + 1,
                recorded=True,
                not_before=verdict.resume_at,
                infra_attempts=verdict.infra_attempts,
                parked_for=fault.value,
                resume=self._replay_of(work),
                spent=self.task_cost,
            )
        )

    def _replay_of(self, work: Work) -> Resumed | None:
        """What the retry of ``work`` replays: the tools it already called (never run
        twice) and the model calls before them, when it called any; else as before."""
        before: Resumed | None = work.resume
        ctx = self.ctx
        if ctx is None or not ctx._waits.tools:
            return before
        log = ctx._waits
        # The iteration runs again from its start: it takes its message again (unless a
        # wait before said an earlier iteration had taken it).
        taken = before is not None and before.message_taken
        return Resumed(tuple(log.answers), tuple(log.made), taken, dict(log.tools))

    async def _crashed(self, error: AgentCodeError, work: Work, verdict: Verdict) -> None:
        self.consecutive_failures = verdict.consecutive_failures
        self.tasks_failed += 1
        self.restarts += 1
        log.warning("agent %s: %s", self.name, error)
        failed = verdict.action is Action.FAIL
        if failed and work.message is not None:
            # The message failed crashLoopAfter times in a row: it goes to the dead
            # letters. If the message before it went there too, with no success between,
            # every message fails: the agent is at fault, and the crash loop stops it.
            await self._dead_letter(work, verdict.consecutive_failures, str(error))
            self.dead_letters_in_row += 1
            if self.dead_letters_in_row < 2:
                await self._go_on_after_dead_letter(work, error)
                return
            self.usage.add(tasks_failed=1)
            self.dirty = True
            self.telemetry.tasks.add(
                1, {"agentos.task.status": "failed", "gen_ai.agent.name": self.name}
            )
            await self._fail(
                "CrashLoop",
                f"{error} ({verdict.consecutive_failures} failures in a row; the last two "
                "messages are dead letters)",
                error.tb,
            )
            return
        if failed:
            self.usage.add(tasks_failed=1)
            self.dirty = True
        status = "failed" if failed else "retrying"
        self.telemetry.tasks.add(1, {"agentos.task.status": status, "gen_ai.agent.name": self.name})
        outcome = {
            "status": status,
            "error": short(str(error), 500),
            "finished_at": repr(self.clock()),
        }
        await self.writer.write(task=TaskWrite(work.id, outcome))
        # The message stays unacknowledged: the next attempt (or, after Failed, the
        # operator's wake) runs it again.
        retry = replace(
            work,
            attempt=work.attempt + 1,
            recorded=True,
            not_before=0.0,
            parked_for="",
            spent=self.task_cost,
        )
        if failed:
            self._queue.appendleft(retry)
            await self._fail(
                "CrashLoop", f"{error} ({verdict.consecutive_failures} failures in a row)", error.tb
            )
            return
        saved = await self._release_slot()
        await self._set_phase(
            PhaseEvent.CRASH,
            status={
                **saved,
                **self.task_counters(),
                "last_error": str(error),
                "last_traceback": error.tb,
                "last_error_at": repr(self.clock()),
                "reason": "BackOff",
                "message": f"restarting in {verdict.delay_s:g}s after: {error}",
            },
            event=self.writer.event(
                "BackOff", error.phase, f"{error}; restart in {verdict.delay_s:g}s"
            ),
        )
        await self._until_stopped(lambda: anyio.sleep(verdict.delay_s))
        if self.stop_reason is not None:
            self._queue.appendleft(retry)
            return
        if await self._instantiate():
            self._move(PhaseEvent.START)
            await self.writer.write(
                status={"phase": self.phase.value, "reason": "Restarted", "message": ""}
            )
            self._queue.appendleft(retry)

    async def _dead_letter(self, work: Work, attempts: int, error: str) -> None:
        """Move ``work``'s message to the agent's dead letters (acknowledged, kept with its
        error; its task recorded ``dead``). Raises :class:`LeaseLost` if the lease is gone."""
        assert work.message is not None
        message_id = work.message.id
        await self.writer.flush()  # a held-back close of the previous task goes first
        moved = await self.writer.call(
            lambda: self.store.dead_letter(
                self.name,
                self.lease_value,
                message_id,
                task_id=work.id,
                attempts=attempts,
                error=short(error, 500),
                now=self.clock(),
                daemon=self.daemon_id,
            ),
            "dead letter",
        )
        if moved == "not-held":
            raise LeaseLost(self.name)
        self._unacked = None
        self._unacked_key = None
        self.telemetry.tasks.add(1, {"agentos.task.status": "dead", "gen_ai.agent.name": self.name})

    async def _go_on_after_dead_letter(self, work: Work, error: AgentCodeError) -> None:
        """A fresh instance goes on with the next message (the dead one is not retried)."""
        self.consecutive_failures = 0
        self.usage.add(tasks_failed=1)
        self.dirty = True
        saved = await self._release_slot()
        await self._set_phase(
            PhaseEvent.CRASH,
            status={
                **saved,
                **self.task_counters(),
                "last_error": str(error),
                "last_traceback": error.tb,
                "last_error_at": repr(self.clock()),
                "reason": "DeadLettered",
                "message": f"task {work.id} failed {self._policy.crash_loop_after} times in a "
                "row; its message is a dead letter, the agent goes on with the next",
            },
        )
        if self.stop_reason is None and await self._instantiate():
            self._move(PhaseEvent.START)
            await self.writer.write(
                status={"phase": self.phase.value, "reason": "Restarted", "message": ""}
            )

    async def _charge_blocked(self) -> None:
        """Record the event-loop blocks the watchdog charged to this agent, each counted
        as a crash; at ``crashLoopAfter`` in a row the agent is Failed (CrashLoop)."""
        while self._blocked:
            stall = self._blocked.pop(0)
            self.consecutive_failures += 1
            count, limit = self.consecutive_failures, self._policy.crash_loop_after
            message = (
                f"agent code blocked the event loop for {stall.seconds:.1f}s at {stall.where}; "
                f"every agent of daemon {self.daemon_id} waited meanwhile (crash {count} of "
                f"{limit}): run blocking code with anyio.to_thread.run_sync or anyio.run_process"
            )
            log.warning("agent %s: %s", self.name, message)
            await self.writer.write(
                status={
                    **self.task_counters(),
                    "last_error": message,
                    "last_traceback": "",
                    "last_error_at": repr(self.clock()),
                },
                event=self.writer.event("BlockedLoop", stall.where, message),
            )
            if count >= limit and not self.failed:
                await self._fail("CrashLoop", f"{message} ({count} failures in a row)", "")

    async def _abandon(self, work: Work, starts: int) -> None:
        """Fail ``work`` instead of starting it again: ``starts`` starts of it were cut
        short. Its message is acknowledged (never redelivered); the agent goes on."""
        message = (
            f"task {work.id} started {starts} time(s) without finishing: each time the daemon "
            "running it stopped, died or lost the agent's lease before the task ended "
            f"(restartPolicy.crashLoopAfter is {self._policy.crash_loop_after}); not run again"
        )
        log.warning("agent %s: %s", self.name, message)
        self._interrupted_starts.pop(work.id, None)
        self.tasks_failed += 1
        self.usage.add(tasks_failed=1)
        self.dirty = True
        self.telemetry.tasks.add(
            1, {"agentos.task.status": "failed", "gen_ai.agent.name": self.name}
        )
        if work.message is not None:  # kept as a dead letter, to look at and re-drive
            await self._dead_letter(work, starts, message)
            await self.writer.write(status=self.task_counters())
            return
        await self.writer.write(
            status=self.task_counters(),
            task=TaskWrite(
                work.id,
                {
                    "status": "failed",
                    "error": message,
                    "finished_at": repr(self.clock()),
                    "interrupted": starts,
                },
            ),
            event=self.writer.event("TaskFailed", "Interrupted", message),
        )

    async def _fail(self, reason: str, message: str, tb: str) -> None:
        self.failed = True
        saved = await self._release_slot() if self.agent is not None else {}
        self._move(PhaseEvent.FAIL)
        await self.writer.write(
            status={
                **saved,
                **self.task_counters(),
                "phase": self.phase.value,
                "owner": self.daemon_id,
                "reason": reason,
                "message": message,
                "last_error": message,
                "last_traceback": tb,
                "last_error_at": repr(self.clock()),
            },
            event=self.writer.event("Failed", reason, message),
        )

    async def _recover(self) -> None:
        """An operator woke a Failed agent: start over with a clean failure count."""
        self.failed = False
        self.consecutive_failures = 0
        if self._agent_cls is None and not await self._load_class():
            return
        if not await self._instantiate():
            return
        self._move(PhaseEvent.START)
        await self.writer.write(
            status={
                "phase": self.phase.value,
                "reason": "Recovered",
                "message": "",
                "consecutive_failures": 0,
            },
            event=self.writer.event("Recovered", "wake", "woken by operator after failure"),
        )
        if not self._queue:
            self._queue.append(Work("wake"))
