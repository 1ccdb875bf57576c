"""The old import path of :mod:`agentos.engine.openai.wire` (how the ``openai`` engine
reads an OpenAI-compatible server), kept so existing imports go on working."""

from __future__ import annotations

from agentos.engine.openai.wire import (
    CallParts,
    Conversation,
    Reading,
    conversation_of,
    decode_conversation,
    finish_reason_of,
    tool_choice_body,
    usage_of,
)

__all__ = [
    "CallParts",
    "Conversation",
    "Reading",
    "conversation_of",
    "decode_conversation",
    "finish_reason_of",
    "tool_choice_body",
    "usage_of",
]
