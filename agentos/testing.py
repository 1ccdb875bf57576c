"""Run an agent's loop in a test, with the sim engine and no daemon or Redis.

Agent authors test their agents with :class:`AgentHarness`: it builds the same
:class:`~agentos.sdk.Context` the daemon builds and runs tasks through the same loop
(:func:`agentos.runtime.loop.run_task`), round-tripping the state through its codec
after each iteration exactly as the daemon saves it, so a state that would not
survive a restart fails the test.

    harness = AgentHarness(Echo, config={"prefix": ">"})
    result = await harness.message("hello")
    assert harness.state["last"] == "hello"

A task that waits (``ctx.ask``, ``wait_for``, ``sleep``) parks as in a daemon:
``harness.waiting`` says for what, and ``await harness.answer("yes")`` (or ``expire()``,
``event(data)``) resumes it, re-running the waited iteration with the recorded answers.

The module is also a pytest plugin: ``pytest_plugins = ["agentos.testing"]`` in a
project's ``conftest.py`` runs its ``async def`` tests (see :mod:`agentos.testing_plugin`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentos.core.chat import Reply, ToolCall
from agentos.core.lifecycle import StopReason
from agentos.core.waits import Resolution, WaitKind, WaitRequested, WaitSpec
from agentos.engine.base import Engine
from agentos.engine.sim import SimEngine
from agentos.runtime.loop import TaskResult, run_task
from agentos.sdk import (
    LLM,
    Agent,
    Context,
    Message,
    StateCodec,
    TaskInfo,
    agent_logger,
    freeze_config,
)
from agentos.tools import Ledger

__all__ = ["AgentHarness", "Reply", "SentMessage", "ToolCall"]

# The pytest hooks, for `pytest_plugins = ["agentos.testing"]`; AgentHarness needs no pytest.
with contextlib.suppress(ImportError):
    from agentos.testing_plugin import (  # noqa: F401
        anyio_backend,
        pytest_configure,
        pytest_pycollect_makeitem,
    )


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A message the agent sent with ``ctx.send`` during the test."""

    to: str
    body: str


