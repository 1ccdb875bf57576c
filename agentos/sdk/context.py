"""The :class:`Context` an agent is handed: everything it may touch during a task.

The model (``ctx.llm``), durable state (``ctx.state``), its config, the task that woke
it (a :class:`TaskInfo`), a logger, why it is being stopped, and the durable waits
(``ask``, ``wait_for``, ``sleep``) that park a task in Redis instead of holding the
agent. The runtime (a daemon, or :mod:`agentos.testing`) builds the context and plugs
in how it sends messages and events; this module does no I/O of its own.
"""

from __future__ import annotations

import datetime as _dt
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Final

from agentos.core.durations import parse_duration
from agentos.core.lifecycle import StopReason
from agentos.core.messages import Message
from agentos.core.outcomes import Outcome
from agentos.core.waits import WaitKind, WaitLog, WaitSpec, ask_spec, deadline_of
from agentos.sdk.llm import LLM
from agentos.telemetry import Telemetry
from agentos.tools import Toolbox

__all__ = ["Context", "EventSender", "Sender", "TaskInfo"]


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """The task being worked on: one wake-up of the agent and its loop iterations."""

    id: str
    trigger: str  # start, inbox, heartbeat, schedule, every, at, wake, test
    attempt: int = 1
    message: Message | None = None
    started_at: float = 0.0


Sender = Callable[[str, str], Awaitable[str]]


async def _no_sender(agent: str, body: str) -> str:
    raise RuntimeError("this context cannot send messages")


EventSender = Callable[[str, str, Any], Awaitable[bool]]


async def _no_events(agent: str, event: str, data: Any) -> bool:
    raise RuntimeError("this context cannot send events")


class _NoDefault(enum.Enum):
    TOKEN = 0


_NO_DEFAULT: Final = _NoDefault.TOKEN


def _seconds(value: float | str | None, what: str) -> float | None:
    if value is None or isinstance(value, int | float):
        return value
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


