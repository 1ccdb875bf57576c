r"""The toolbox: an agent's tools by name, and how the calls its model asks for are run.

A :class:`Toolbox` holds an agent's tools (``Agent.tools``, and the tools of its MCP
servers) and runs the :class:`~agentos.core.chat.ToolCall`\ s a model asks for,
returning the ``tool`` messages the model reads next. Nothing a tool or a model does
here is an agent crash: an unknown tool, arguments that fail the schema or are not JSON,
a tool that raises or runs past its timeout, all come back to the model as an error
result it can act on. A tool server that cannot answer is
:class:`~agentos.tools.base.ToolServerUnavailable`, which the runtime treats as the
infrastructure's fault.

In a task the toolbox keeps a :class:`Ledger`: a call that needs a person's approval
parks the task first (like ``ctx.ask``), and every call's result is recorded (durably,
by the runtime) as soon as it returns, so a task that resumes or runs again replays it
instead of running the tool twice; a call of a tool that is not ``idempotent`` that
was cut short gives "interrupted: outcome unknown".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pydantic
import pydantic_core

from agentos.core.chat import ToolCall, ToolSpec, validate_tools
from agentos.core.waits import (
    APPROVAL,
    TOOL_RECORD_CUT,
    WaitKind,
    WaitLog,
    WaitSpec,
    deadline_of,
    tool_key,
)
from agentos.telemetry import Telemetry
from agentos.tools.base import (
    MAX_RESULT_CHARS,
    ArgumentsInvalid,
    Away,
    Tool,
    ToolError,
    ToolServerUnavailable,
    as_tool,
)

__all__ = ["Approval", "Ledger", "Outcome", "Toolbox", "ToolsArg", "toolbox_of"]

log = logging.getLogger("agentos.tools")


def _result_text(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    else:
        try:
            text = pydantic_core.to_json(value).decode()
        except pydantic_core.PydanticSerializationError:
            text = str(value)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + TOOL_RECORD_CUT
    return text


def _validation_text(e: pydantic.ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False):
        where = ".".join(str(x) for x in err["loc"]) or "(arguments)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one call came to: the tool message and how it went (``ok`` or the error kind)."""

    message: dict[str, Any]
    # ok | unknown_tool | bad_arguments | error | timeout | denied | interrupted
    outcome: str
    replayed: bool = False  # recorded by an earlier run of the task: not run again

    @property
    def ok(self) -> bool:
        """Whether the tool ran and returned."""
        return self.outcome == "ok"


@dataclass(frozen=True, slots=True)
class Approval:
    """How a call that needs a person's approval waits: for how long, and what no
    answer by then means (``deny`` or ``approve``)."""

    timeout_s: float | None = 3600.0
    on_timeout: str = "deny"


@dataclass
class Ledger:
    """What a toolbox records its calls in during a task (the runtime builds it).

    ``log`` is the task's wait log (its answers, model calls and tool ledger);
    ``persist`` makes the log durable (a fenced write of the task's record) and is
    awaited after each change, before the task does anything else; ``approval`` says
    whether a tool needs a person's approval, and how that waits (None: it does not).
    """

    log: WaitLog
    persist: Callable[[], Awaitable[None]] | None = None
    approval: Callable[[Tool], Approval | None] = field(
        default=lambda t: (
            Approval(t.approval_timeout_s, t.approval_on_timeout) if t.approval else None
        )
    )


_INTERRUPTED = (
    "interrupted: outcome unknown ({name} was running when its daemon or tool server "
    "stopped; it is not run twice, check its effect before calling it again)"
)


