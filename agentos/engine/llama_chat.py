"""The old import path of :mod:`agentos.engine.llama.chat` (chat templates and chat state
of the in-process llama engine), kept so existing imports go on working."""

from __future__ import annotations

from agentos.engine.llama.chat import (
    ChatState,
    ChatTemplate,
    TurnPlan,
    load_template,
    output_schema,
    plan_turn,
)

__all__ = ["ChatState", "ChatTemplate", "TurnPlan", "load_template", "output_schema", "plan_turn"]
