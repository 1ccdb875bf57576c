"""Agents the benchmarks run (files starting with "_" are not benchmarks)."""

from __future__ import annotations

from typing import Any

import agentos


class Noop(agentos.Agent):
    """Never idle: every loop iteration does nothing (measures the runtime's own cost)."""

    async def observe(self, ctx: agentos.Context) -> Any:
        return True


class Dormant(agentos.Agent):
    """Always idle: observe finds nothing (measures what an idle agent costs to hold)."""

    async def observe(self, ctx: agentos.Context) -> Any:
        return None


class Answerer(agentos.Agent):
    """Answers each message with one short model call (a task that does real work)."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        completion = await ctx.llm.generate(plan.body, max_tokens=4)
        await ctx.llm.reset()
        return completion.text


class Inbox(agentos.Agent):
    """The SDK's default loop: take a message, do nothing with it (a no-op inbox task)."""