@dataclass(eq=False)
class Context:
    """Everything an agent may use during a task. Built by the runtime, one per agent."""

    name: str
    llm: LLM
    state: Any
    config: Mapping[str, Any]
    task: TaskInfo
    log: logging.LoggerAdapter[logging.Logger]
    stopping: StopReason | None = None
    _message_taken: bool = field(default=False, repr=False)
    _result: Any = field(default=None, repr=False)
    _has_result: bool = field(default=False, repr=False)
    _sender: Sender = field(default=_no_sender, repr=False)
    _telemetry: Telemetry = field(default_factory=Telemetry.disabled, repr=False)
    _events: EventSender = field(default=_no_events, repr=False)
    _waits: WaitLog = field(default_factory=lambda: WaitLog(time.time), repr=False)
    _outcome: Outcome | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.llm.replay = self._waits
        self.llm._ctx = self
        self.llm.toolbox.context = self

    @property
    def tools(self) -> Toolbox:
        """The agent's toolbox: its ``Agent.tools``, plus any added since (``ctx.tools.add``).

        ``await ctx.tools.call(tool_call)`` runs one call and returns the ``tool``
        message to pass in the next ``ctx.llm.chat``.
        """
        return self.llm.toolbox

    # ---------------------------------------------------------------- durable waits
    # Each wait ends the loop iteration the first time it is reached: the task is parked
    # in Redis and the agent released. When the wait ends, the iteration runs again and
    # every wait returns what was recorded for it, in order: code before a wait runs
    # again (make it idempotent, or put side effects after the wait), code after it once.

    async def ask(
        self,
        question: str,
        *,
        choices: Sequence[str] | None = None,
        timeout: float | str | None = None,  # noqa: ASYNC109 - a durable deadline
        default: Any = _NO_DEFAULT,
    ) -> Any:
        """Ask a person and return the answer: one of ``choices`` (``("yes", "no")`` for
        an approval), or free text when there are none.

        Answers come from `agentos answer`, ``POST /v1/agents/{name}/tasks/{task}/answer``
        or :meth:`agentos.Client.answer`. After ``timeout`` (seconds or "2h") ``default``
        is returned, or :class:`WaitTimeout` raised when there is none.
        """
        has_default = not isinstance(default, _NoDefault)
        spec = ask_spec(
            question,
            choices=choices,
            deadline=deadline_of(self._waits.clock(), _seconds(timeout, "ctx.ask timeout")),
            default=default if has_default else None,
            has_default=has_default,
        )
        return self._waits.wait(spec)

    async def wait_for(
        self,
        event: str,
        *,
        timeout: float | str | None = None,  # noqa: ASYNC109 - a durable deadline
    ) -> Any:
        """Wait for the event named ``event`` sent to this agent (by :meth:`send_event`
        of another agent, `agentos event`, HTTP) and return its data.

        An event sent before the agent waits for it is kept (the latest of each name)
        and taken by the next wait for it. Raises :class:`WaitTimeout` after ``timeout``.
        """
        if not isinstance(event, str) or not event or len(event) > 200:
            raise ValueError("ctx.wait_for needs an event name of 1 to 200 characters")
        deadline = deadline_of(self._waits.clock(), _seconds(timeout, "ctx.wait_for timeout"))
        return self._waits.wait(WaitSpec(WaitKind.EVENT, event, None, deadline))

    async def send_event(self, agent: str, event: str, data: Any = None) -> bool:
        """Send the event ``event`` (with JSON-serialisable ``data``) to ``agent``.

        Returns True when it ended a wait of that agent, False when it is kept for the
        agent's next ``wait_for(event)``.
        """
        return await self._events(agent, event, data)

    async def sleep_until(self, when: float | _dt.datetime) -> None:
        """Park the task until ``when`` (epoch seconds or an aware datetime), holding
        nothing meanwhile; the iteration then runs again and this call returns."""
        at = when.timestamp() if isinstance(when, _dt.datetime) else float(when)
        self._waits.wait(WaitSpec(WaitKind.SLEEP, "", None, at))

    async def sleep(self, duration: float | str) -> None:
        """:meth:`sleep_until` now + ``duration`` (seconds or "30m")."""
        seconds = _seconds(duration, "ctx.sleep")
        assert seconds is not None
        deadline = deadline_of(self._waits.clock(), seconds)
        assert deadline is not None
        await self.sleep_until(deadline)

    def take_message(self) -> Message | None:
        """The message that started this task, the first time it is asked for; then None.

        The default :meth:`Agent.observe` returns it, so an agent that only answers
        messages needs no observe of its own.
        """
        if self._message_taken or self.task.message is None:
            return None
        self._message_taken = True
        return self.task.message

    @property
    def message_taken(self) -> bool:
        """Whether the agent has taken this task's message (the runtime acks it then)."""
        return self._message_taken

    async def send(self, agent: str, body: str) -> str:
        """Send a message to another agent's inbox. Returns the message id."""
        return await self._sender(agent, body)

    def tool(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        """Trace a tool call: ``with ctx.tool("grep"): ...`` opens ``execute_tool grep``.

        An exception inside marks the span failed and propagates.
        """
        return self._telemetry.tool(name, **attributes)

    def set_result(self, value: Any) -> None:
        """Make ``value`` this task's result, instead of what ``act`` returned last.

        The record keeps it as text: a ``str`` as is, data (a pydantic model, a Struct,
        a dataclass, a dict...) as JSON; ``agentos send --wait`` prints it. The latest
        call wins; None sets an empty result.
        """
        self._result = value
        self._has_result = True

    def succeed(self, score: float | None = None, reason: str | None = None) -> None:
        """Mark this task successful (``score`` in any scale you use, ``reason`` free
        text). The verdict goes on the task record and into ``agentos usage`` (success
        rate, cost per successful task); an Agent's ``spec.evaluate`` has the last word.
        The latest of :meth:`succeed` and :meth:`fail` wins.
        """
        self._outcome = Outcome("pass", None if score is None else float(score), reason)

    def fail(self, reason: str) -> None:
        """Mark this task failed (it did not do its job) without raising: the task ends
        normally, its result is kept, and it counts as unsuccessful in ``usage``."""
        if not isinstance(reason, str) or not reason:
            raise ValueError("ctx.fail needs a reason")
        self._outcome = Outcome("fail", None, reason)

    @property
    def outcome(self) -> Outcome | None:
        """The verdict :meth:`succeed` or :meth:`fail` gave this task (None: neither)."""
        return self._outcome

    @property
    def result(self) -> Any:
        """What :meth:`set_result` was last given in this task (None if it was not called)."""
        return self._result

    @property
    def has_result(self) -> bool:
        """Whether :meth:`set_result` was called in this task."""
        return self._has_result

    def begin(self, task: TaskInfo) -> None:
        """Runtime hook: switch the context to a new task."""
        self.task = task
        self._message_taken = False
        self._result = None
        self._has_result = False
        self._outcome = None
        self._waits.begin(enabled=False)
