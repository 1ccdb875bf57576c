"""Chat messages and tool calls as plain data: validation, constrained tool output, templates.

Every engine speaks OpenAI-shaped messages (``system``, ``user``, ``assistant`` with
optional ``tool_calls``, ``tool`` with ``tool_call_id``) and answers with a
:class:`Reply`. Servers with native tool support get the messages and tools as they
are. Local engines on a base model (llama.cpp in-process or its server, whose templates
know no tools) get them *lowered*: the tools are described in the system message, past
tool calls and results become ordinary turns, and the model's output is constrained to
:func:`tool_call_schema` (one branch per tool with its parameters, plus a final-answer
branch), then parsed back by :func:`parse_constrained`. Rendering a lowered conversation
with a built-in template (:func:`render`) is append-only: the text of a conversation is
the text of its shorter prefix plus the new turns, so a session prefills only new turns.

All of it is pure: no I/O, no clock.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FINISH_REASONS",
    "TEMPLATES",
    "TOOL_NAME",
    "Reply",
    "TokenUsage",
    "ToolCall",
    "ToolSpec",
    "close_schema",
    "generation_prompt",
    "grammar_safe",
    "lower_messages",
    "parse_constrained",
    "render",
    "render_turn",
    "template_stops",
    "tool_call_schema",
    "tool_choice_of",
    "turn_end",
    "validate_messages",
    "validate_tools",
]

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


# ---------------------------------------------------------------------- validation


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


# ---------------------------------------------------------------------- constrained tool calls


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


# ---------------------------------------------------------------------- lowering and templates

TEMPLATES = ("gemma", "chatml", "plain")
"""Built-in chat templates, for models whose GGUF carries none (or a Model's choice)."""

_TOOLS_INTRO = (
    "You can call these tools. To call one, reply with JSON "
    '{"tool": NAME, "arguments": {...}}; to answer, reply with {"answer": TEXT}.\n'
)


def _describe_tools(tools: Sequence[ToolSpec]) -> str:
    lines = [_TOOLS_INTRO]
    for t in tools:
        params = json.dumps(dict(t.parameters), ensure_ascii=False, sort_keys=True)
        lines.append(f"- {t.name}: {t.description or '(no description)'} Parameters: {params}\n")
    return "".join(lines)


def lower_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[ToolSpec] = (),
    *,
    described: Sequence[ToolSpec] | None = None,
) -> list[dict[str, str]]:
    """Turn chat turns with tools into plain ``system``/``user``/``assistant`` turns.

    ``described`` is the tool list the conversation so far already describes (None: the
    conversation starts with these turns). The tools are described at the end of the
    first system message of a new conversation (one is added when there is none); when
    the tools differ from ``described`` later, a system turn describing them is added
    before the new turns, so the text stays append-only. An assistant tool call becomes
    the JSON the constrained output produces; a tool result becomes a user turn saying
    which call it answers. The result depends only on its input, so the lowered text of
    a conversation is stable from call to call (a server's prefix cache keeps hitting).
    Engines keep the model's own text for the turns it generated, not a re-lowering.
    """
    out: list[dict[str, str]] = []
    if described is None:
        pending = bool(tools)
    else:
        pending = bool(tools) and list(tools) != list(described)
        if pending:
            out.append({"role": "system", "content": _describe_tools(tools)})
            pending = False
    for m in messages:
        role = m["role"]
        if role == "system":
            content = str(m.get("content") or "")
            if pending:
                desc = _describe_tools(tools)
                content = f"{content}\n\n{desc}" if content else desc
                pending = False
            out.append({"role": "system", "content": content})
            continue
        if pending:
            out.append({"role": "system", "content": _describe_tools(tools)})
            pending = False
        if role == "assistant":
            calls = m.get("tool_calls") or ()
            if calls:
                parts = []
                for c in calls:
                    fn = c["function"]
                    try:
                        args = json.loads(fn["arguments"] or "{}")
                    except ValueError:
                        args = fn["arguments"]
                    parts.append(json.dumps({"tool": fn["name"], "arguments": args}))
                text = "\n".join(parts)
            else:
                content = m.get("content") or ""
                text = json.dumps({"answer": content}) if tools else content
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            name = f" {m['name']}" if m.get("name") else ""
            out.append(
                {
                    "role": "user",
                    "content": f"Result of tool call{name} {m.get('tool_call_id')}:\n"
                    f"{m.get('content') or ''}",
                }
            )
        else:
            out.append({"role": "user", "content": str(m.get("content") or "")})
    if pending:
        out.insert(0, {"role": "system", "content": _describe_tools(tools)})
    return out


def _merge_system(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Gemma's template has no system role: its text goes before the next user turn."""
    out: list[dict[str, str]] = []
    pending = ""
    for m in messages:
        if m["role"] == "system":
            pending += m["content"] + "\n\n"
            continue
        if m["role"] == "user" and pending:
            out.append({"role": "user", "content": pending + m["content"]})
            pending = ""
            continue
        out.append(dict(m))
    if pending:
        out.append({"role": "user", "content": pending.rstrip("\n")})
    return out


def render_turn(template: str, role: str, content: str) -> str:
    """One complete turn (a plain ``system``/``user``/``assistant`` message) as text."""
    if template == "gemma":
        who = "model" if role == "assistant" else "user"
        return f"<start_of_turn>{who}\n{content}<end_of_turn>\n"
    if template == "chatml":
        return f"<|im_start|>{role}\n{content}<|im_end|>\n"
    if template == "plain":
        return f"{role}: {content}\n"
    raise ValueError(f"unknown chat template {template!r} (built-in: {', '.join(TEMPLATES)})")


def generation_prompt(template: str) -> str:
    """The text that opens the assistant's turn, which the model continues."""
    return {
        "gemma": "<start_of_turn>model\n",
        "chatml": "<|im_start|>assistant\n",
        "plain": "assistant:",
    }[template]


def turn_end(template: str) -> str:
    """What closes an assistant turn after the generated content."""
    return {"gemma": "<end_of_turn>\n", "chatml": "<|im_end|>\n", "plain": "\n"}[template]


def template_stops(template: str) -> tuple[str, ...]:
    """Stop strings that end a generated assistant turn."""
    return {
        "gemma": ("<end_of_turn>", "<start_of_turn>"),
        "chatml": ("<|im_end|>", "<|im_start|>"),
        "plain": ("\nuser:", "\nsystem:"),
    }[template]


def render(
    template: str, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """A lowered conversation as one prompt; append-only in the number of messages.

    ``render(t, m[:k]) + render(t, m[k:])`` equals ``render(t, m)`` whenever ``m[k]``
    is not a user turn following system text (gemma folds system into the next user
    turn): engines render new turns on their own and prefill only those.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r} (built-in: {', '.join(TEMPLATES)})")
    turns = _merge_system(messages) if template == "gemma" else list(messages)
    text = "".join(render_turn(template, m["role"], m["content"]) for m in turns)
    return text + generation_prompt(template) if add_generation_prompt else text