@dataclass
class AgentHarness:
    """Drives one agent instance: start it, send it messages, fire triggers, stop it."""

    agent_class: type[Agent]
    config: Mapping[str, Any] = field(default_factory=dict)
    name: str = "test-agent"
    engine: Engine = field(default_factory=SimEngine)
    state: Any = None
    sent: list[SentMessage] = field(default_factory=list)
    tasks: list[TaskResult] = field(default_factory=list)
    max_steps: int | None = 1000
    waiting: WaitSpec | None = None  # what the last task parked on (None: it did not)

    def __post_init__(self) -> None:
        self.codec = StateCodec(self.agent_class.State)
        if self.state is None:
            self.state = self.codec.new()
        self.agent = self.agent_class()
        self.llm = LLM(self.engine, self.name)
        self.ctx = Context(
            name=self.name,
            llm=self.llm,
            state=self.state,
            config=freeze_config(self.config),
            task=TaskInfo(id="", trigger="test"),
            log=agent_logger(self.name),
            _sender=self._send,
        )
        self.ctx.tools.extend(self.agent_class.tools)
        # Approvals park the task (answer them with :meth:`answer`); calls are recorded
        # and replayed on resume as a daemon does (in memory here).
        self.ctx.tools.ledger = Ledger(self.ctx._waits)

    def script(self, *replies: str | ToolCall | list[ToolCall] | Reply) -> None:
        """Queue the model's next replies to this agent, in order (the sim engine only).

        A ``str`` is a plain answer, a :class:`ToolCall` one call, a list of them
        parallel calls, a :class:`Reply` exactly that reply; once the script runs out
        the sim engine answers on its own again. Drives a tool loop deterministically::

            harness.script(ToolCall(id="c1", name="add", arguments={"a": 2, "b": 3}), "5")
        """
        if not isinstance(self.engine, SimEngine):
            raise TypeError("AgentHarness.script needs the sim engine")
        self.engine.script(self.name, *replies)

    async def run(self, trigger: str = "start", message: Message | None = None) -> TaskResult:
        """Run one task (observe until None) and return how it went.

        Agent exceptions surface as :class:`agentos.runtime.loop.AgentCodeError`
        carrying the original error. ``max_steps`` guards against an agent whose
        observe never returns None.
        """
        return await self._run(TaskInfo(id=uuid.uuid4().hex, trigger=trigger, message=message))

    async def _run(
        self,
        task: TaskInfo,
        answers: list[Resolution] | None = None,
        calls: list[dict[str, Any]] | None = None,
        taken: bool = False,
        tools: dict[str, dict[str, Any]] | None = None,
    ) -> TaskResult:
        self.ctx.begin(task)
        self.ctx._waits.begin(answers or (), calls or (), tools=tools)
        self.ctx._message_taken = taken
        self.waiting = None
        self._saved = self.codec.encode(self.ctx.state)
        self._steps = 0
        try:
            result = await run_task(
                self.agent, self.ctx, after_step=self._after_step, max_steps=self.max_steps
            )
        except WaitRequested as w:
            # Parked: the state of the last complete iteration is what a daemon keeps.
            self.waiting = w.spec
            self._parked = (
                task,
                list(self.ctx._waits.answers[: w.seq]),
                list(self.ctx._waits.made),
                self.ctx.message_taken and self._steps > 0,
                dict(self.ctx._waits.tools),
            )
            self.ctx.state = self.codec.decode(self._saved)
            self.state = self.ctx.state
            result = TaskResult(self._steps, None, stopped=False)
        self.tasks.append(result)
        return result

    async def answer(self, value: Any, *, by: str = "test", reason: str = "") -> TaskResult:
        """Answer the question the last task waits on (an approval: ``"yes"`` or
        ``"no"``) and resume it."""
        return await self._resume(Resolution("answered", value, by, reason=reason))

    async def event(self, data: Any = None) -> TaskResult:
        """Send the event the last task waits for (with ``data``) and resume it."""
        return await self._resume(Resolution("event", data, "test"))

    async def expire(self) -> TaskResult:
        """Let the last task's wait reach its deadline and resume it."""
        assert self.waiting is not None
        woke = self.waiting.kind is WaitKind.SLEEP
        return await self._resume(Resolution("woke" if woke else "timeout", None, "deadline"))

    async def _resume(self, resolution: Resolution) -> TaskResult:
        if self.waiting is None:
            raise RuntimeError("no task is waiting")
        task, answers, calls, taken, tools = self._parked
        return await self._run(task, [*answers, resolution], calls, taken, tools)

    async def message(self, body: str, *, key: str | None = None) -> TaskResult:
        """Deliver an inbox message and run the task it starts."""
        msg = Message(id=f"{len(self.tasks)}-0", body=body, key=key)
        return await self.run("inbox", msg)

    async def stop(self, reason: StopReason = StopReason.SHUTDOWN) -> None:
        """Stop the agent as a daemon would: set ``ctx.stopping`` and call ``on_stop``."""
        self.ctx.stopping = reason
        await self.agent.on_stop(self.ctx, reason)
        self._roundtrip()

    async def _after_step(self, step: int, outcome: Any) -> None:
        self._roundtrip()
        self._saved = self.codec.encode(self.ctx.state)
        self._steps = step

    def _roundtrip(self) -> None:
        # The daemon persists state after each iteration; do the same, so that state
        # that cannot be encoded or decoded fails here rather than in production.
        self.ctx.state = self.codec.decode(self.codec.encode(self.ctx.state))
        self.state = self.ctx.state

    async def _send(self, to: str, body: str) -> str:
        self.sent.append(SentMessage(to, body))
        return f"{len(self.sent)}-0"
