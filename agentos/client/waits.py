"""The client's side of durable waits: who waits for what, answers, cancels and events.

`agentos pending`, `agentos answer`, `agentos tasks cancel`, `agentos event` and the
HTTP endpoints are built on these functions (through :class:`agentos.client.Client`).
An answer is validated against the question it answers
(:func:`agentos.core.waits.validate_answer`) and recorded exactly once by one script
in the agent's due shard, with who gave it and when; the agent is then due, and any
daemon with room activates it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from agentos.client.errors import AnswerRejected, EventsFull, TaskOver
from agentos.client.reports import require_agent
from agentos.core.errors import NotFound
from agentos.core.taskview import DONE
from agentos.core.waits import AnswerError, Resolution, WaitRecord, validate_answer
from agentos.store import EventsFull as _StoreEventsFull
from agentos.store import Store
from agentos.store.retry import new_op_id, retry

__all__ = ["MAX_REASON_CHARS", "answer", "cancel_task", "pending", "send_event"]

MAX_REASON_CHARS = 2000
"""The longest reason an answer may give (it reaches the model as part of a refusal)."""


async def pending(name: str | None, *, store: Store) -> list[WaitRecord]:
    """Parked waits (of one agent, or of the fleet), oldest first."""
    if name is not None:
        await require_agent(name, store=store)
    waits = await store.waits.pending([name] if name is not None else None)
    return sorted(waits, key=lambda w: (w.since, w.agent))


async def answer(
    name: str,
    task_id: str,
    *,
    store: Store,
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
    await require_agent(name, store=store)
    wait = await store.waits.get(name)
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
        lambda: store.waits.answer(wait, resolution, answer_id=answer_id, now=at),
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
    await store.signals.send("due", name)
    await store.events.record_fleet_event(
        name,
        "Answered",
        wait.kind.value,
        f"task {task_id}: {json.dumps(value)[:200]} by {by}"
        + (f" ({reason[:200]})" if reason else ""),
        "",
    )
    return resolution


async def cancel_task(name: str, task_id: str, *, store: Store, by: str, reason: str) -> str:
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
    await require_agent(name, store=store)
    record = await store.tasks.get(name, task_id)
    status = record.get("status", "")  # none yet: a message no daemon has read
    if status in DONE:
        raise TaskOver(name, task_id, status)
    if status in ("waiting", "parked"):
        wait = await store.waits.get(name)
        if wait is not None and wait.task_id == task_id:
            at = time.time()
            resolution = Resolution("cancelled", None, by, at, wait.kind.value, reason)
            done = await store.waits.answer(wait, resolution, answer_id=new_op_id(), now=at)
            if done == 1:
                await store.signals.send("due", name)
                return "waiting"
    where = await store.poison.drop(name, task_id, by=by, cancel=True)
    if where is not None:  # the owner, if it runs the task now, cuts it short
        return "running" if status == "running" else where
    if not record:
        raise NotFound(f'agent "{name}" has no task {task_id}')
    # Running (or a timer's task, queued in its runner): its daemon cuts it short;
    # noted on the record too, so a daemon that takes the agent over ends it.
    await store.tasks.mark_cancel(name, task_id, by)
    await store.signals.send("cancel", name, task=task_id, by=by)
    return "running"


async def send_event(
    name: str, event: str, data: Any, *, store: Store, by: str, now: float | None
) -> bool:
    """Send the event ``event`` (JSON ``data``) to agent ``name``: True when it ended
    a wait, False when kept for the agent's next ``wait_for`` of it. Raises
    :class:`EventsFull` when the agent keeps as many unawaited events as it may."""
    await require_agent(name, store=store)
    if not event or len(event) > 200:
        raise AnswerRejected("invalid", "an event name has 1 to 200 characters")
    try:
        json.dumps(data)
    except (TypeError, ValueError):
        raise AnswerRejected("invalid", "event data must be JSON") from None
    at = time.time() if now is None else now
    resolution = Resolution("event", data, by, at)
    event_id = new_op_id()
    try:
        answered = await retry(
            lambda: store.waits.event(name, event, resolution, now=at, event_id=event_id),
            what=f"event {name}/{event}",
            max_delay_s=0.5,
            attempts=3,
        )
    except _StoreEventsFull as e:
        raise EventsFull(e.name, e.event, e.what, e.limit) from None
    if answered:
        await store.signals.send("due", name)
    return answered
