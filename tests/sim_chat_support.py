"""Tools, turns and a chat helper shared by the SimEngine.chat tests
(tests/unit/engine/test_sim_chat*.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agentos.core.chat import Reply, ToolCall, ToolSpec, lower_messages, render, validate_messages
from agentos.engine import SimEngine

AGENT = "agent"
HOUR = 3600.0  # a latency that keeps a call in the engine until it is cancelled

ADD = ToolSpec(
    "add",
    "Add two integers.",
    {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    },
)
SEARCH = ToolSpec(
    "search",
    "Search the notes.",
    {
        "type": "object",
        "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["query"],
    },
)
TOOLS = (ADD, SEARCH)
SYSTEM = {"role": "system", "content": "You are a careful agent."}


def opened(**options: Any) -> SimEngine:
    """A SimEngine with ``options`` and the agent's session open."""
    engine = SimEngine(**options)
    engine.open_session(AGENT)
    return engine


def user(text: str) -> dict[str, Any]:
    """A user turn."""
    return {"role": "user", "content": text}


def result(call: ToolCall, content: str) -> dict[str, Any]:
    """The tool turn that answers ``call``."""
    return {"role": "tool", "tool_call_id": call.id, "content": content}


async def chat(
    engine: SimEngine, *messages: Mapping[str, Any], session: str = AGENT, **kw: Any
) -> Reply:
    """A chat as the SDK makes it: new turns validated against the conversation first."""
    new = validate_messages(messages, engine.conversation(session))
    return await engine.chat(session, new, **kw)


def rendered_tokens(engine: SimEngine, tools: Sequence[ToolSpec] = ()) -> tuple[int, ...]:
    """The whole conversation lowered and rendered at once, as tokens."""
    lowered = lower_messages(engine.conversation(AGENT), tools)
    return tuple(engine.encode(render("plain", lowered, add_generation_prompt=False)))
