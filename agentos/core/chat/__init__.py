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

One module per job: :mod:`~agentos.core.chat.reply` (the data),
:mod:`~agentos.core.chat.validation` (checks of an agent's turns and tools),
:mod:`~agentos.core.chat.constrained` (constrained tool output) and
:mod:`~agentos.core.chat.templates` (lowering and rendering). This module re-exports
the names callers use.

All of it is pure: no I/O, no clock.
"""

from agentos.core.chat.constrained import (
    MAX_GRAMMAR_ITEMS,
    MAX_GRAMMAR_LENGTH,
    close_schema,
    grammar_safe,
    parse_constrained,
    tool_call_schema,
)
from agentos.core.chat.reply import (
    FINISH_REASONS,
    ROLES,
    TOOL_NAME,
    Reply,
    TokenUsage,
    ToolCall,
    ToolSpec,
)
from agentos.core.chat.templates import (
    TEMPLATES,
    generation_prompt,
    lower_messages,
    render,
    render_turn,
    template_stops,
    turn_end,
)
from agentos.core.chat.validation import tool_choice_of, validate_messages, validate_tools

__all__ = [
    "FINISH_REASONS",
    "MAX_GRAMMAR_ITEMS",
    "MAX_GRAMMAR_LENGTH",
    "ROLES",
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
