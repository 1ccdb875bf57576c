"""The runner's side of durable waits: park a waiting task and release the agent; resume it.

When agent code reaches a wait with nothing recorded for it (``ctx.ask``, ``wait_for``,
``sleep_until``), the loop iteration ends with :class:`~agentos.core.waits.WaitRequested`
and :meth:`WaitMixin._park_wait` parks the task: the wait goes into its due shard (with
a provisional due time), the engine slot is given back (KV saved per ``keepKV``), one
fenced write records the task as ``waiting`` and the agent as ``Waiting`` and releases
the lease, the wait is armed at its deadline and the agent leaves the daemon's held set.
The runner then ends: nothing of the agent stays in any daemon.

A daemon that activates the agent (an answer, an event, the deadline, from the due index)
starts a runner as usual; :meth:`WaitMixin._resume_wait` reads the wait and does what
:func:`agentos.core.waits.on_activation` decides: resume the task with the resolution
appended to its recorded answers, park it again (not resolved yet), or drop a stale wait.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from agentos.core.fairness import QuotaExceeded
from agentos.core.lifecycle import PhaseEvent, StopReason
from agentos.core.tasks import Work, short
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
from agentos.runtime.base import RunnerBase
from agentos.store import AgentSnapshot, InboxMessage, StoreError, TaskWrite
from agentos.store.retry import new_op_id

__all__ = ["PARK_GRACE_S", "WaitMixin"]

log = logging.getLogger("agentos.runner")

# A park's wait is due this soon until the park commits: if the daemon dies in between,
# the agent is activated again and the torn park is discarded (the task re-runs).
PARK_GRACE_S = 30.0
_OUTCOME_EVENT = {
    "answered": "Answered",
    "event": "EventReceived",
    "timeout": "WaitTimedOut",
    "rollover": "BudgetRenewed",
    "released": "BudgetRaised",
}


class WaitMixin(RunnerBase):
    """The durable-wait job of the runner."""

    parked = False  # the agent waits durably: this runner released it and ends

    def _begin_waits(self, work: Work) -> None:
        """Before a task's loop: replay what a resumed task recorded, let waits park."""
        assert self.ctx is not None
        ctx = self.ctx
        ctx._waits.clock = self.clock
        ctx._events = self._send_event
        resumed: Resumed | None = work.resume
        if resumed is None:
            ctx._waits.begin()
            return
        ctx._waits.begin(resumed.answers, resumed.calls, tools=resumed.tools)
        if resumed.message_taken:
            ctx._message_taken = True

    async def _send_event(self, agent: str, event: str, data: Any) -> bool:
        try:
            json.dumps(data)
        except (TypeError, ValueError):
            raise ValueError("ctx.send_event: data must be JSON-serialisable") from None
        resolution = Resolution("event", data, f"agent:{self.name}", self.clock())
        event_id = new_op_id()
        answered = await self.writer.call(
            lambda: self.store.wait_event(
                agent, event, resolution, now=self.clock(), event_id=event_id
            ),
            "send event",
        )
        if answered:
            await self.writer.call(lambda: self.store.signal("due", agent), "signal")
        return answered

    async def _park_wait(self, work: Work, request: WaitRequested) -> None:
        """Park the task on its wait and release the agent (see the module docstring)."""
        await self._park_durably(work, request.spec, request.seq)

    async def _park_budget(self, work: Work, error: QuotaExceeded, resume_at: float) -> None:
        """A spent budget parks the task like a wait: until the budget day ends, or a
        policy raises the limit; the agent is released meanwhile."""
        assert self.ctx is not None
        spec = WaitSpec(WaitKind.BUDGET, str(error), None, resume_at)
        await self._park_durably(
            work, spec, self.ctx._waits.consumed, quota_class=self.resource.spec.quota_class
        )

    async def _park_durably(
        self, work: Work, spec: WaitSpec, seq: int, *, quota_class: str = ""
    ) -> None:
        assert self.ctx is not None
        now = self.clock()
        budget = spec.kind is WaitKind.BUDGET
        record = WaitRecord(
            agent=self.name,
            task_id=work.id,
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
        answers = [a.to_json() for a in self.ctx._waits.answers[:seq]]
        calls = list(self.ctx._waits.made)
        taken = self.ctx.message_taken and self._unacked is None  # acked in an earlier step
        await self.writer.call(
            lambda: self.store.wait_park(record, provisional_at=now + PARK_GRACE_S), "park"
        )
        saved = await self._release_slot()
        self._unacked = None  # stays pending: the resumed task is the same task
        self._unacked_key = None
        self._move(PhaseEvent.WAIT)
        self._phase_path.append(self.phase.value)
        what = spec.describe()
        until = f" until {spec.deadline:.0f}" if spec.deadline is not None else ""
        self.dirty = False
        await self.writer.write(
            status={
                **saved,
                **self.task_counters(),
                **self.counters(),
                "phase": self.phase.value,
                "owner": "",  # released: no daemon holds it while it waits
                "updated_at": repr(now),
                "reason": "BudgetExhausted" if budget else "Waiting",
                "message": f"task {work.id} {what}{until}",
                "wait_task": work.id,
                "wait_park_id": record.park_id,
                "waiting_since": repr(now),
            },
            usage=self.usage_delta(),
            task=TaskWrite(
                work.id,
                {
                    "status": "parked" if budget else "waiting",
                    "wait_tool": spec.tool,
                    "wait_kind": spec.kind.value,
                    "wait_question": short(spec.question, 500),
                    "wait_choices": json.dumps(list(spec.choices)) if spec.choices else "",
                    "wait_deadline": repr(spec.deadline) if spec.deadline is not None else "",
                    "waiting_since": repr(now),
                    "answers": json.dumps(answers),
                    "calls": json.dumps(calls),
                    "tools": json.dumps(self.ctx._waits.tools),
                    "message_taken": "1" if taken else "",
                    "spent": repr(self.task_cost),  # the resumed run goes on from it
                    **_message_fields(work),
                },
            ),
            event=self.writer.event(
                "BudgetExhausted" if budget else "Waiting",
                spec.kind.value,
                f"task {work.id} {what}{until} (not a crash)",
            ),
            release=True,
        )
        self._released(f"task {work.id} {what}")
        try:
            answered = await self.writer.call(lambda: self.store.wait_arm(record, now=now), "arm")
            if answered:
                await self.writer.call(lambda: self.store.signal("due", self.name), "signal")
            await self.writer.call(
                lambda: self.store.held_remove(self.daemon_id, [self.name]), "release"
            )
        except StoreError as e:  # the provisional due time activates it anyway
            log.warning(
                "%s: could not arm the wait (%s); due in %.0fs anyway", self.name, e, PARK_GRACE_S
            )

    def _released(self, why: str) -> None:
        """The lease is given up: this runner ends without touching the agent again."""
        self.parked = True
        self.stop_reason = self.stop_reason or StopReason.SHUTDOWN
        log.info("%s: %s; released", self.name, why)

    async def _resume_wait(self, snapshot: AgentSnapshot, *, fresh: bool = False) -> bool:
        """At start: resume, re-park or drop the agent's wait. False when it still waits
        (the lease is released again: the runner must end)."""
        unfinished = {r.get("id", ""): r for r in snapshot.unfinished}
        for work in self._queue:  # resumed before and interrupted: replay the same answers
            record = unfinished.get(work.id)
            if record is not None and work.resume is None:
                work.resume = Resumed.from_record(record)
        # Read with the open (after the lease was taken); again only after a re-arm.
        if fresh:
            wait = await self.writer.call(lambda: self.store.wait_get(self.name), "read wait")
        else:
            wait = WaitRecord.from_fields(snapshot.wait) if snapshot.wait else None
        if wait is None:
            return True
        record = await self.writer.call(lambda: self.store.task(self.name, wait.task_id), "task")
        recorded = json.loads(record.get("answers") or "[]") if record else []
        action = on_activation(
            wait,
            committed=snapshot.status.get("wait_park_id") == wait.park_id,
            consumed=len(recorded) > wait.seq,
            now=self.clock(),
        )
        if isinstance(action, Discard):
            log.info("%s: dropping a wait: %s", self.name, action.why)
            await self.writer.call(lambda: self.store.wait_clear(self.name, wait.park_id), "clear")
            return True
        if isinstance(action, Repark):
            armed = await self.writer.call(
                lambda: self.store.wait_arm(wait, now=self.clock()), "arm"
            )
            if armed:  # answered meanwhile after all
                return await self._resume_wait(snapshot, fresh=True)
            await self.writer.call(
                lambda: self.store.release_lease(self.name, self.lease_value), "release"
            )
            await self.writer.call(
                lambda: self.store.held_remove(self.daemon_id, [self.name]), "release"
            )
            self._released(f"task {wait.task_id} still waits")
            return False
        await self._resume(wait, record, recorded, action.resolution)
        return True

    async def _resume(
        self,
        wait: WaitRecord,
        record: dict[str, str],
        recorded: list[dict[str, Any]],
        resolution: Resolution,
    ) -> None:
        now = self.clock()
        answers = list(recorded[: wait.seq])
        if wait.kind is not WaitKind.BUDGET:  # agent code waited: it gets the resolution
            answers.append(resolution.to_json())
        resumed = Resumed(
            tuple(Resolution.from_json(a) for a in answers),
            tuple(json.loads(record.get("calls") or "[]")),
            record.get("message_taken") == "1",
            json.loads(record.get("tools") or "{}"),
        )
        queued = [w for w in self._queue if w.id == wait.task_id]
        for w in queued:
            self._queue.remove(w)
        work = queued[0] if queued else _work_of(record, wait.task_id)
        work.resume = resumed
        work.spent = _float(record.get("spent"))
        work.recorded = True
        if resolution.outcome == "cancelled":  # `agentos tasks cancel` on a waiting task
            work.cancelled_by = resolution.by or "an operator"
        self._queue.appendleft(work)
        waited_s = max(0.0, now - wait.since)
        shown = resolution.value if resolution.outcome != "timeout" else "(deadline)"
        what = f"task {wait.task_id}: {resolution.outcome} {short(shown, 120)!r}"
        if resolution.by:
            what += f" by {resolution.by}"
        await self.writer.write(
            task=TaskWrite(
                wait.task_id,
                {
                    "status": "queued",
                    "answers": json.dumps(answers),
                    "wait_outcome": resolution.outcome,
                    "answer": json.dumps(resolution.value),
                    "answered_by": resolution.by,
                    "answered_at": repr(resolution.at or now),
                    "waited_s": f"{waited_s:.3f}",
                    # A daemon that takes the agent over ends it too, never replays it.
                    **({"cancel_by": work.cancelled_by} if work.cancelled_by else {}),
                },
            ),
            event=self.writer.event(
                _OUTCOME_EVENT.get(resolution.outcome, "WaitOver"),
                wait.kind.value,
                f"{what} after {waited_s:.1f}s",
            ),
        )
        await self.writer.call(lambda: self.store.wait_clear(self.name, wait.park_id), "clear")
        attrs: dict[str, Any] = {
            "gen_ai.agent.name": self.name,
            "agentos.task.id": wait.task_id,
            "agentos.wait.kind": wait.kind.value,
            "agentos.wait.outcome": resolution.outcome,
            "agentos.wait.waited_s": waited_s,
            "agentos.wait.answered_by": resolution.by,
        }
        if getattr(self.telemetry, "capture_content", False):
            attrs["agentos.wait.question"] = wait.question
        with self.telemetry.span("agentos.wait", **attrs):
            pass


def _message_fields(work: Work) -> dict[str, str]:
    """What a parked task keeps of its message so that it resumes with all of it: the
    message is acknowledged by then, and the record's payload is only a preview."""
    m = work.message
    if m is None:
        return {}
    return {
        "message_body": m.body,
        "message_sent_at": repr(m.sent_at or 0.0),
        "message_traceparent": m.traceparent or "",
    }


def _work_of(record: dict[str, str], task_id: str) -> Work:
    """The work of a waiting task whose message is no longer pending (or that has none)."""
    index = record.get("trigger_index")
    scheduled = record.get("scheduled_at")
    message = None
    if record.get("message_id"):
        # Acknowledged (with its idempotency key) by an earlier iteration: no key here,
        # or the resumed task would be skipped as a duplicate of itself.
        # The whole message, as the park kept it (the payload is a 200-character preview,
        # all that records written before the park kept the whole body have).
        message = InboxMessage(
            record["message_id"],
            record.get("message_body", record.get("payload", "")),
            None,
            float(record.get("message_sent_at") or 0.0),
            record.get("message_traceparent") or None,
        )
    return Work(
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
