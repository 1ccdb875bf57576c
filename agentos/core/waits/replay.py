"""Replaying a loop iteration: the waits' answers, the model calls and the tool ledger.

When a parked task resumes (or an interrupted one runs again) its iteration runs from
the start: each wait it passes takes the next recorded answer, each model call the
next recorded completion whose prompt matches, each tool call its recorded result. So
the code before a wait runs again and the code after it runs once, and a tool call is
never run twice. Pure: the clock is passed in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentos.core.waits.records import (
    Resolution,
    WaitKind,
    WaitRequested,
    WaitSpec,
    WaitTimeout,
)

__all__ = ["MAX_TOOL_RECORD_CHARS", "TOOL_RECORD_CUT", "Resumed", "WaitLog", "tool_key"]


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
