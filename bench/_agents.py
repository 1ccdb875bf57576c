"""Agents the benchmarks run (files starting with "_" are not benchmarks)."""

from __future__ import annotations

import os
from typing import Any, Literal

import anyio

import agentos
from bench._workload import page_text


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


# bench/tool_loop.py: a 6-step tool loop whose tool takes a second and returns a page.
SYSTEM = (
    "You are a careful research assistant working through a long report, one page at a "
    "time. The report describes the maintenance history of a river lock: its gates, the "
    "pumps that fill and drain its chamber, the inspections done each season, and the "
    "repairs made after floods. To read a page, call the tool with the page number; read "
    "the pages in order, starting at page 1, and do not skip pages. After each page, decide "
    "whether you need the next one. When you have read enough, answer with a short summary "
    "of what the pages say about the condition of the gates and the pumps, naming the "
    "seasons in which repairs were made and what was repaired. Keep your answer under fifty "
    "words. Do not invent details that are not in the pages. If a page is missing or the "
    "tool fails, say so in your answer instead of guessing what the page would have said. "
    "Be brief in every step: the tool calls cost time, and other assistants are waiting "
    "for the same machine."
)


@agentos.tool(timeout="30s")
async def fetch_page(ctx: agentos.Context, number: Literal[1, 2, 3, 4, 5, 6, 7, 8]) -> str:
    """Fetch one page of the report by its number."""
    await anyio.sleep(float(os.environ.get("BENCH_TOOL_SECONDS", "1.0")))
    return page_text(ctx.name, number)


TOOL = fetch_page


class ToolLooper(agentos.Agent):
    """One message: ``config.steps`` chats, the tool called (required) in all but the last."""

    tools = (fetch_page,)

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        await ctx.llm.reset()
        steps = int(ctx.config.get("steps", 6))
        pending: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": plan.body},
        ]
        reply = None
        for step in range(steps):
            last = step == steps - 1
            reply = await ctx.llm.chat(
                pending,
                tools=ctx.tools,
                tool_choice="none" if last else "required",
                max_tokens=32 if last else 64,
            )
            if last or not reply.tool_calls:
                break
            pending = await ctx.tools.call_all(reply.tool_calls)
        return reply.text if reply is not None else ""