class Toolbox:
    """An agent's tools by name; runs the calls its model makes (``ctx.tools``)."""

    def __init__(
        self,
        tools: Iterable[Tool | Callable[..., Any]] = (),
        *,
        telemetry: Telemetry | None = None,
        context: object = None,
        away: Away | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self._tools: dict[str, Tool] = {}
        self._aliases: dict[str, str] = {}  # SERVER.TOOL -> the name the model sees
        self._groups: dict[str, list[str]] = {}  # a server -> its tools' names here
        self.telemetry = telemetry or Telemetry.disabled()
        self.context = context  # handed to tools that take ``ctx``
        # Runs tool calls while the agent's engine slot may be lent (the runtime's); None:
        # just run them.
        self.away = away
        self.ledger = ledger  # in a task: approvals and the record of calls
        self.extend(tools)

    def extend(self, tools: Iterable[Tool | Callable[..., Any]]) -> None:
        """Add tools; raises ValueError (nothing added) for a bad tool or a taken name."""
        made = [as_tool(t) for t in tools]
        validate_tools([*self.specs(), *(t.spec for t in made)])
        for t in made:
            self._tools[t.name] = t
            if t.qualified_name:
                self._aliases[t.qualified_name] = t.name

    def add(self, value: Tool | Callable[..., Any]) -> Tool:
        """Add one tool (a function is made one); returns it."""
        made = as_tool(value)
        self.extend([made])
        return made

    def set_group(self, group: str, tools: Sequence[Tool]) -> None:
        """Make ``tools`` the toolbox's tools of ``group`` (a server), replacing the ones
        it had; raises ValueError (nothing changed) when a name clashes."""
        old = self._groups.get(group, [])
        kept = [t for n, t in self._tools.items() if n not in old]
        validate_tools([*(t.spec for t in kept), *(t.spec for t in tools)])
        for name in old:
            tool = self._tools.pop(name, None)
            if tool is not None and tool.qualified_name:
                self._aliases.pop(tool.qualified_name, None)
        self._groups[group] = []
        for t in tools:
            self._tools[t.name] = t
            self._groups[group].append(t.name)
            if t.qualified_name:
                self._aliases[t.qualified_name] = t.name

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __getitem__(self, name: str) -> Tool:
        found = self.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def get(self, name: str) -> Tool | None:
        """The tool called ``name`` (or ``SERVER.TOOL``), or None."""
        found = self._tools.get(name)
        if found is None and name in self._aliases:
            found = self._tools.get(self._aliases[name])
        return found

    @property
    def names(self) -> list[str]:
        """The tools' names, in the order they were added."""
        return list(self._tools)

    def specs(self) -> list[ToolSpec]:
        """What the model is told about each tool."""
        return [t.spec for t in self._tools.values()]

    async def call(self, call: ToolCall) -> dict[str, Any]:
        """Run one call and return the ``tool`` message to pass in the next ``chat``.

        Never raises for the tool's or the model's faults (they become an error result
        the model reads); cancellation propagates, and so do a tool server that cannot
        answer (:class:`ToolServerUnavailable`) and a wait for approval (the task parks).
        While it runs, the agent's engine slot may serve another agent (see README
        "Agents with tools").
        """
        return (await self.call_all([call]))[0]

    async def call_all(self, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
        """Run one reply's calls concurrently; their ``tool`` messages in the order of the
        calls. Calls that need approval are asked for first, in order: the first one not
        answered yet parks the task (nothing has run then)."""
        refusals = [self._approve(call) for call in calls]
        results: list[dict[str, Any]] = [{} for _ in calls]
        errors: list[BaseException] = []

        async def one(i: int, call: ToolCall) -> None:
            try:
                results[i] = (await self.run(call, refusal=refusals[i])).message
            except Exception as e:  # kept: the others finish (and are recorded) first
                errors.append(e)

        async def every() -> list[dict[str, Any]]:
            if len(calls) == 1:
                await one(0, calls[0])
            else:
                async with anyio.create_task_group() as tg:
                    for i, call in enumerate(calls):
                        tg.start_soon(one, i, call)
            if errors:  # the runtime's own error first; then a server that is down
                errors.sort(key=lambda e: isinstance(e, ToolServerUnavailable))
                raise errors[0]
            return results

        return await (self.away(every) if self.away is not None else every())

    def _approve(self, call: ToolCall) -> str | None:
        """None when ``call`` may run; else the refusal the model reads. Raises
        WaitRequested (the task parks) while a person has not answered."""
        found = self.get(call.name)
        ledger = self.ledger
        if found is None or call.error is not None or ledger is None:
            return None
        rule = ledger.approval(found)
        if rule is None:
            return None
        try:
            found.validate(call.arguments)
        except (pydantic.ValidationError, ArgumentsInvalid):
            return None  # never asked: the model gets the error instead
        default = "yes" if rule.on_timeout == "approve" else "no"
        shown = call.raw_arguments if len(call.raw_arguments) <= 2000 else call.raw_arguments[:2000]
        spec = WaitSpec(
            WaitKind.ASK,
            f"Allow {found.display_name} to run with {shown}?",
            APPROVAL,
            deadline_of(ledger.log.clock(), rule.timeout_s),
            default,
            True,
            found.display_name,
            shown,
        )
        r = ledger.log.resolution(spec)
        value = spec.default if r.outcome == "timeout" else r.value
        if value == "yes":
            return None
        if r.outcome == "timeout":
            who = f"nobody answered in time (onTimeout: {rule.on_timeout})"
        else:
            who = f"by {r.by or 'a person'}"
        reason = f": {r.reason}" if r.reason else ""
        return f"refused: {found.display_name} was not approved, {who}{reason}. It did not run."

    async def run(self, call: ToolCall, *, refusal: str | None = None) -> Outcome:
        """Like :meth:`call` (one call), also saying how the call went. ``refusal``: a
        person refused the call (see :meth:`call_all`); it is recorded, not run."""
        started = time.perf_counter()
        t = self.telemetry
        found = self.get(call.name)
        name = found.display_name if found is not None else call.name
        attributes: dict[str, Any] = {
            "gen_ai.tool.call.id": call.id,
            "gen_ai.tool.type": "extension" if found is not None and found.server else "function",
        }
        if found is not None and found.server:
            attributes["mcp.method.name"] = "tools/call"
            attributes["agentos.tool.server"] = found.server
        if found is not None and found.span_attributes is not None:
            attributes.update(found.span_attributes())
        if t.capture_content:
            attributes["gen_ai.tool.call.arguments"] = call.raw_arguments
        with t.tool(name, **attributes) as span:
            text, outcome, replayed = await self._run(call, found, refusal)
            if outcome != "ok":
                span.set_attribute("error.type", outcome)
            if replayed:
                span.set_attribute("agentos.tool.replayed", True)
            if t.capture_content:
                span.set_attribute("gen_ai.tool.call.result", text)
        labels = {"gen_ai.tool.name": name, "agentos.tool.outcome": outcome}
        t.tool_calls.add(1, labels)
        took = time.perf_counter() - started
        if not replayed:
            t.tool_duration.record(took, {"gen_ai.tool.name": name})
        log.debug("tool %s (%s): %s in %.3fs", name, call.id, outcome, took)
        message = {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": text}
        return Outcome(message, outcome, replayed)

    async def _run(
        self, call: ToolCall, found: Tool | None, refusal: str | None
    ) -> tuple[str, str, bool]:
        if found is None:
            known = ", ".join(self._tools) or "none"
            return f"error: unknown tool {call.name!r} (available: {known})", "unknown_tool", False
        if call.error is not None:
            raw = call.raw_arguments[:500]
            return f"error: {call.error}; the arguments were: {raw}", "bad_arguments", False
        try:
            kwargs = found.validate(call.arguments)
        except pydantic.ValidationError as e:
            text = f"error: invalid arguments for {call.name}: {_validation_text(e)}"
            return text, "bad_arguments", False
        except ArgumentsInvalid as e:
            return f"error: invalid arguments for {call.name}: {e}", "bad_arguments", False
        ledger = self.ledger
        key = tool_key(call.id, found.name, call.raw_arguments)
        entry = ledger.log.tool_entry(key) if ledger is not None else None
        if entry is not None and entry.get("state") == "done":
            return str(entry.get("content", "")), str(entry.get("outcome", "ok")), True
        if refusal is not None:
            return await self._record(key, found, refusal, "denied"), "denied", False
        if entry is not None and not found.idempotent:  # started, never finished
            text = _INTERRUPTED.format(name=found.display_name)
            return await self._record(key, found, text, "interrupted"), "interrupted", False
        if ledger is not None and not found.idempotent:
            ledger.log.tool_started(key, found.display_name)
            if ledger.persist is not None:
                await ledger.persist()
        text, outcome = await self._invoke(call, found, kwargs)
        return await self._record(key, found, text, outcome), outcome, False

    async def _record(self, key: str, found: Tool, text: str, outcome: str) -> str:
        """Keep the call's result in the ledger, durably, before anything else."""
        ledger = self.ledger
        if ledger is None:
            return text
        ledger.log.tool_done(key, found.display_name, text, outcome)
        if ledger.persist is not None:
            await ledger.persist()
        return str(ledger.log.tools[key]["content"])

    async def _invoke(
        self, call: ToolCall, found: Tool, kwargs: Mapping[str, Any]
    ) -> tuple[str, str]:
        try:
            value = await found.invoke(kwargs, self.context, validated=True)
        except ToolServerUnavailable:
            raise  # the infrastructure's: the task is retried, the call not recorded done
        except pydantic.ValidationError as e:
            return (
                f"error: invalid arguments for {call.name}: {_validation_text(e)}",
                "bad_arguments",
            )
        except TimeoutError:
            return f"error: {call.name} timed out after {found.timeout_s:g} s", "timeout"
        except ToolError as e:
            return f"error: {e}", "error"
        except Exception as e:
            log.info("tool %s raised %s: %s", call.name, type(e).__name__, e)
            return f"error: {call.name} raised {type(e).__name__}: {e}", "error"
        return _result_text(value), "ok"


ToolsArg = Toolbox | Iterable[Tool | Callable[..., Any]]
"""What ``tools=`` takes: a toolbox (``ctx.tools``) or a list of tools or functions."""


def toolbox_of(tools: ToolsArg, like: Toolbox) -> Toolbox:
    """A toolbox for ``tools``: itself when it is one, else a new one with ``like``'s
    telemetry, context and slot lending."""
    if isinstance(tools, Toolbox):
        return tools
    return Toolbox(
        tools, telemetry=like.telemetry, context=like.context, away=like.away, ledger=like.ledger
    )
