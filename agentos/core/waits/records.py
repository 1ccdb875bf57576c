"""What a durable wait is: its kind, what agent code asked, how it ended, what Redis keeps.

:class:`WaitSpec` is what agent code asked for, :class:`WaitRecord` the parked task's
wait as the store keeps it, and :class:`Resolution` how it ended. They cross from the
SDK through the runtime and the store to the CLI and the ingress, so each carries its
own plain-data form. Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentos.core.machine import rfc3339

__all__ = [
    "APPROVAL",
    "AnswerError",
    "Resolution",
    "WaitKind",
    "WaitRecord",
    "WaitRequested",
    "WaitSpec",
    "WaitTimeout",
]

APPROVAL = ("yes", "no")


class WaitKind(enum.StrEnum):
    """What a parked task waits for."""

    ASK = "ask"  # a person's answer (approval, a choice, free text)
    EVENT = "event"  # a named event sent to the agent
    SLEEP = "sleep"  # a time
    BUDGET = "budget"  # a spent daily budget: the day's end, or a raised limit


class WaitTimeout(Exception):
    """A wait reached its deadline with no default to return.

    Raised by ``ctx.ask`` / ``ctx.wait_for`` in the resumed task; ``kind`` and
    ``question`` (or the event name) say which wait.
    """

    def __init__(self, kind: str, what: str, deadline: float | None) -> None:
        self.kind = kind
        self.what = what
        self.deadline = deadline
        super().__init__(f"{kind} wait timed out: {what}")


class AnswerError(ValueError):
    """An answer that does not fit the question (or comes when nothing waits). Nothing
    is recorded; the message says what would fit."""


@dataclass(frozen=True, slots=True)
class WaitSpec:
    """What agent code asked to wait for (before it is parked)."""

    kind: WaitKind
    question: str = ""  # ask: the question; event: the event name; sleep: ""
    choices: tuple[str, ...] | None = None  # ask: the allowed answers, None for free text
    deadline: float | None = None  # epoch seconds; None waits forever
    default: Any = None
    has_default: bool = False
    tool: str = ""  # a tool call's approval: the tool (SERVER.TOOL or its own name)
    arguments: str = ""  # ... and its arguments, as the model gave them (JSON)

    def describe(self) -> str:
        """One line for events and status messages."""
        if self.kind is WaitKind.ASK and self.tool:
            return f"asks approval to call {self.tool}({_cut(self.arguments, 120)})"
        if self.kind is WaitKind.ASK:
            opts = f" [{'/'.join(self.choices)}]" if self.choices else ""
            return f"asks {_cut(self.question, 120)!r}{opts}"
        if self.kind is WaitKind.EVENT:
            return f"waits for event {self.question!r}"
        if self.kind is WaitKind.BUDGET:
            return f"waits for budget: {self.question}"
        return "sleeps"


class WaitRequested(BaseException):
    """Raised by a wait that has no recorded resolution: ends the loop iteration.

    A BaseException so that agent code's ``except Exception`` does not swallow it; the
    runtime catches it and parks the task. ``seq`` is the wait's position in the
    iteration (how many waits before it were already resolved).
    """

    def __init__(self, spec: WaitSpec, seq: int) -> None:
        self.spec = spec
        self.seq = seq
        super().__init__(spec.describe())


@dataclass(frozen=True, slots=True)
class Resolution:
    """How one wait ended: ``outcome`` is answered, event, timeout or woke."""

    outcome: str
    value: Any = None
    by: str = ""  # who answered (a token's name, an OS user, an agent) or "deadline"
    at: float = 0.0
    kind: str = ""
    reason: str = ""  # why, as the person who answered said (``answer --reason``)

    def to_json(self) -> dict[str, Any]:
        data = {"outcome": self.outcome, "value": self.value, "by": self.by, "at": self.at}
        if self.reason:
            data["reason"] = self.reason
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], kind: str = "") -> Resolution:
        return cls(
            str(data.get("outcome", "")),
            data.get("value"),
            str(data.get("by", "")),
            float(data.get("at", 0.0) or 0.0),
            kind,
            str(data.get("reason") or ""),
        )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class WaitRecord:
    """A parked task's wait as kept in Redis (see ``agentos.store.waits``)."""

    agent: str
    task_id: str
    park_id: str  # one per park: an activation tells a committed park from a torn one
    kind: WaitKind
    question: str
    choices: tuple[str, ...] | None
    deadline: float | None
    default: Any
    has_default: bool
    since: float
    seq: int  # resolutions recorded before this wait, in this iteration
    answer: Resolution | None = None
    quota_class: str = ""  # budget waits: the class whose budget is spent
    tool: str = ""  # a tool call's approval: the tool and its arguments (JSON)
    arguments: str = ""

    @property
    def spec(self) -> WaitSpec:
        return WaitSpec(
            self.kind,
            self.question,
            self.choices,
            self.deadline,
            self.default,
            self.has_default,
            self.tool,
            self.arguments,
        )

    def to_fields(self) -> dict[str, str]:
        """The hash fields (no answer: only the answer script writes that)."""
        return {
            "agent": self.agent,
            "task": self.task_id,
            "park": self.park_id,
            "kind": self.kind.value,
            "question": self.question,
            "choices": json.dumps(list(self.choices)) if self.choices is not None else "",
            "deadline": repr(self.deadline) if self.deadline is not None else "",
            "default": json.dumps(self.default),
            "has_default": "1" if self.has_default else "",
            "since": repr(self.since),
            "seq": str(self.seq),
            "quota_class": self.quota_class,
            "tool": self.tool,
            "arguments": self.arguments,
        }

    @classmethod
    def from_fields(cls, f: Mapping[str, str]) -> WaitRecord:
        choices = f.get("choices") or ""
        deadline = f.get("deadline") or ""
        answer = f.get("answer") or ""
        return cls(
            agent=f.get("agent", ""),
            task_id=f.get("task", ""),
            park_id=f.get("park", ""),
            kind=WaitKind(f.get("kind", "ask")),
            question=f.get("question", ""),
            choices=tuple(json.loads(choices)) if choices else None,
            deadline=float(deadline) if deadline else None,
            default=json.loads(f.get("default") or "null"),
            has_default=bool(f.get("has_default")),
            since=float(f.get("since") or 0.0),
            seq=int(f.get("seq") or 0),
            answer=Resolution.from_json(json.loads(answer), f.get("kind", "")) if answer else None,
            quota_class=f.get("quota_class", ""),
            tool=f.get("tool", ""),
            arguments=f.get("arguments", ""),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `agentos pending -o json` and ``GET /v1/pending``."""
        return {
            "agent": self.agent,
            "task": self.task_id,
            "kind": self.kind.value,
            "question": self.question,
            "choices": list(self.choices) if self.choices is not None else None,
            "since": rfc3339(self.since),
            "deadline": None if self.deadline is None else rfc3339(self.deadline),
            "default": self.default if self.has_default else None,
            "answered": self.answer is not None,
            "tool": self.tool or None,
            "arguments": _arguments(self.arguments) if self.tool else None,
        }


def _arguments(raw: str) -> Any:
    """A tool call's arguments as data when they are JSON, else the text as given."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw
