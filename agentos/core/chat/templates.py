"""Lowering chat turns with tools to plain turns, and rendering them with a built-in template.

Local engines on a base model (llama.cpp in-process or its server, whose templates know
no tools) get the conversation *lowered*: the tools are described in the system
message, past tool calls and results become ordinary turns. Rendering a lowered
conversation with a built-in template (:func:`render`) is append-only: the text of a
conversation is the text of its shorter prefix plus the new turns, so a session
prefills only new turns. Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from agentos.core.chat.reply import ToolSpec

__all__ = [
    "TEMPLATES",
    "generation_prompt",
    "lower_messages",
    "render",
    "render_turn",
    "template_stops",
    "turn_end",
]

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
