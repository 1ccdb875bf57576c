"""Checks of what an agent hands a chat call: tools, ``tool_choice`` and new turns.

An agent's messages and tools are checked before any engine sees them, so a bad turn
fails in the agent's code with the index of the first bad item, the same way on every
engine. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agentos.core.chat.reply import ROLES, TOOL_NAME, ToolCall, ToolSpec

__all__ = ["tool_choice_of", "validate_messages", "validate_tools"]


def validate_tools(tools: Sequence[ToolSpec]) -> None:
    """Raise ValueError naming the first tool with a bad name, a duplicate or a bad schema."""
    seen: set[str] = set()
    for i, t in enumerate(tools):
        if not isinstance(t.name, str) or not TOOL_NAME.match(t.name):
            raise ValueError(
                f"tools[{i}]: name {t.name!r} is not a valid function name "
                "(letters, digits, _ and -, 64 at most, not starting with a digit)"
            )
        if t.name in seen:
            raise ValueError(f"tools[{i}]: two tools are named {t.name!r}")
        seen.add(t.name)
        params = t.parameters
        if not isinstance(params, Mapping) or params.get("type") != "object":
            raise ValueError(
                f"tools[{i}] ({t.name}): parameters must be a JSON Schema of type object"
            )
        try:
            json.dumps(dict(params))
        except (TypeError, ValueError) as e:
            raise ValueError(f"tools[{i}] ({t.name}): parameters are not JSON: {e}") from None


def tool_choice_of(choice: str | None, tools: Sequence[ToolSpec]) -> str:
    """Normalise ``tool_choice``: ``auto``, ``required``, ``none`` or a tool's name."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("auto", "required", "none"):
        if choice == "required" and not tools:
            raise ValueError('tool_choice="required" needs at least one tool')
        return choice
    if not any(t.name == choice for t in tools):
        raise ValueError(
            f"tool_choice {choice!r} is not auto, required, none or one of the tools "
            f"({', '.join(t.name for t in tools) or 'none given'})"
        )
    return choice


def _tool_calls_of(i: int, m: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw = m.get("tool_calls")
    if raw is None:
        return []
    if not isinstance(raw, list | tuple):
        raise ValueError(f"messages[{i}].tool_calls must be a list")
    calls: list[dict[str, Any]] = []
    for j, c in enumerate(raw):
        where = f"messages[{i}].tool_calls[{j}]"
        if isinstance(c, ToolCall):
            calls.append(c.openai())
            continue
        if not isinstance(c, Mapping):
            raise ValueError(f"{where} must be an object with id and function")
        fn = c.get("function")
        if not isinstance(c.get("id"), str) or not c["id"] or not isinstance(fn, Mapping):
            raise ValueError(f"{where} needs an id and a function {{name, arguments}}")
        name, args = fn.get("name"), fn.get("arguments", "")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.function.name must be a non-empty string")
        if isinstance(args, Mapping):
            args = json.dumps(dict(args), ensure_ascii=False)
        if not isinstance(args, str):
            raise ValueError(f"{where}.function.arguments must be a JSON string")
        calls.append(
            {"id": c["id"], "type": "function", "function": {"name": name, "arguments": args}}
        )
    return calls


def validate_messages(
    messages: Iterable[Mapping[str, Any]], history: Sequence[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Check new turns against the conversation so far; return them normalised.

    Raises ValueError naming the first bad item: an unknown role, content that is not
    text, a ``tool`` message whose ``tool_call_id`` no earlier assistant call has.
    """
    if isinstance(messages, str | bytes | Mapping):
        raise ValueError("messages must be a list of {role, content} objects")
    call_ids = {c["id"] for m in history for c in m.get("tool_calls") or ()}
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {role!r} (expected {', '.join(ROLES)})")
        calls = _tool_calls_of(i, m) if role == "assistant" else []
        if m.get("tool_calls") is not None and role != "assistant":
            raise ValueError(f"messages[{i}]: only assistant messages carry tool_calls")
        if content is None and not (role == "assistant" and calls):
            raise ValueError(f"messages[{i}] ({role}) needs content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be text, got {type(content).__name__}")
        msg: dict[str, Any] = {"role": role, "content": content}
        if calls:
            msg["tool_calls"] = calls
            call_ids.update(c["id"] for c in calls)
        if role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or cid not in call_ids:
                raise ValueError(
                    f"messages[{i}]: tool message's tool_call_id {cid!r} answers no earlier "
                    "assistant tool call"
                )
            msg["tool_call_id"] = cid
            if isinstance(m.get("name"), str):
                msg["name"] = m["name"]
        out.append(msg)
    return out
