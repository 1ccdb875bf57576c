"""Decisions over waits, with ``now`` given: what agent code may ask, what an answer may
be, what a wait resolves to, and what an activation does with a waiting agent.

The runtime (``agentos.runtime.waits``) and the store (``agentos.store.waits``) perform
what these return. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agentos.core.waits.records import AnswerError, Resolution, WaitKind, WaitRecord, WaitSpec

__all__ = [
    "Discard",
    "Repark",
    "Resume",
    "ask_spec",
    "deadline_of",
    "on_activation",
    "resolve",
    "validate_answer",
]

MAX_QUESTION_CHARS = 4000
MAX_CHOICES = 50
MAX_TEXT_ANSWER_CHARS = 16_000


def deadline_of(now: float, timeout_s: float | None) -> float | None:
    """The deadline of a wait with ``timeout_s`` (None: none). Raises ValueError for < 0."""
    if timeout_s is None:
        return None
    if not math.isfinite(timeout_s) or timeout_s < 0:
        raise ValueError(f"timeout must be a finite number of seconds >= 0, got {timeout_s!r}")
    return now + timeout_s


def ask_spec(
    question: str,
    *,
    choices: Sequence[str] | None,
    deadline: float | None,
    default: Any,
    has_default: bool,
) -> WaitSpec:
    """Validate what ``ctx.ask`` was given. Raises ValueError (an agent error) when wrong."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("ctx.ask needs a non-empty question")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"ctx.ask: the question is over {MAX_QUESTION_CHARS} characters")
    opts: tuple[str, ...] | None = None
    if choices is not None:
        opts = tuple(str(c) for c in choices)
        if not opts or len(opts) > MAX_CHOICES or len(set(opts)) != len(opts):
            raise ValueError(f"ctx.ask: choices must be 1 to {MAX_CHOICES} distinct strings")
        if has_default and default not in opts:
            raise ValueError(f"ctx.ask: default {default!r} is not one of the choices {opts}")
    try:
        json.dumps(default)
    except (TypeError, ValueError):
        raise ValueError("ctx.ask: default must be JSON-serialisable") from None
    return WaitSpec(WaitKind.ASK, question, opts, deadline, default, has_default)


def validate_answer(
    wait: WaitRecord | None,
    task_id: str,
    *,
    yes: bool = False,
    no: bool = False,
    choice: str | None = None,
    text: str | None = None,
) -> Any:
    """The value to record for an operator's answer, or :class:`AnswerError`.

    Exactly one of ``yes`` / ``no`` / ``choice`` / ``text``. ``--yes`` / ``--no`` answer
    an approval (choices yes/no); ``choice`` one of the offered choices; ``text`` a
    question with no choices.
    """
    given = [x for x in (yes or None, no or None, choice, text) if x is not None]
    if len(given) != 1:
        raise AnswerError("give exactly one answer: --yes, --no, --choice X or --text ...")
    if wait is None or wait.task_id != task_id:
        raise AnswerError(f"task {task_id} is not waiting for an answer")
    if wait.answer is not None:
        raise AnswerError(
            f"task {task_id} was already answered ({wait.answer.value!r} by {wait.answer.by})"
        )
    if wait.kind is WaitKind.EVENT:
        raise AnswerError(
            f"task {task_id} waits for event {wait.question!r}, not an answer: send it the event"
        )
    if wait.kind is WaitKind.SLEEP:
        raise AnswerError(f"task {task_id} sleeps until its deadline; it takes no answer")
    if wait.kind is WaitKind.BUDGET:
        raise AnswerError(
            f"task {task_id} waits for budget ({wait.question}); it resumes when the budget "
            "day ends or when a policy raises the limit (`agentos apply`)"
        )
    if wait.choices is None:
        if text is None:
            raise AnswerError(f"task {task_id} asks for free text: answer with --text")
        if len(text) > MAX_TEXT_ANSWER_CHARS:
            raise AnswerError(f"the answer is over {MAX_TEXT_ANSWER_CHARS} characters")
        return text
    if text is not None:
        raise AnswerError(
            f"task {task_id} offers choices {', '.join(wait.choices)}: use --choice (or --yes/--no)"
        )
    value = "yes" if yes else "no" if no else choice
    if value not in wait.choices:
        raise AnswerError(f"{value!r} is not one of the choices offered: {', '.join(wait.choices)}")
    return value


def resolve(wait: WaitRecord, now: float) -> Resolution | None:
    """What ``wait`` resolves to at ``now``: its answer, its deadline, or None (not yet)."""
    if wait.answer is not None:
        a = wait.answer
        return Resolution(a.outcome, a.value, a.by, a.at, wait.kind, a.reason)
    if wait.deadline is not None and wait.deadline <= now:
        if wait.kind is WaitKind.SLEEP:
            return Resolution("woke", None, "deadline", now, wait.kind)
        if wait.kind is WaitKind.BUDGET:
            return Resolution("rollover", None, "deadline", now, wait.kind)
        return Resolution("timeout", None, "deadline", now, wait.kind)
    return None


@dataclass(frozen=True, slots=True)
class Resume:
    """Run the waited task again with ``resolution`` appended to its recorded answers."""

    resolution: Resolution


@dataclass(frozen=True, slots=True)
class Repark:
    """Not resolved yet: put the agent back in the due index and release it."""

    due_at: float | None


@dataclass(frozen=True, slots=True)
class Discard:
    """The wait is stale (its park never committed, or it was consumed): remove it."""

    why: str


def on_activation(
    wait: WaitRecord, *, committed: bool, consumed: bool, now: float
) -> Resume | Repark | Discard:
    """What a runner that took a waiting agent does with its wait.

    ``committed``: the agent's status names this park (the park's fenced write went
    through; if not, the task's record is as it was when the task began this run, so an
    answer already given can still be appended to it). ``consumed``: the task record
    already holds this wait's resolution (an earlier activation resumed it, then died
    before removing the wait).
    """
    if consumed:
        return Discard("already resumed")
    if not committed:
        # Its owner died while parking it: the task runs again from its record. An
        # answer given meanwhile still counts; without one the task asks again.
        if wait.answer is not None:
            return Resume(resolve(wait, now) or Resolution(wait.answer.outcome))
        return Discard("the task was not parked (its owner died while parking it)")
    resolution = resolve(wait, now)
    if resolution is None:
        return Repark(wait.deadline)
    return Resume(resolution)
