"""Agents for the model tests: they record what each model call reported."""

from __future__ import annotations

from typing import Any

import msgspec

import agentos


class CallLog(msgspec.Struct):
    replies: list[str] = msgspec.field(default_factory=list)
    cached: list[int] = msgspec.field(default_factory=list)
    prefilled: list[int] = msgspec.field(default_factory=list)
    context: list[int] = msgspec.field(default_factory=list)  # context tokens before each call


class Chatter(agentos.Agent):
    """Asks the model about every message (``config.maxTokens``, default 4)."""

    State = CallLog

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        assert isinstance(plan, agentos.Message)
        ctx.state.context.append(ctx.llm.context_tokens)
        completion = await ctx.llm.generate(
            plan.body, max_tokens=int(ctx.config.get("maxTokens", 4))
        )
        ctx.state.replies.append(completion.text)
        ctx.state.cached.append(completion.cached_tokens)
        ctx.state.prefilled.append(completion.input_tokens)
        return completion.text
