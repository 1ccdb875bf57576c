"""The author's types: the :class:`Agent` base class and its durable state.

An agent is a class with four async methods, called in a loop by the runtime:
``observe`` (is there anything to do? ``None`` means no, and the agent goes idle),
``plan``, ``act`` and ``learn``. Its durable state is declared as a type
(:class:`StateCodec` saves and restores it). The runtime (a daemon, or
:mod:`agentos.testing`) builds the :class:`~agentos.sdk.context.Context` the agent is
handed; nothing here does I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import msgspec
import pydantic

from agentos.core.lifecycle import StopReason
from agentos.sdk.context import Context
from agentos.tools import Tool

__all__ = ["Agent", "StateCodec", "agent_logger", "freeze_config"]


class Agent:
    """Base class of every agent. Override the four loop methods; all are optional.

    Declare durable state with a class attribute ``State``: a ``msgspec.Struct`` or a
    pydantic model whose fields all have defaults. ``ctx.state`` is an instance of it,
    saved to Redis after every loop iteration that changed it and restored when the
    agent restarts, hibernates or moves to another daemon. Without ``State``,
    ``ctx.state`` is a plain JSON-serialisable dict.
    """

    State: ClassVar[type[Any] | None] = None
    tools: ClassVar[Sequence[Tool | Callable[..., Any]]] = ()
    """The agent's tools (functions decorated with :func:`agentos.tool`); ``ctx.tools``
    holds them, and ``ctx.llm.run`` offers them to the model by default."""

    async def observe(self, ctx: Context) -> Any | None:
        """Look at the world; return what to work on, or None when there is nothing to do."""
        return ctx.take_message()

    async def plan(self, ctx: Context, observation: Any) -> Any:
        """Decide what to do about ``observation``. Returns the plan handed to ``act``."""
        return observation

    async def act(self, ctx: Context, plan: Any) -> Any:
        """Carry out ``plan``. Returns the outcome handed to ``learn``."""
        return plan

    async def learn(self, ctx: Context, outcome: Any) -> None:
        """Update ``ctx.state`` from ``outcome``."""

    async def on_stop(self, ctx: Context, reason: StopReason) -> None:
        """Called once before the agent stops (shutdown, delete, respec, hibernate)."""


class StateCodec:
    """Encodes and decodes an agent class's durable state (msgspec JSON bytes)."""

    def __init__(self, state_type: type[Any] | None) -> None:
        if state_type is not None and not (
            (isinstance(state_type, type) and issubclass(state_type, msgspec.Struct))
            or (isinstance(state_type, type) and issubclass(state_type, pydantic.BaseModel))
        ):
            raise TypeError(
                f"Agent.State must be a msgspec.Struct or a pydantic model, not {state_type!r}"
            )
        self.state_type = state_type

    def new(self) -> Any:
        """A fresh state value (the type's defaults, or an empty dict)."""
        if self.state_type is None:
            return {}
        return self.state_type()

    def encode(self, value: Any) -> bytes:
        """Serialise ``value``; raises TypeError when it does not fit the declared type."""
        if isinstance(value, pydantic.BaseModel):
            return value.model_dump_json().encode()
        try:
            return msgspec.json.encode(value)
        except (TypeError, msgspec.EncodeError) as e:
            raise TypeError(f"agent state is not serialisable: {e}") from None

    def decode(self, data: bytes) -> Any:
        """Rebuild a state value from :meth:`encode`'s bytes."""
        if self.state_type is None:
            return msgspec.json.decode(data)
        if issubclass(self.state_type, pydantic.BaseModel):
            return self.state_type.model_validate_json(data)
        return msgspec.json.decode(data, type=self.state_type)


def agent_logger(name: str) -> logging.LoggerAdapter[logging.Logger]:
    """The logger handed to an agent as ``ctx.log`` (logger ``agentos.agent.NAME``)."""
    return logging.LoggerAdapter(logging.getLogger(f"agentos.agent.{name}"), {"agent": name})


def freeze_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view of an agent's config, so agent code cannot mutate the spec."""
    return MappingProxyType(dict(config))
