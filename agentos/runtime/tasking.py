"""Running one task of an agent: secure the session, record it, run the loop, judge it, close it.

A task secures the agent's engine session (a slot, its context restored) before any
agent code runs, records itself as running, runs observe/plan/act/learn until observe
says there is nothing left, acknowledges its message with the first state it
produced, and closes with its outcome in one fenced write. While it runs, time
triggers that fire follow their ``overlap`` policy.

Before the close, the task is judged: did it do its job? The Agent's evaluator
(``spec.evaluate``, :mod:`agentos.runtime.evaluate`) has the last word on a task that
ended normally, else the agent's own ``ctx.succeed`` / ``ctx.fail``, else nobody
(``unknown``). A task that ended failed (past a limit; raised until its retries ran
out, :mod:`.faults`) is ``fail`` and a cancelled one ``unknown``, by the runtime; neither
is shown to the evaluator. The close records the verdict (``outcome``), what the task
cost (``cost``, its calls priced with each Model's prices) and the models that served
it (``models``, the last one credited in ``usage --by model``), counts the verdict in
the day's usage (``counted_on`` names the day, for ``agentos eval`` to move it) and
adds a ``gen_ai.evaluation.result`` event to the task's span.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Any, TypeVar

import anyio

from agentos.core.lifecycle import Phase, PhaseEvent
from agentos.core.limits import TaskLimitExceeded
from agentos.core.outcomes import Outcome
from agentos.core.results import render_result
from agentos.core.tasks import Work, overlap_action, queued_record
from agentos.core.waits import WaitRequested
from agentos.engine.base import EngineError, EngineUnavailable, RouteExhausted
from agentos.runtime.agentlog import current_task
from agentos.runtime.base import RunnerBase
from agentos.runtime.endings import end_cancelled, end_exhausted, end_if_cancelled, end_limited
from agentos.runtime.hibernator import Restored
from agentos.runtime.loop import AgentCodeError, TaskResult, no_span, run_task
from agentos.runtime.toolcalls import attach_server_tools
from agentos.runtime.verdicts import count_outcome, judge_task
from agentos.runtime.watchdog import marked
from agentos.runtime.writer import LeaseLost
from agentos.sdk import Message, TaskInfo
from agentos.store import Duplicate, StoreError, TaskWrite, Write
from agentos.telemetry import Telemetry
from agentos.tools import ToolServerUnavailable

__all__ = ["TaskMixin"]

log = logging.getLogger("agentos.runner")
_T = TypeVar("_T")


class _NoSpan:
    def set_attribute(self, key: str, value: object) -> None:
        pass


_NO_SPAN = _NoSpan()


class OnDemandSession:
    """The model handle's way to a session when agent code calls the model with none
    open (a heartbeat's ``observe`` of a hibernated agent): wake it as a task would."""

    def __init__(self, runner: TaskMixin) -> None:
        self._runner = runner

    async def ensure(self) -> None:
        try:
            secured = await self._runner._secure("llm")
        except (StoreError, EngineError) as e:
            raise EngineUnavailable(f"could not wake the agent for a model call: {e}") from e
        if not secured:
            raise EngineUnavailable("the agent is stopping; no engine session for this call")

    async def away(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``fn`` (tool calls, no model call) while the slot may be lent."""
        return await self._runner.away(fn)


class TaskMixin(RunnerBase):
    """The task job of the runner."""

    async def away(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Run ``fn`` (agent code that makes no model call: its tools) and, once it has
        run for ``lend_after_s``, let the slot arbiter take our engine slot for an agent
        waiting for one. The KV is saved as on hibernation, so the next model call
        restores it (it takes a slot again, in the fair order) instead of re-prefilling.
        Nothing is lent while nobody waits, and a lend in progress completes before this
        returns, so the session is never half-saved.
        """
        if not self.session.open or self.lend_after_s <= 0:
            return await fn()
        saving = False

        async def lend() -> None:
            nonlocal saving
            await anyio.sleep(self.lend_after_s)
            self._lend_asked = anyio.Event()
            self.lendable = True
            self.arbiter.holder_idle()  # a waiter may pick us now
            await self._lend_asked.wait()
            saving = True
            with anyio.CancelScope(shield=True):
                self.lendable = False
                status = await self._release_slot()
                self.lent += 1
                with contextlib.suppress(LeaseLost, StoreError):
                    await self.writer.write(
                        status={**status, "reason": "SlotLent", "message": "slot lent during tools"}
                    )

        async with anyio.create_task_group() as tg:
            tg.start_soon(lend)
            try:
                result = await fn()
            finally:
                self.lendable = False
                if not saving:
                    tg.cancel_scope.cancel()
        return result

    async def _run_work(self, work: Work) -> None:
        # Busy from the first observe on: a holder that is looking for work is not idle.
        self.busy = True
        self._blocked_in_task = self.mark.blocked = False
        task = current_task.set(work.id)  # its log lines name the task
        try:
            await self._run_work_body(work)
            if self._blocked:  # the task blocked the event loop: a crash, recorded now
                await self._charge_blocked()
        finally:
            current_task.reset(task)
            self.busy = False
            self.task_over.set()  # for whoever waits for the end of a task (a restart)
            self.task_over = anyio.Event()
            self.arbiter.holder_idle()

    async def _run_work_body(self, work: Work) -> None:
        if await end_if_cancelled(self, work):
            return
        self.usage.begin_task()
        assert self.agent is not None
        assert self.ctx is not None
        message = None
        if work.message is not None:
            m = work.message
            message = Message(m.id, m.body, m.key, m.sent_at, m.traceparent)
            # An awake agent checks the key inside its task-start write (no round trip
            # of its own); one that would have to wake checks first, so a duplicate
            # costs no wake. The script checks before it applies a held-back close,
            # so a keyed message never starts with one held (its key may be in it).
            if m.key:
                await self.writer.flush()
            if m.key and self._must_wake:
                key = m.key
                done = await self.writer.call(
                    lambda: self.store.idempotency_done(self.name, key), "idempotency"
                )
                if done:
                    await self.writer.write(ack_id=m.id, task=self._duplicate(work).task)
                    return
        starts = self._interrupted_starts.get(work.id, 0)
        if starts >= self._policy.crash_loop_after:
            # Every start so far was cut short (the daemon lost control each time): a
            # task that takes its daemon down with it must not run again without end.
            await self._abandon(work, starts)
            return
        task = TaskInfo(
            id=work.id,
            trigger=work.trigger,
            attempt=work.attempt,
            message=message,
            started_at=self.clock(),
        )
        self.ctx.begin(task)
        first_observation: Any = None
        if work.trigger in ("heartbeat", "start") and work.resume is None:
            await self.writer.flush()  # agent code next: the last task's close goes first
            # A heartbeat (or a start) only asks; an agent with nothing to do stays as it
            # is, asleep or idle, and costs nothing: no task, no record, no slot.
            try:
                first_observation = await marked(self.mark, self.agent.observe(self.ctx))
            except Exception as e:
                await self._on_fault(AgentCodeError("observe", e), work)
                return
            if first_observation is None:
                return
        self._phase_path = [self.phase.value]
        # The session before any agent code that may call the model.
        try:
            # An agent that uses the model gets its slot now, not inside its first call;
            # one that never did (a pure tool or router agent) takes no slot for nothing.
            secured = await self._secure(work.trigger, slot=self._uses_model)
        except (StoreError, EngineError) as e:
            await self._on_fault(AgentCodeError("wake", e), work, infra=True)
            return
        if not secured:
            self._queue.appendleft(work)  # stopping: the task stays queued for the next owner
            return
        traceparent = work.message.traceparent if work.message is not None else None
        with self.telemetry.task(
            agent=self.name,
            agent_id=self.resource.metadata.name,
            task_id=work.id,
            trigger=work.trigger,
            attempt=work.attempt,
            daemon_id=self.daemon_id,
            provider=self.engine.name,
            traceparent=traceparent,
        ) as span:
            try:
                await self._run_traced(work, first_observation, span)
            finally:
                span.set_attribute("agentos.phase_path", " > ".join(self._phase_path))

    async def _run_traced(self, work: Work, first_observation: Any, span: Any) -> None:
        assert self.agent is not None
        assert self.ctx is not None
        self._task_tokens = (self.tokens_in, self.tokens_out)
        self.task_cost = work.spent  # a retried or resumed task's budget is not fresh
        started = self.clock()
        if work.queued_at is not None:
            self.telemetry.queue_wait.record(
                started - work.queued_at, {"gen_ai.agent.name": self.name}
            )
        record: dict[str, object] = {
            "status": "running",
            "started_at": repr(started),
            "attempt": work.attempt,
        }
        if work.id in self._interrupted_starts:  # kept with the record: counted on
            record["interrupted"] = self._interrupted_starts[work.id]
        if not work.recorded:
            record = {**queued_record(work, self.name, started), **record}
        fresh = await self._set_phase(
            PhaseEvent.TASK,
            status={"task": work.id, "trigger": work.trigger},
            task=TaskWrite(work.id, record, created_at=None if work.recorded else started),
            duplicate=self._duplicate(work) if work.message and work.message.key else None,
        )
        work.recorded = True
        if not fresh:  # its key completed before: acknowledged and recorded as skipped
            self._move(PhaseEvent.IDLE)
            span.set_attribute("agentos.task.status", "skipped")
            return
        self._unacked = work.message.id if work.message is not None else None
        self._unacked_key = work.message.key if work.message is not None else None
        if not await self._attach_tools(work):
            return
        if work.id in self._cancels:  # cancelled while it started
            work.cancelled_by, work.cancel_recorded = self._cancels.pop(work.id)
        if work.cancelled_by is not None:  # ... or while it waited for an answer
            await end_cancelled(self, work, work.cancelled_by, span)
            return
        scope = anyio.CancelScope()
        result: TaskResult | None = None
        failure: AgentCodeError | None = None
        lost: LeaseLost | None = None
        infra: StoreError | None = None  # the runtime's own write after a step failed
        waited: WaitRequested | None = None  # a durable wait ended the iteration
        limited: str | None = None  # the task passed one of spec.limits
        limits = self.resource.spec.limits
        timeout = limits.task_timeout if limits is not None else None
        clock = anyio.CancelScope(
            deadline=anyio.current_time() + timeout if timeout is not None else math.inf
        )
        agent, ctx = self.agent, self.ctx
        self._begin_waits(work)

        async def body() -> None:
            # Errors are kept, not raised: inside a task group they would arrive as an
            # ExceptionGroup, and a handler for LeaseLost would silently never run.
            nonlocal result, failure, lost, infra, waited, limited
            with scope, clock:
                try:
                    # Marked for the watchdog: a block of the loop is charged to us.
                    result = await marked(
                        self.mark,
                        run_task(
                            agent,
                            ctx,
                            after_step=self._after_step,
                            first_observation=first_observation,
                            max_steps=limits.max_steps if limits is not None else None,
                            # Disabled telemetry must cost nothing per loop step.
                            phase_span=self.telemetry.span if self.telemetry.enabled else no_span,
                            before_step=self.writer.flush,
                        ),
                    )
                except TaskLimitExceeded as e:
                    limited = e.reason
                except AgentCodeError as e:
                    failure = e
                except LeaseLost as e:
                    lost = e
                except StoreError as e:
                    infra = e
                except WaitRequested as e:
                    waited = e

        def timed_out() -> None:
            nonlocal limited
            if clock.cancelled_caught and limits is not None and limited is None:
                limited = limits.timeout_reason()

        self._running = (work, scope)
        try:
            if any(t.kind in ("schedule", "every", "at") for t in self.resource.spec.triggers):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_overlaps, work, scope)
                    await body()
                    tg.cancel_scope.cancel()
            else:  # no time trigger can fire during the task: nothing to watch
                await body()
        except anyio.get_cancelled_exc_class():
            self._interrupted = True
            raise
        finally:
            self._running = None
        if lost is not None:
            raise lost
        # Cut short by `tasks cancel` (whatever the agent's code made of the cancellation).
        if work.cancelled_by is not None and scope.cancel_called:
            await end_cancelled(self, work, work.cancelled_by, span)
            return
        timed_out()
        if result is not None and result.limited and limits is not None:
            limited = limits.steps_reason()
        if limited is not None:
            await end_limited(self, work, limited, span)
            return
        if failure is not None and isinstance(failure.error, RouteExhausted):
            await end_exhausted(self, work, str(failure.error), span)
            return
        if waited is not None:
            span.set_attribute("agentos.task.waiting", waited.spec.kind.value)
            await self._park_wait(work, waited)
            return
        if infra is not None:
            await self._on_fault(AgentCodeError("save", infra), work, infra=True)
            return
        if failure is not None:
            Telemetry.fail(span, failure.error)
            span.set_attribute("agentos.task.phase", failure.phase)
            await self._on_fault(failure, work)
            return
        if result is None:  # cancelled by a newer fire of the same trigger
            reason = "cancelled by a newer fire (overlap)"
            await self._finish_task(
                work,
                "cancelled",
                reason,
                outcome=Outcome("unknown", reason=reason, source="runtime"),
                span=span,
            )
            return
        if result.stopped and result.steps == 0:
            # Stopped before doing anything: the task stays queued for the next owner.
            self._unacked = None
            self._queue.appendleft(work)
            await self._set_phase(PhaseEvent.IDLE, task=TaskWrite(work.id, {"status": "queued"}))
            return
        self._interrupted_starts.pop(work.id, None)
        if not (self._blocked_in_task or self.mark.blocked):  # blocking the loop: a crash
            self.consecutive_failures = 0
        if result.steps:
            # A wake-up whose first observe found nothing to do is not a task.
            self.tasks_succeeded += 1
            self.dead_letters_in_row = 0
            self.usage.add(tasks_succeeded=1)
            self.dirty = True
        span.set_attribute("agentos.task.steps", result.steps)
        self.last_activity = self.clock()
        if ctx.has_result:
            summary = render_result(ctx.result)
        else:
            summary = render_result(result.outcome) if result.steps else "nothing to do"
        # A wake-up that did nothing is not a task: nothing to judge, nothing counted.
        outcome = await judge_task(self, work, summary, ctx.outcome) if result.steps else None
        await self._finish_task(
            work, "succeeded", summary, steps=result.steps, outcome=outcome, span=span
        )

    async def _attach_tools(self, work: Work) -> bool:
        """The agent's ToolServers' tools join ``ctx.tools``; False (the task retried, an
        event naming the server) when one cannot be reached."""
        tools = self.resource.spec.tools
        if tools is None or not tools.servers or self.tool_servers is None:
            return True
        assert self.ctx is not None
        try:
            await attach_server_tools(self.ctx.tools, self.tool_servers, tools.servers)
        except (ToolServerUnavailable, ValueError) as e:
            error = e if isinstance(e, ToolServerUnavailable) else ToolServerUnavailable(str(e))
            await self._on_fault(AgentCodeError("tools", error), work, infra=True)
            return False
        return True

    @property
    def _must_wake(self) -> bool:
        """Whether a task would have to wake the agent (restore or take a slot) first."""
        return self.phase is Phase.HIBERNATED or (self._uses_model and not self.session.open)

    def _duplicate(self, work: Work) -> Duplicate:
        """What the start of ``work`` does instead if its message's key completed."""
        m = work.message
        assert m is not None
        assert m.key
        return Duplicate(
            m.key,
            m.id,
            TaskWrite(
                work.id,
                {
                    **(queued_record(work, self.name, self.clock()) if not work.recorded else {}),
                    "status": "skipped",
                    "finished_at": repr(self.clock()),
                    "result": f"duplicate: idempotency key {m.key!r} already completed",
                },
                created_at=None if work.recorded else self.clock(),
            ),
        )

    async def _secure(self, trigger: str, *, slot: bool = True) -> bool:
        """Wake the agent and hold its engine session, context restored, before agent
        code runs. Without ``slot`` (an agent that has never used the model) only the
        phase wakes: its first model call takes the slot, before its admission.

        Waits for a slot as long as it takes (in the fair order), but not past a stop
        request: returns False then.
        """
        if self.session.open:
            return True
        hibernated = self.phase is Phase.HIBERNATED
        if not slot and not hibernated:
            return True
        if hibernated:
            await self._set_phase(
                PhaseEvent.WAKE, status={"reason": "Waking", "message": f"woken by {trigger}"}
            )
        if not slot:
            await self._woke(trigger, None, 0.0, hibernated, _NO_SPAN)
            return True
        if self.session.would_wait:
            await self.writer.write(
                status={
                    "reason": "WaitingForSlot",
                    "message": f"waiting for one of {self.engine.slots} engine slot(s)",
                }
            )
        await self.writer.flush()  # a slot may take a while: the last task's close goes first
        waited = time.perf_counter()
        self._slow_slot = False
        waking = hibernated or self.session.has_snapshot
        # A span only for a real wake: one started and never ended would leak.
        traced = (
            self.telemetry.span("agentos.wake", **{"gen_ai.agent.name": self.name})
            if waking
            else nullcontext(_NO_SPAN)
        )
        with traced as span:
            ok, restored = await self._until_stopped(self.session.ensure)
            if not ok:
                return False
            took_s = time.perf_counter() - waited
            if self._slow_slot:
                await self.writer.write(
                    event=self.writer.event(
                        "SlotWait", "slots", f"waited {took_s:.1f}s for an engine slot"
                    )
                )
            if restored is None and not hibernated:
                return True
            await self._woke(trigger, restored, took_s, hibernated, span)
        return True

    async def _woke(
        self, trigger: str, restored: Restored | None, took_s: float, hibernated: bool, span: Any
    ) -> None:
        path = restored.path if restored is not None else "empty"
        why = restored.why if restored is not None else "no snapshot; context starts empty"
        span.set_attribute("agentos.wake.path", path)
        span.set_attribute("agentos.wake.reason", why)
        span.set_attribute("agentos.kv.bytes", restored.nbytes if restored is not None else 0)
        attrs = {"gen_ai.agent.name": self.name, "agentos.wake.path": path}
        self.telemetry.wakes.add(1, attrs)
        self.telemetry.wake_latency.record(took_s, attrs)
        if path == "restore" and self.ctx is not None:
            self.ctx.llm.kv_restored = True
        status: dict[str, object] = {
            "reason": "Woke",
            "message": why,
            "wake_path": path,
            "wake_ms": f"{took_s * 1000:.1f}",
            "woke_at": repr(self.clock()),
        }
        event = self.writer.event(
            "Woke", path, f"{why} in {took_s * 1000:.1f} ms (trigger {trigger})"
        )
        if hibernated:
            await self._set_phase(PhaseEvent.WOKE, status=status, event=event)
        else:
            await self.writer.write(status=status, event=event)

    async def _finish_task(
        self,
        work: Work,
        status: str,
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
        self.telemetry.tasks.add(1, {"agentos.task.status": status, "gen_ai.agent.name": self.name})
        state = self._encode_state()
        tokens_in = self.tokens_in - self._task_tokens[0]
        tokens_out = self.tokens_out - self._task_tokens[1]
        now = self.clock()
        fields: dict[str, object] = {
            "status": status,
            "finished_at": repr(now),
            "steps": steps,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "result": result,
            "error": error,
            "cost": repr(round(self.task_cost, 9)),
        }
        served = self.usage.served
        if served:
            fields["models"] = ",".join(served)
        if outcome is not None:
            fields |= count_outcome(self, status, outcome, now, span)
        close = TaskWrite(
            work.id, fields, idempotency_key=self._unacked_key if self._unacked else None
        )
        await self._set_phase(
            PhaseEvent.IDLE,
            status=self.task_counters(),
            state=state,
            ack_id=self._unacked,
            task=close,
            # The next task starts at once: this close rides with its start write.
            hold=self._next_due(pop=False) is not None and self.stop_reason is None,
        )
        self._unacked = None
        self._unacked_key = None
        if state is not None:
            self._saved_state = state

    async def _watch_overlaps(self, current: Work, scope: anyio.CancelScope) -> None:
        """While a task runs, apply each time trigger's overlap policy to its fires."""
        try:
            while True:
                next_at = self._triggers.next_at
                await anyio.sleep(60.0 if next_at is None else max(0.0, next_at - self.clock()))
                fires = [f for f in self._triggers.due_fires(self.clock()) if f.kind != "heartbeat"]
                if fires:
                    try:
                        await self._overlapping(fires, current, scope)
                    except StoreError as e:
                        log.warning("%s: could not record a fire during a task: %s", self.name, e)
        except LeaseLost:
            scope.cancel()  # the task's body sees the lease is gone on its next write

    async def _overlapping(self, fires: list[Any], current: Work, scope: anyio.CancelScope) -> None:
        schedule = self._triggers.persisted()
        for fire in fires:
            trigger = self._triggers.triggers[fire.index]
            work = Work(fire.kind, scheduled_at=fire.at, index=fire.index)
            record = self._queued_write(work)
            action = overlap_action(
                trigger.overlap, running_index=current.index, fire_index=fire.index
            )
            if action == "skip":
                skipped = {
                    "status": "skipped",
                    "result": "previous run still going (overlap: skip)",
                }
                await self.writer.write(
                    task=TaskWrite(
                        work.id, {**record.fields, **skipped}, created_at=record.created_at
                    ),
                    schedule=schedule,
                    event=self.writer.event(
                        "FireSkipped",
                        "overlap: skip",
                        f"{fire.kind} trigger #{fire.index} fired while a task ran",
                    ),
                )
                continue
            await self.writer.write(task=record, schedule=schedule)
            work.recorded = True
            if action == "queue":
                self._queue.append(work)
            else:
                self._queue.appendleft(work)
                if action == "cancel-previous":
                    scope.cancel()

    async def _after_step(self, step: int, outcome: Any) -> None:
        self.steps += 1
        self.last_activity = self.clock()
        self.dirty = True
        state = self._encode_state()
        # The message that started the task is acknowledged in the same atomic write
        # as the first state it produced: a crash can never keep one without the other.
        ack = self._unacked if self.ctx is not None and self.ctx.message_taken else None
        # A completed iteration's tool ledger is not replayed by the next one.
        cleared = self.ledger.cleared() if self.ledger is not None else None
        if state is not None or ack is not None or cleared is not None:
            task = None
            if (ack is not None or cleared is not None) and self.ctx is not None:
                # Completing the key with the ack: a redelivered duplicate is skipped.
                fields = {**(cleared or {}), **({"acked_at": repr(self.clock())} if ack else {})}
                task = TaskWrite(
                    self.ctx.task.id,
                    fields,
                    idempotency_key=self._unacked_key if ack is not None else None,
                )
            # Held back until the next step's plan or the task's close, whichever comes
            # first (one write fewer for a one-step task); atomic either way.
            self.writer.defer(
                Write(state=state, ack_id=ack, tasks=(task,) if task is not None else ())
            )
            if ack is not None:
                self._unacked = None
            if state is not None:
                self._saved_state = state
