"""The client's side of durable waits: who waits for what, answers, and events.

`agentos pending`, `agentos answer`, `agentos event` and the HTTP endpoints are built on
these methods of :class:`agentos.client.Client`. An answer is validated against the
question it answers (:func:`agentos.core.waits.validate_answer`) and recorded exactly
once by one script in the agent's due shard, with who gave it and when; the agent is
then due, and any daemon with room activates it.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from agentos.core.errors import ClientError, NotFound
from agentos.core.taskview import DONE
from agentos.core.waits import AnswerError, Resolution, WaitRecord, validate_answer
from agentos.store.retry import new_op_id, retry

if TYPE_CHECKING:
    from agentos.store import Store

__all__ = ["MAX_REASON_CHARS", "AnswerRejected", "TaskOver", "WaitClientMixin"]

MAX_REASON_CHARS = 2000
"""The longest reason an answer may give (it reaches the model as part of a refusal)."""


class AnswerRejected(Exception):
    """An answer or event that cannot be recorded; nothing changed.

    ``code`` says why: ``invalid`` (does not fit the question), ``not_waiting`` (the
    task does not wait, or no more), ``answered`` (someone answered first).
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class TaskOver(ClientError):
    """A task that cannot be cancelled: it has ended (``status`` says how)."""

    def __init__(self, name: str, task_id: str, status: str) -> None:
        self.status = status
        super().__init__(f"task {task_id} of {name} is over already ({status})")


class WaitClientMixin:
    """Wait methods of :class:`agentos.client.Client` (mixed in; uses its store)."""

    store: Store

    async def _require(self, name: str) -> dict[str, Any]:
        raise NotImplementedError  # agentos.client.Client

    async def pending(self, name: str | None = None) -> list[WaitRecord]:
        """Parked waits (of one agent, or of the fleet), oldest first."""
        if name is not None:
            await self._require(name)
        waits = await self.store.pending_waits([name] if name is not None else None)
        return sorted(waits, key=lambda w: (w.since, w.agent))

    async def answer(
        self,
        name: str,
        task_id: str,
        *,
        yes: bool = False,
        no: bool = False,
        choice: str | None = None,
        text: str | None = None,
        by: str,
        now: float | None = None,
        reason: str = "",
    ) -> Resolution:
        """Answer the question task ``task_id`` of agent ``name`` waits on; returns what was
        recorded. Raises :class:`AnswerRejected` (nothing changed) when the answer does
        not fit, the task does not wait, or it was answered already, and
        :class:`agentos.client.NotFound` for an unknown agent. ``reason`` (why; for a
        refused tool call it reaches the model) is kept with the answer.
        """
        if len(reason) > MAX_REASON_CHARS:
            raise AnswerRejected("invalid", f"a reason has at most {MAX_REASON_CHARS} characters")
        await self._require(name)
        wait = await self.store.wait_get(name)
        try:
            value = validate_answer(wait, task_id, yes=yes, no=no, choice=choice, text=text)
        except AnswerError as e:
            code = "invalid"
            if wait is None or wait.task_id != task_id:
                code = "not_waiting"
            elif wait.answer is not None:
                code = "answered"
            raise AnswerRejected(code, str(e)) from None
        assert wait is not None
        at = time.time() if now is None else now
        resolution = Resolution("answered", value, by, at, wait.kind.value, reason)
        answer_id = new_op_id()  # one id for every retry: applied once
        result = await retry(
            lambda: self.store.wait_answer(wait, resolution, answer_id=answer_id, now=at),
            what=f"answer {name}/{task_id}",
            max_delay_s=0.5,
            attempts=3,
        )
        if result == 0:
            raise AnswerRejected("not_waiting", f"task {task_id} is not waiting for an answer")
        if result == 2:
            raise AnswerRejected("answered", f"task {task_id} was already answered")
        if result == 3:
            raise AnswerRejected(
                "not_waiting", f"task {task_id} asked again meanwhile; look at `agentos pending`"
            )
        await self.store.signal("due", name)
        await self.store.record_fleet_event(
            name,
            "Answered",
            wait.kind.value,
            f"task {task_id}: {json.dumps(value)[:200]} by {by}"
            + (f" ({reason[:200]})" if reason else ""),
            "",
        )
        return resolution

    async def cancel_task(self, name: str, task_id: str, *, by: str, reason: str = "") -> str:
        """Cancel task ``task_id`` of agent ``name`` (``agentos tasks cancel``): it ends
        ``cancelled`` with a ``TaskCancelled`` event naming ``by``; it is not retried and
        is not a crash. Returns where it was: ``inbox`` (its message had not run: gone
        now), ``dead`` (a dead letter: gone now), ``waiting`` (parked on a wait: ended
        when a daemon next activates the agent, at once) or ``running`` (its daemon cuts
        it short; the record notes the cancel, so a daemon that takes the agent over
        ends the task instead of running it).

        Raises :class:`agentos.client.NotFound` for an unknown agent or task,
        :class:`TaskOver` for a task that ended already (nothing changed).
        """
        if len(reason) > MAX_REASON_CHARS:
            raise AnswerRejected("invalid", f"a reason has at most {MAX_REASON_CHARS} characters")
        await self._require(name)
        record = await self.store.task(name, task_id)
        status = record.get("status", "")  # none yet: a message no daemon has read
        if status in DONE:
            raise TaskOver(name, task_id, status)
        if status in ("waiting", "parked"):
            wait = await self.store.wait_get(name)
            if wait is not None and wait.task_id == task_id:
                at = time.time()
                resolution = Resolution("cancelled", None, by, at, wait.kind.value, reason)
                done = await self.store.wait_answer(wait, resolution, answer_id=new_op_id(), now=at)
                if done == 1:
                    await self.store.signal("due", name)
                    return "waiting"
        where = await self.store.drop_message(name, task_id, by=by, cancel=True)
        if where is not None:  # the owner, if it runs the task now, cuts it short
            return "running" if status == "running" else where
        if not record:
            raise NotFound(f'agent "{name}" has no task {task_id}')
        # Running (or a timer's task, queued in its runner): its daemon cuts it short;
        # noted on the record too, so a daemon that takes the agent over ends it.
        await self.store.mark_cancel(name, task_id, by)
        await self.store.signal("cancel", name, task=task_id, by=by)
        return "running"

    async def send_event(
        self, name: str, event: str, data: Any = None, *, by: str, now: float | None = None
    ) -> bool:
        """Send the event ``event`` (JSON ``data``) to agent ``name``: True when it ended
        a wait, False when kept for the agent's next ``wait_for`` of it."""
        await self._require(name)
        if not event or len(event) > 200:
            raise AnswerRejected("invalid", "an event name has 1 to 200 characters")
        try:
            json.dumps(data)
        except (TypeError, ValueError):
            raise AnswerRejected("invalid", "event data must be JSON") from None
        at = time.time() if now is None else now
        resolution = Resolution("event", data, by, at)
        event_id = new_op_id()
        answered = await retry(
            lambda: self.store.wait_event(name, event, resolution, now=at, event_id=event_id),
            what=f"event {name}/{event}",
            max_delay_s=0.5,
            attempts=3,
        )
        if answered:
            await self.store.signal("due", name)
        return answered
