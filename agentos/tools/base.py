r"""Tools: what a tool is, how a Python function becomes one, and the errors tools raise.

A tool is a Python function (sync or async) decorated with :func:`tool`: its parameters'
JSON Schema comes from the type hints (pydantic), its description from the docstring. A
tool server's tools (:mod:`agentos.tools.mcp`) are :class:`Tool`\ s too, checked by the
server's JSON Schema. Running them is the toolbox's job (:mod:`agentos.tools.box`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

import anyio
import pydantic

from agentos.core.chat import TOOL_NAME, ToolSpec
from agentos.core.durations import parse_duration
from agentos.core.waits import MAX_TOOL_RECORD_CHARS

__all__ = [
    "ArgumentsInvalid",
    "Away",
    "Tool",
    "ToolError",
    "ToolServerUnavailable",
    "as_tool",
    "tool",
]

log = logging.getLogger("agentos.tools")
_T = TypeVar("_T")


class Away(Protocol):
    """What runs tool calls while the engine slot may be lent (the runtime provides it)."""

    async def __call__(self, fn: Callable[[], Awaitable[_T]], /) -> _T: ...


DEFAULT_TIMEOUT_S = 30.0
# A tool's result beyond this is cut: it goes into the context, and into the ledger.
MAX_RESULT_CHARS = MAX_TOOL_RECORD_CHARS
_INJECTED = "ctx"  # a parameter of this name receives the agent's Context, not the model's value


class ToolError(Exception):
    """Raise it from a tool to give the model an error result with just this message."""


class ArgumentsInvalid(ValueError):
    """A call's arguments do not fit the tool's schema (the message says where)."""


class ToolServerUnavailable(Exception):
    """A tool server cannot answer (not started, gone, hung): the infrastructure's
    fault, not the agent's; the runtime retries the task later. ``server`` names it."""

    def __init__(self, message: str, server: str = "") -> None:
        self.server = server
        super().__init__(message)


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
    arguments_model: type[pydantic.BaseModel] | None = field(repr=False)
    takes_ctx: bool = field(default=False, repr=False)
    # A server's tool: its arguments are checked by its JSON Schema (this validator),
    # agent code may call it SERVER.TOOL (``qualified_name``).
    validator: Callable[[Mapping[str, Any]], dict[str, Any]] | None = field(
        default=None, repr=False
    )
    qualified_name: str = ""
    server: str = ""
    # How a call that needs approval waits (a server's tools: its approval settings).
    approval_timeout_s: float | None = 3600.0
    approval_on_timeout: str = "deny"
    # More attributes for a call's span (a server's tool: its MCP session).
    span_attributes: Callable[[], Mapping[str, Any]] | None = field(default=None, repr=False)

    @property
    def display_name(self) -> str:
        """The name people read (``SERVER.TOOL`` for a server's tool)."""
        return self.qualified_name or self.name

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
        ValidationError (a Python tool) or ArgumentsInvalid (a server's tool)."""
        if self.arguments_model is None:
            return self.validator(arguments) if self.validator is not None else dict(arguments)
        model = self.arguments_model.model_validate(dict(arguments))
        return {k: getattr(model, k) for k in type(model).model_fields}

    async def invoke(
        self, arguments: Mapping[str, Any], ctx: object = None, *, validated: bool = False
    ) -> Any:
        """Validate ``arguments`` (unless ``validated``: they are :meth:`validate`'s) and run
        the function (a sync one in a worker thread), within the tool's timeout
        (TimeoutError past it). Returns what it returns."""
        kwargs = dict(arguments) if validated else self.validate(arguments)
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
    ``idempotent`` says the tool may safely run again for the same call (one cut short
    by a crash runs again; else the model is told its outcome is unknown); ``approval``
    that a person must approve each call (the task waits, like ``ctx.ask``).
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
