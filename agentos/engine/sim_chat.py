"""The old import path of :mod:`agentos.engine.sim.chat` (chat on the ``sim`` engine),
kept so existing imports go on working."""

from __future__ import annotations

from agentos.engine.sim.chat import (
    Scripted,
    SimChat,
    chat_state,
    default_arguments,
    plain_spec,
    read_chat_state,
    scripted_reply,
    with_ids,
)

__all__ = [
    "Scripted",
    "SimChat",
    "chat_state",
    "default_arguments",
    "plain_spec",
    "read_chat_state",
    "scripted_reply",
    "with_ids",
]
