"""Task bookkeeping as pure functions: a wake-up's record, what a new owner resumes, overlaps.

A *task* (:class:`Task`) is one wake-up of an agent (a message, a fire, a start, an operator's wake)
with a durable record in Redis. These functions decide what the record says and what
to do with records a dead owner left behind; the runner writes what they return. They
take ``now`` and plain data, and are tested by tables.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from agentos.core.messages import Message
from agentos.core.waits import Resumed

__all__ = [
    "DONE",
    "FAILED",
    "Close",
    "MessageLike",
    "Requeue",
    "Task",
    "TaskStatus",
    "Work",
    "inbox_task",
    "inbox_work",
    "overlap_action",
    "queued_record",
    "resume_plan",
    "short",
]


class TaskStatus(enum.StrEnum):
    """Where a task is, as its record's ``status`` field says (the Redis value is the
    member's value, so records written before this enum read the same)."""

    QUEUED = "queued"  # recorded, waiting for the agent
    RUNNING = "running"
    RETRYING = "retrying"  # the agent raised; it runs again after a backoff
    PARKED = "parked"  # set aside by a quota or infrastructure (or waits for a budget); runs later
    WAITING = "waiting"  # waits durably for an answer, an event or a time
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # raised until its retries ran out, or passed a limit
    SKIPPED = "skipped"  # an overlapping fire, or a missed one not caught up
    CANCELLED = "cancelled"  # `agentos tasks cancel`
    DROPPED = "dropped"  # its message was dropped from the dead letters / inbox
    DEAD = "dead"  # its message was dead-lettered


DONE = frozenset(
    {
        TaskStatus.SUCCEEDED,
        TaskStatus.FAILED,
        TaskStatus.SKIPPED,
        TaskStatus.CANCELLED,
        TaskStatus.DROPPED,
        TaskStatus.DEAD,
    }
)
"""Task statuses that do not change any more."""

FAILED = frozenset({TaskStatus.FAILED, TaskStatus.DEAD})
"""Statuses of tasks that ended without doing their job (raised until the retries ran
out, passed a limit, or were abandoned): judged ``fail`` by the runtime."""


class MessageLike(Protocol):
    """An inbox message as the task bookkeeping sees it (kept for importers; tasks carry
    :class:`~agentos.core.messages.Message`)."""

    @property
    def id(self) -> str: ...
    @property
    def body(self) -> str: ...
    @property
    def key(self) -> str | None: ...


@dataclass(slots=True)
class Task:
    """A task: one wake-up of an agent, queued on its runner until it runs; ``id`` is
    its record's id."""

    trigger: str
    message: Message | None = None  # what an inbox task runs on
    attempt: int = 1
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    scheduled_at: float | None = None
    index: int | None = None  # the time trigger that fired, if any
    recorded: bool = False  # a task record exists already (queued)
    queued_at: float | None = None
    not_before: float = 0.0  # parked until then (a quota, a budget, an infrastructure retry)
    parked_for: str = ""  # why: "rate", "budget", "infra" (a quota change frees the first two)
    infra_attempts: int = 0  # infrastructure retries in a row (never counted as crashes)
    resume: Resumed | None = None  # a task that waited: its recorded answers and calls
    cancelled_by: str | None = None  # `agentos tasks cancel`: who; it ends, never runs on
    cancel_recorded: bool = False  # ... and its record and event say so already
    spent: float = 0.0  # money its earlier attempts and runs spent (maxCostPerTask)


def inbox_task(message: Message) -> Task:
    """The task a message starts. The message id is the task id, so a redelivered
    message is the same task, retried."""
    return Task("inbox", message, id=f"m-{message.id}")


# The names tasks had before (kept for importers): "work" and "task" were the same thing.
Work = Task
inbox_work = inbox_task


def short(value: Any, limit: int = 200) -> str:
    """``value`` as text cut to ``limit`` characters (for payloads and errors)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def queued_record(task: Task, agent: str, now: float) -> dict[str, object]:
    """The fields of ``task``'s record when it is queued (its first write)."""
    fields: dict[str, object] = {
        "id": task.id,
        "agent": agent,
        "trigger": task.trigger,
        "status": TaskStatus.QUEUED,
        "created_at": repr(now),
        "attempt": task.attempt - 1,
    }
    if task.message is not None:
        fields |= {
            "message_id": task.message.id,
            "payload": short(task.message.body),
            "key": task.message.key or "",
        }
    if task.scheduled_at is not None:
        fields["scheduled_at"] = repr(task.scheduled_at)
    if task.index is not None:
        fields["trigger_index"] = task.index
    return fields


@dataclass(frozen=True, slots=True)
class Close:
    """Mark a record finished: its work is done, only its last write was lost."""

    task_id: str
    fields: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Requeue:
    """Run a dead owner's unfinished task again (same record, next attempt)."""

    work: Task


def resume_plan(
    records: Iterable[Mapping[str, str]], pending: set[str], now: float
) -> list[Close | Requeue]:
    """What a new owner does with the queued or running records a dead owner left.

    An inbox task whose message is still ``pending`` runs again as the same task when
    the message is redelivered, so nothing is planned for it. One whose message was
    acknowledged is done (the ack is atomic with the state it produced); only its
    closing write was lost. Any other trigger runs again as its next attempt.
    """
    plan: list[Close | Requeue] = []
    for record in records:
        task_id, trigger = record.get("id", ""), record.get("trigger", "")
        if trigger == "inbox":
            if record.get("message_id") in pending:
                continue
            plan.append(
                Close(
                    task_id,
                    {
                        "status": TaskStatus.SUCCEEDED,
                        "finished_at": repr(now),
                        "result": "completed; its owner died before recording the end",
                    },
                )
            )
            continue
        index = record.get("trigger_index")
        scheduled = record.get("scheduled_at")
        plan.append(
            Requeue(
                Task(
                    trigger,
                    attempt=int(record.get("attempt") or 0) + 1,
                    id=task_id,
                    index=int(index) if index else None,
                    scheduled_at=float(scheduled) if scheduled else None,
                    recorded=True,
                )
            )
        )
    return plan


def overlap_action(
    policy: str, *, running_index: int | None, fire_index: int
) -> Literal["skip", "queue", "cancel-previous", "queue-first"]:
    """What a fire does while a task runs, by the trigger's ``overlap`` policy.

    ``cancel-previous`` when the running task came from the same trigger (cancel it,
    run the fire next); ``queue-first`` when ``cancelPrevious`` meets a task of another
    trigger (nothing to cancel: run the fire next).
    """
    if policy == "skip":
        return "skip"
    if policy == "cancelPrevious":
        return "cancel-previous" if running_index == fire_index else "queue-first"
    return "queue"
