"""What a sender reads about its task: where it got to and, when it waits, what for.

``agentos send --wait`` and ``GET /v1/agents/NAME/tasks/TASK`` show one task to whoever
started it. A task that is not done says why: it waits for an answer (the question, the
choices, the tool call it would make, and the exact ``agentos answer`` command), it is
retrying (the error, when it runs again), or it has not started (what the agent is
doing). A finished task also says whether it did its job (its outcome).

The same records are what an Agent's evaluator judges (:class:`EvaluatedTask`), after
the task and again with ``agentos eval``: both see exactly what the record keeps, so a
re-run judges what the first run judged. Pure: built from the task's record, the
agent's wait and its status.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentos.core.machine import rfc3339
from agentos.core.outcomes import Outcome
from agentos.core.tasks import DONE, FAILED
from agentos.core.waits import WaitKind, WaitRecord

__all__ = [
    "DONE",
    "EvaluatedTask",
    "answer_command",
    "describe_view",
    "record_outcome",
    "task_view",
]


def _outcome_field(raw: str | None) -> Outcome | None:
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return Outcome.from_dict(data) if isinstance(data, Mapping) else None
    except ValueError:
        return None


def record_outcome(record: Mapping[str, str]) -> Outcome | None:
    """The verdict on a finished task: its ``outcome`` field; for a failed task that has
    none (its retries ran out), ``fail`` from the runtime with the error; None for a
    task not finished (or finished before outcomes were recorded)."""
    outcome = _outcome_field(record.get("outcome"))
    if outcome is not None:
        return outcome
    if record.get("status") in FAILED:
        return Outcome("fail", reason=record.get("error") or None, source="runtime")
    return None


@dataclass(frozen=True, slots=True)
class EvaluatedTask:
    """What an Agent's evaluator (``spec.evaluate``) sees of a finished task: read-only,
    built from its record, so ``agentos eval`` later shows it exactly the same.

    ``message`` is the body of the message that started it (its first 200 characters,
    as recorded; None when a trigger started it), ``result`` the text the record keeps
    (JSON for a structured result), ``outcome`` the agent's own verdict
    (``ctx.succeed`` / ``ctx.fail``; None when it gave none).
    """

    id: str
    agent: str
    trigger: str
    status: str
    message: str | None
    result: str
    error: str
    attempt: int
    outcome: Outcome | None

    @classmethod
    def from_record(cls, agent: str, record: Mapping[str, str]) -> EvaluatedTask:
        """The view of ``record`` (a task record of ``agent``)."""
        try:
            attempt = int(float(record.get("attempt") or 0))
        except ValueError:
            attempt = 0
        own = _outcome_field(record.get("agent_outcome"))
        if own is None:  # no evaluator overrode it: the recorded outcome, if the agent's
            recorded = _outcome_field(record.get("outcome"))
            own = recorded if recorded is not None and recorded.source == "agent" else None
        return cls(
            id=record.get("id", ""),
            agent=record.get("agent") or agent,
            trigger=record.get("trigger", ""),
            status=record.get("status", ""),
            message=record.get("payload") if record.get("message_id") else None,
            result=record.get("result", ""),
            error=record.get("error", ""),
            attempt=attempt,
            outcome=own,
        )


def _time(raw: str | None) -> str | None:
    """An epoch-seconds field as RFC 3339 (None when unset or not a number)."""
    value = _number(raw)
    return None if value is None else rfc3339(value)


def _number(raw: str | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def answer_command(wait: WaitRecord) -> str:
    """The ``agentos answer`` command line that answers ``wait`` (one choice shown as
    ``--choice X``; a yes/no question as ``--yes | --no``)."""
    base = f"agentos answer {shlex.quote(wait.agent)} {shlex.quote(wait.task_id)}"
    if wait.kind is WaitKind.EVENT:
        return f"agentos event {shlex.quote(wait.agent)} {shlex.quote(wait.question)} 'DATA'"
    if wait.choices == ("yes", "no"):
        return f"{base} --yes | --no [--reason TEXT]"
    if wait.choices:
        return f"{base} --choice {'|'.join(shlex.quote(c) for c in wait.choices)}"
    return f"{base} --text 'YOUR ANSWER'"


def task_view(
    agent: str,
    task_id: str,
    record: Mapping[str, str],
    *,
    wait: WaitRecord | None = None,
    status: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The task as its sender sees it (camelCase keys, numbers as numbers, times as RFC
    3339). ``wait`` is the agent's parked wait, ``status`` its status hash."""
    state = record.get("status") or "notStarted"
    view: dict[str, Any] = {
        "agent": agent,
        "taskId": task_id,
        "status": state,
        "done": state in DONE,
        "attempt": int(record.get("attempt") or 0) or None,
        "createdAt": _time(record.get("created_at")),
        "finishedAt": _time(record.get("finished_at")),
    }
    if state in DONE:
        view["result"] = record.get("result", "")
        if record.get("error"):
            view["error"] = record["error"]
        outcome = record_outcome(record)
        if outcome is not None:
            view["outcome"] = outcome.to_dict()
        return view
    if state == "waiting" and wait is not None and wait.task_id == task_id:
        waiting: dict[str, Any] = {
            "kind": "approval" if wait.tool else wait.kind.value,
            "question": wait.question,
            "choices": list(wait.choices) if wait.choices is not None else None,
            "deadline": None if wait.deadline is None else rfc3339(wait.deadline),
            "answered": wait.answer is not None,
            "answer": answer_command(wait),
        }
        if wait.tool:
            waiting["tool"] = wait.tool
            try:
                waiting["arguments"] = json.loads(wait.arguments)
            except ValueError:
                waiting["arguments"] = wait.arguments
        view["waitingFor"] = waiting
    elif state in ("retrying", "parked"):
        view["reason"] = record.get("error", "")
        view["resumeAt"] = _time(record.get("resume_at"))
    elif status is not None:  # queued or not started: what the agent is doing
        phase = status.get("phase", "")
        why = status.get("reason", "")
        message = status.get("message", "")
        view["reason"] = f"the agent is {phase or 'not started yet'}" + (
            f" ({why}: {message})" if why or message else ""
        )
    return view


def describe_view(view: Mapping[str, Any]) -> str:
    """One or two lines for a person: where the task got to and what it needs."""
    head = f"task {view['taskId']} of {view['agent']} is {view['status']}"
    waiting = view.get("waitingFor")
    if waiting:
        what = (
            f"approval to call {waiting['tool']}({json.dumps(waiting.get('arguments'))})"
            if waiting.get("tool")
            else f"{waiting['kind']}: {waiting['question']}"
        )
        choices = f" [{'/'.join(waiting['choices'])}]" if waiting.get("choices") else ""
        return f"{head}: it waits for {what}{choices}\n  answer with: {waiting['answer']}"
    if view.get("reason"):
        return f"{head}: {view['reason']}"
    return head
