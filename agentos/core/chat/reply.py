"""What a chat call carries and returns: tool specs, tool calls, token usage, the reply.

Every engine answers with a :class:`Reply` (the assistant message, how it ended, what it
cost); tool calls travel in it as :class:`ToolCall` whether the server produced them
natively or a local model produced them under a constraint. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FINISH_REASONS", "ROLES", "TOOL_NAME", "Reply", "TokenUsage", "ToolCall", "ToolSpec"]

ROLES = ("system", "user", "assistant", "tool")
FINISH_REASONS = ("stop", "length", "tool_calls")
TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
"""What a tool name may be: a function name as the OpenAI API accepts it (64 at most)."""


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """What a model is told about a tool: its name, what it does, its parameters' schema."""

    name: str
    description: str
    parameters: Mapping[str, Any]

    def openai(self) -> dict[str, Any]:
        """The ``tools[]`` entry of an OpenAI request."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model asked for: ``arguments`` parsed, ``raw_arguments`` as produced.

    ``error`` is set when the model's arguments were not a JSON object (servers do
    produce that); such a call is answered with an error result, never run.
    """

    id: str
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    raw_arguments: str = ""
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.raw_arguments and self.error is None:
            object.__setattr__(
                self, "raw_arguments", json.dumps(dict(self.arguments), ensure_ascii=False)
            )

    def openai(self) -> dict[str, Any]:
        """The ``tool_calls[]`` entry of an assistant message."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.raw_arguments},
        }

    @classmethod
    def parse(cls, call_id: str, name: str, raw: str) -> ToolCall:
        """A call from a server's JSON text; malformed text gives a call with ``error``."""
        try:
            value = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            return cls(call_id, name, {}, raw, f"arguments are not valid JSON: {e}")
        if not isinstance(value, dict):
            return cls(call_id, name, {}, raw, "arguments are not a JSON object")
        return cls(call_id, name, value, raw)


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one call as the server counts them: processed input, reused, generated."""

    input_tokens: int = 0  # prompt tokens this call processed (cached ones excluded)
    cached_tokens: int = 0  # prompt tokens reused from the cache
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Everything the call cost in tokens (input, cached and output)."""
        return self.input_tokens + self.cached_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Reply:
    """The assistant message a chat call returned, with how it ended and what it cost."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str = "stop"  # stop | length | tool_calls
    usage: TokenUsage = field(default_factory=TokenUsage)
    time_to_first_token_s: float = 0.0
    duration_s: float = 0.0
    served_by: str = ""  # the model that answered when not the agent's own (a fallback)
    routed: str = ""  # why a route chose that model (empty: the agent has one model)
    served_at: str = ""  # where it ran (server.address), when the engine knows

    @property
    def text(self) -> str:
        """``content``, or ``""`` when the reply holds only tool calls."""
        return self.content or ""

    @property
    def input_tokens(self) -> int:
        """Shorthand for ``usage.input_tokens``."""
        return self.usage.input_tokens

    @property
    def output_tokens(self) -> int:
        """Shorthand for ``usage.output_tokens``."""
        return self.usage.output_tokens

    @property
    def cached_tokens(self) -> int:
        """Shorthand for ``usage.cached_tokens``."""
        return self.usage.cached_tokens

    def message(self) -> dict[str, Any]:
        """The reply as the ``assistant`` message the conversation keeps."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.openai() for c in self.tool_calls]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for a wait's replay log)."""
        return {
            "content": self.content,
            "tool_calls": [
                {"id": c.id, "name": c.name, "raw": c.raw_arguments} for c in self.tool_calls
            ],
            "finish_reason": self.finish_reason,
            "usage": [self.usage.input_tokens, self.usage.cached_tokens, self.usage.output_tokens],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reply:
        """Inverse of :meth:`to_dict`."""
        calls = tuple(
            ToolCall.parse(str(c["id"]), str(c["name"]), str(c["raw"]))
            for c in data.get("tool_calls") or ()
        )
        i, c, o = [*list(data.get("usage") or ()), 0, 0, 0][:3]
        content = data.get("content")
        return cls(
            None if content is None else str(content),
            calls,
            str(data.get("finish_reason") or "stop"),
            TokenUsage(int(i), int(c), int(o)),
        )
