"""What a sender reads about its task: where it got to and, when it waits, what for.

``agentos send --wait`` and ``GET /v1/agents/NAME/tasks/TASK`` show one task to whoever
started it. A task that is not done says why: it waits for an answer (the question, the
choices, the tool call it would make, and the exact ``agentos answer`` command), it is
retrying (the error, when it runs again), or it has not started (what the agent is
doing). Pure: built from the task's record, the agent's wait and its status.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import Any

from agentos.core.machine import rfc3339
from agentos.core.waits import WaitKind, WaitRecord

__all__ = ["DONE", "answer_command", "describe_view", "task_view"]

DONE = frozenset({"succeeded", "failed", "skipped", "cancelled", "dropped", "dead"})
"""Task statuses that do not change any more."""


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
