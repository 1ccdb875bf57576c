"""Durable waits as pure data and decisions: what a wait is, how it ends, how a task resumes.

An agent that calls ``ctx.ask`` / ``ctx.wait_for`` / ``ctx.sleep_until`` ends its running
loop iteration: the task is parked in Redis with a :class:`WaitRecord` (the question,
its choices, the deadline) and the agent is released. When the wait ends (an answer,
an event, the deadline) the task runs that iteration again; every wait it passes
returns, in order, what was recorded for it (:class:`Resolution`), and the model calls
it made before the wait are served from their record (:class:`WaitLog`). So the code
before a wait runs again and the code after it runs once.

This module decides, without I/O and with ``now`` given: whether an answer fits the
question (:func:`validate_answer`), what a wait resolves to at ``now``
(:func:`resolve`), and what a daemon that activates a waiting agent does with it
(:func:`on_activation`). The runtime (``agentos.runtime.waits``) and the store
(``agentos.store.waits``) perform what it returns.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentos.core.machine import rfc3339

__all__ = [
    "APPROVAL",
    "MAX_TOOL_RECORD_CHARS",
    "AnswerError",
    "Discard",
    "Repark",
    "Resolution",
    "Resume",
    "Resumed",
    "WaitKind",
    "WaitLog",
    "WaitRecord",
    "WaitRequested",
    "WaitSpec",
    "WaitTimeout",
    "ask_spec",
    "deadline_of",
    "on_activation",
    "resolve",
    "tool_key",
    "validate_answer",
]

APPROVAL = ("yes", "no")
MAX_QUESTION_CHARS = 4000
MAX_CHOICES = 50
MAX_TEXT_ANSWER_CHARS = 16_000


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


def _hash(operation: str, prompt: str) -> str:
    return hashlib.blake2b(f"{operation}\0{prompt}".encode(), digest_size=12).hexdigest()


@dataclass
class WaitLog:
    """The waits, model calls and tool calls of the loop iteration being run, for replay.

    The runtime gives it what was recorded (``answers``, ``calls``, ``tools``) when a
    parked task resumes or an interrupted one runs again; each wait then takes the next
    answer, each model call the next recorded completion whose prompt matches (a
    different prompt stops the replay: the call and every later one go to the model),
    and each tool call its recorded result (the tool ledger: a call is never run twice).
    ``enabled`` is False where nothing can park a task (a heartbeat's first observe).
    """

    clock: Callable[[], float]
    answers: list[Resolution] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    enabled: bool = False
    _next_answer: int = 0
    _next_call: int = 0
    _replaying: bool = True
    made: list[dict[str, Any]] = field(default_factory=list)  # this run's calls, in order
    # The tool ledger: call key -> {"state": "started" | "done", "content", "outcome"}.
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)

    def begin(
        self,
        answers: Sequence[Resolution] = (),
        calls: Sequence[Mapping[str, Any]] = (),
        *,
        enabled: bool = True,
        tools: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Start a loop iteration with what was recorded for it (nothing for a new one)."""
        self.answers = list(answers)
        self.calls = [dict(c) for c in calls]
        self.enabled = enabled
        self._next_answer = 0
        self._next_call = 0
        self._replaying = True
        self.made = []
        self.tools = {k: dict(v) for k, v in (tools or {}).items()}

    @property
    def consumed(self) -> int:
        """How many recorded answers this iteration has taken so far."""
        return self._next_answer

    def next_iteration(self) -> None:
        """An iteration completed: the next one records afresh."""
        self.begin(enabled=self.enabled)

    def wait(self, spec: WaitSpec) -> Any:
        """The recorded resolution of this wait, or :class:`WaitRequested` to park.

        Raises :class:`WaitTimeout` for a recorded timeout without a default, and
        RuntimeError where waits cannot park (outside a task).
        """
        r = self.resolution(spec)
        if r.outcome == "timeout" and not spec.has_default:
            raise WaitTimeout(spec.kind.value, spec.question, spec.deadline)
        if r.outcome == "timeout":
            return spec.default
        return r.value

    def resolution(self, spec: WaitSpec) -> Resolution:
        """Like :meth:`wait`, but the whole recorded :class:`Resolution` (who answered,
        why); a timeout comes back as one (outcome ``timeout``), never raised."""
        if self._next_answer < len(self.answers):
            r = self.answers[self._next_answer]
            self._next_answer += 1
            return r
        if not self.enabled:
            raise RuntimeError(
                f"ctx.{'ask' if spec.kind is WaitKind.ASK else 'wait'} cannot park here: waits "
                "work in a task's plan, act and learn (and in observe of a message task), "
                "not in a heartbeat's first observe"
            )
        raise WaitRequested(spec, self._next_answer)

    @property
    def at_start(self) -> bool:
        """Whether this iteration has made (or replayed) no model call yet."""
        return self._next_call == 0 and not self.made

    def replayed(self, operation: str, prompt: str) -> dict[str, Any] | None:
        """The recorded completion of the next model call, if it is the same call."""
        if not self._replaying or self._next_call >= len(self.calls):
            self._replaying = False
            return None
        call = self.calls[self._next_call]
        if call.get("h") != _hash(operation, prompt):
            self._replaying = False  # the code took another path: call the model from here
            return None
        self._next_call += 1
        self.made.append(call)
        return call

    def record(self, operation: str, prompt: str, completion: Mapping[str, Any]) -> None:
        """Keep a model call made in this iteration (saved if the iteration parks)."""
        self._replaying = False
        self.made.append({"h": _hash(operation, prompt), **completion})

    def tool_entry(self, key: str) -> dict[str, Any] | None:
        """What the ledger holds for the tool call ``key`` (see :func:`tool_key`)."""
        return self.tools.get(key)

    def tool_started(self, key: str, name: str) -> None:
        """The call ``key`` is about to run (kept for tools that must not run twice)."""
        self.tools[key] = {"state": "started", "name": name}

    def tool_done(self, key: str, name: str, content: str, outcome: str) -> None:
        """The call ``key`` returned ``content``: replayed from now on, never run again."""
        if len(content) > MAX_TOOL_RECORD_CHARS:
            content = content[:MAX_TOOL_RECORD_CHARS] + TOOL_RECORD_CUT
        self.tools[key] = {"state": "done", "name": name, "content": content, "outcome": outcome}


MAX_TOOL_RECORD_CHARS = 32_000
"""A tool result kept in the ledger is cut here (the model is given the same cut text)."""
TOOL_RECORD_CUT = " … [cut: the result was longer]"


def tool_key(call_id: str, name: str, arguments: str) -> str:
    """The ledger key of one tool call: the model's call id, the tool and its arguments
    (a replayed reply gives the same id; a different call never shares a key)."""
    return _hash("tool", f"{call_id}\0{name}\0{arguments}")


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


@dataclass(frozen=True, slots=True)
class Resumed:
    """What a resumed task's iteration replays: its answers, model calls, taken message."""

    answers: tuple[Resolution, ...] = ()
    calls: tuple[dict[str, Any], ...] = ()
    message_taken: bool = False
    tools: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> Resumed | None:
        """From a task record's ``answers`` / ``calls`` / ``tools`` fields (None when it
        has none: nothing to replay)."""
        raw = record.get("answers") or ""
        tools = record.get("tools") or ""
        if not raw and not tools:
            return None
        return cls(
            tuple(Resolution.from_json(a) for a in json.loads(raw or "[]")),
            tuple(json.loads(record.get("calls") or "[]")),
            record.get("message_taken") == "1",
            json.loads(tools or "{}"),
        )
