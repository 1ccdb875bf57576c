"""Constrained tool calls: the JSON Schema a local model's reply is held to, and reading it.

A base model knows no tools; its output is constrained to :func:`tool_call_schema` (one
branch per tool with its parameters, plus a final-answer branch) and parsed back by
:func:`parse_constrained`. The schemas are bounded so that a grammar built from them
stays small enough for llama.cpp. Pure: no I/O, no clock.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from agentos.core.chat.reply import ToolCall, ToolSpec

__all__ = [
    "MAX_GRAMMAR_ITEMS",
    "MAX_GRAMMAR_LENGTH",
    "close_schema",
    "grammar_safe",
    "parse_constrained",
    "tool_call_schema",
]

MAX_GRAMMAR_LENGTH = 512
"""The longest string bound a grammar gets: llama.cpp expands ``maxLength: N`` into N
nested rules; 5,000 failed to parse and 100,000 (a file-writing tool's content) crashed
the process, engine and daemon with it. A longer bound is cut to this (the output stays
valid for the schema; ``max_tokens`` cuts long strings anyway)."""
MAX_GRAMMAR_ITEMS = 64
"""The same for ``maxItems`` / ``minItems``."""


def grammar_safe(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` whose length and item bounds a grammar can hold (see
    :data:`MAX_GRAMMAR_LENGTH`)."""
    out = copy.deepcopy(dict(schema))
    limits = {
        "maxLength": MAX_GRAMMAR_LENGTH,
        "minLength": MAX_GRAMMAR_LENGTH,
        "maxItems": MAX_GRAMMAR_ITEMS,
        "minItems": MAX_GRAMMAR_ITEMS,
    }

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, cap in limits.items():
                value = node.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > cap:
                    node[key] = cap
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(out)
    return out


def close_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` with ``additionalProperties: false`` on every object that does
    not say otherwise (a small model given an open object invents keys until the token
    cap), and bounds a grammar can hold (:func:`grammar_safe`)."""
    out = grammar_safe(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(out)
    return out


def tool_call_schema(tools: Sequence[ToolSpec], tool_choice: str = "auto") -> dict[str, Any]:
    """The JSON Schema a local model's reply is constrained to.

    One branch ``{"tool": NAME, "arguments": {...}}`` per tool (only the named one when
    ``tool_choice`` names a tool), plus ``{"answer": text}`` unless the choice is
    ``required`` or a tool's name. Every object is closed (:func:`close_schema`).
    """
    chosen = [t for t in tools if tool_choice in ("auto", "required") or t.name == tool_choice]
    branches: list[dict[str, Any]] = []
    for t in chosen:
        branches.append(
            {
                "type": "object",
                "properties": {
                    "tool": {"const": t.name},
                    "arguments": close_schema(t.parameters),
                },
                "required": ["tool", "arguments"],
                "additionalProperties": False,
            }
        )
    if tool_choice == "auto" or not branches:
        branches.append(
            {
                "type": "object",
                "properties": {"answer": {"type": "string"}},
                "required": ["answer"],
                "additionalProperties": False,
            }
        )
    return branches[0] if len(branches) == 1 else {"oneOf": branches}


def parse_constrained(text: str, call_id: str) -> tuple[str | None, tuple[ToolCall, ...]]:
    """Read a reply produced under :func:`tool_call_schema`: ``(answer, ())`` or
    ``(None, (call,))``. Text that is not such JSON (cut at the token cap) is returned
    as plain content, so the caller sees exactly what the model wrote."""
    try:
        value = json.loads(text)
    except ValueError:
        return text, ()
    if isinstance(value, dict) and isinstance(value.get("tool"), str):
        args = value.get("arguments")
        raw = json.dumps(args, ensure_ascii=False) if args is not None else "{}"
        return None, (ToolCall.parse(call_id, value["tool"], raw),)
    if isinstance(value, dict) and isinstance(value.get("answer"), str):
        return value["answer"], ()
    return text, ()
