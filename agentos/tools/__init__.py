"""Tools an agent acts through, and the toolbox that runs the calls its model asks for.

A tool is a Python function (sync or async) decorated with :func:`tool`: its parameters'
JSON Schema comes from the type hints (pydantic), its description from the docstring.
A :class:`Toolbox` holds an agent's tools (``Agent.tools``, and later the tools of its
tool servers) and runs one :class:`~agentos.core.chat.ToolCall` at a time with
:meth:`Toolbox.call`, returning the ``tool`` message the model reads next.

Nothing a tool or a model does here is an agent crash: an unknown tool, arguments that
fail the schema or are not JSON, a tool that raises or runs past its timeout, all come
back to the model as an error result it can act on. Sync tools run in a worker thread,
never on the event loop (a blocked loop stalls every agent of the daemon).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

import anyio
import pydantic
import pydantic_core

from agentos.core.chat import TOOL_NAME, ToolCall, ToolSpec, validate_tools
from agentos.core.durations import parse_duration
from agentos.telemetry import Telemetry

__all__ = [
    "Away",
    "Outcome",
    "Tool",
    "ToolError",
    "Toolbox",
    "ToolsArg",
    "as_tool",
    "tool",
    "toolbox_of",
]

log = logging.getLogger("agentos.tools")
_T = TypeVar("_T")


class Away(Protocol):
    """What runs tool calls while the engine slot may be lent (the runtime provides it)."""

    async def __call__(self, fn: Callable[[], Awaitable[_T]], /) -> _T: ...


DEFAULT_TIMEOUT_S = 30.0
MAX_RESULT_CHARS = 100_000  # a tool's result beyond this is cut: it goes into the context
_INJECTED = "ctx"  # a parameter of this name receives the agent's Context, not the model's value


class ToolError(Exception):
    """Raise it from a tool to give the model an error result with just this message."""


def _description(fn: Callable[..., Any]) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


def _strip_titles(node: Any) -> Any:
    # pydantic titles every property ("A", "B"): noise in a small model's prompt.
    if isinstance(node, dict):
        return {
            k: _strip_titles(v)
            for k, v in node.items()
            if not (k == "title" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [_strip_titles(v) for v in node]
    return node


@dataclass(frozen=True, eq=False)
class Tool:
    """A function the model may call. Build it with :func:`tool`."""

    fn: Callable[..., Any]
    name: str
    description: str
    parameters: Mapping[str, Any]
    timeout_s: float | None
    idempotent: bool
    approval: bool
    arguments_model: type[pydantic.BaseModel] = field(repr=False)
    takes_ctx: bool = field(default=False, repr=False)

    @property
    def spec(self) -> ToolSpec:
        """What the model is told about the tool."""
        return ToolSpec(self.name, self.description, self.parameters)

    @property
    def is_async(self) -> bool:
        """Whether the function is a coroutine function (else it runs in a thread)."""
        return inspect.iscoroutinefunction(self.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function directly, as if undecorated (for tests and reuse)."""
        return self.fn(*args, **kwargs)

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments checked and converted by the schema; raises pydantic's
        ValidationError."""
        model = self.arguments_model.model_validate(dict(arguments))
        return {k: getattr(model, k) for k in type(model).model_fields}

    async def invoke(self, arguments: Mapping[str, Any], ctx: Any = None) -> Any:
        """Validate ``arguments`` and run the function (a sync one in a worker thread),
        within the tool's timeout (TimeoutError past it). Returns what it returns."""
        kwargs = self.validate(arguments)
        if self.takes_ctx:
            kwargs[_INJECTED] = ctx
        with anyio.fail_after(self.timeout_s):
            if self.is_async:
                return await self.fn(**kwargs)
            # abandon_on_cancel: past its timeout the model gets an error at once; the
            # thread cannot be killed and finishes on its own.
            return await anyio.to_thread.run_sync(
                functools.partial(self.fn, **kwargs), abandon_on_cancel=True
            )


def _build(
    fn: Callable[..., Any],
    *,
    name: str | None,
    description: str | None,
    timeout: float | str | None,
    idempotent: bool,
    approval: bool,
) -> Tool:
    if not callable(fn):
        raise TypeError(f"@tool decorates a function, not {fn!r}")
    tool_name: str = name or str(getattr(fn, "__name__", ""))
    where = f"tool {tool_name!r} ({getattr(fn, '__qualname__', fn)!r})"
    if not TOOL_NAME.match(tool_name):
        raise ValueError(
            f"{where}: name is not a valid function name "
            "(letters, digits, _ and -, 64 at most, not starting with a digit)"
        )
    timeout_s = parse_duration(timeout) if isinstance(timeout, str) else timeout
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"{where}: timeout must be positive")
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception as e:
        raise ValueError(f"{where}: its type hints do not resolve: {e}") from None
    fields: dict[str, Any] = {}
    takes_ctx = False
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"{where}: *{p.name} cannot be described to a model")
        if p.name == _INJECTED:
            takes_ctx = True
            continue
        annotation = hints.get(p.name, Any)
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (annotation, default)
    try:
        model = pydantic.create_model(
            f"{tool_name}_arguments",
            __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=False),
            **fields,
        )
        schema = _strip_titles(model.model_json_schema())
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as e:
        first = str(e).splitlines()[0]
        raise ValueError(
            f"{where}: its parameters cannot be described as JSON Schema: {first}"
        ) from None
    schema.setdefault("properties", {})
    schema["type"] = "object"
    return Tool(
        fn=fn,
        name=tool_name,
        description=description if description is not None else _description(fn),
        parameters=schema,
        timeout_s=timeout_s,
        idempotent=idempotent,
        approval=approval,
        arguments_model=model,
        takes_ctx=takes_ctx,
    )


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | str | None = "30s",
    idempotent: bool = False,
    approval: bool = False,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float | str | None = "30s",
    idempotent: bool = False,
    approval: bool = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a function a tool: ``@tool`` or ``@tool(name=…, timeout="30s", idempotent=False,
    approval=False)``.

    The parameters' JSON Schema comes from the type hints (pydantic types, ``Annotated``
    with ``Field(description=…)``), the description from the docstring's first
    paragraph. A parameter named ``ctx`` receives the agent's Context and is not shown
    to the model. ``timeout`` is seconds or a duration ("2m"; None: no limit);
    ``idempotent`` says the tool may safely run again for the same call; ``approval``
    that a person must approve each call (enforced by tool servers' approval policy).
    Raises ValueError, naming the tool, when its name or parameters cannot be described.
    """

    def wrap(f: Callable[..., Any]) -> Tool:
        return _build(
            f,
            name=name,
            description=description,
            timeout=timeout,
            idempotent=idempotent,
            approval=approval,
        )

    return wrap(fn) if fn is not None else wrap


def as_tool(value: Tool | Callable[..., Any]) -> Tool:
    """``value`` if it is a :class:`Tool`, else the function made one with defaults."""
    return value if isinstance(value, Tool) else tool(value)


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
        text = text[:MAX_RESULT_CHARS] + f"… [cut: {len(text)} characters in all]"
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
    outcome: str  # ok | unknown_tool | bad_arguments | error | timeout

    @property
    def ok(self) -> bool:
        """Whether the tool ran and returned."""
        return self.outcome == "ok"


class Toolbox:
    """An agent's tools by name; runs the calls its model makes (``ctx.tools``)."""

    def __init__(
        self,
        tools: Iterable[Tool | Callable[..., Any]] = (),
        *,
        telemetry: Telemetry | None = None,
        context: Any = None,
        away: Away | None = None,
    ) -> None:
        self._tools: dict[str, Tool] = {}
        self.telemetry = telemetry or Telemetry.disabled()
        self.context = context  # handed to tools that take ``ctx``
        # Runs tool calls while the agent's engine slot may be lent (the runtime's); None:
        # just run them.
        self.away = away
        self.extend(tools)

    def extend(self, tools: Iterable[Tool | Callable[..., Any]]) -> None:
        """Add tools; raises ValueError (nothing added) for a bad tool or a taken name."""
        made = [as_tool(t) for t in tools]
        validate_tools([*self.specs(), *(t.spec for t in made)])
        for t in made:
            self._tools[t.name] = t

    def add(self, value: Tool | Callable[..., Any]) -> Tool:
        """Add one tool (a function is made one); returns it."""
        made = as_tool(value)
        self.extend([made])
        return made

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, or None."""
        return self._tools.get(name)

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
        the model reads); cancellation propagates. While it runs, the agent's engine
        slot may serve another agent (see README "Agents with tools").
        """
        return (await self.call_all([call]))[0]

    async def call_all(self, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
        """Run one reply's calls concurrently; their ``tool`` messages in the order of the
        calls."""
        results: list[dict[str, Any]] = [{} for _ in calls]

        async def one(i: int, call: ToolCall) -> None:
            results[i] = (await self.run(call)).message

        async def every() -> list[dict[str, Any]]:
            if len(calls) == 1:
                await one(0, calls[0])
                return results
            async with anyio.create_task_group() as tg:
                for i, call in enumerate(calls):
                    tg.start_soon(one, i, call)
            return results

        return await (self.away(every) if self.away is not None else every())

    async def run(self, call: ToolCall) -> Outcome:
        """Like :meth:`call`, also saying how the call went."""
        started = time.perf_counter()
        t = self.telemetry
        attributes: dict[str, Any] = {
            "gen_ai.tool.call.id": call.id,
            "gen_ai.tool.type": "function",
        }
        if t.capture_content:
            attributes["gen_ai.tool.call.arguments"] = call.raw_arguments
        with t.tool(call.name, **attributes) as span:
            text, outcome = await self._run(call)
            if outcome != "ok":
                span.set_attribute("error.type", outcome)
            if t.capture_content:
                span.set_attribute("gen_ai.tool.call.result", text)
        t.tool_calls.add(1, {"gen_ai.tool.name": call.name, "agentos.tool.outcome": outcome})
        log.debug(
            "tool %s (%s): %s in %.3fs", call.name, call.id, outcome, time.perf_counter() - started
        )
        message = {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": text}
        return Outcome(message, outcome)

    async def _run(self, call: ToolCall) -> tuple[str, str]:
        found = self._tools.get(call.name)
        if found is None:
            known = ", ".join(self._tools) or "none"
            return f"error: unknown tool {call.name!r} (available: {known})", "unknown_tool"
        if call.error is not None:
            raw = call.raw_arguments[:500]
            return f"error: {call.error}; the arguments were: {raw}", "bad_arguments"
        try:
            value = await found.invoke(call.arguments, self.context)
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
    return Toolbox(tools, telemetry=like.telemetry, context=like.context, away=like.away)
