"""Agents of the tool-server tests: one calls tools itself, one lets the model call them."""

from __future__ import annotations

import json

from agentos import Agent, Context, Message
from agentos.core.chat import ToolCall


class ToolCaller(Agent):
    """A message ``TOOL {json args}`` [``; TOOL {json args}`` ...] calls those tools in
    order (call ids are the task's, so a run of the task again names the same calls);
    the result is their results, one per line."""

    async def act(self, ctx: Context, plan: Message) -> str:
        out = []
        for i, part in enumerate(plan.body.split(";")):
            name, _, args = part.strip().partition(" ")
            call = ToolCall(f"{ctx.task.id}-{i}", name, json.loads(args or "{}"))
            result = await ctx.tools.call(call)
            out.append(str(result["content"]))
        return "\n".join(out)


class ModelToolUser(Agent):
    """A message is a task for the model, with the agent's tools (``ctx.llm.run``)."""

    async def act(self, ctx: Context, plan: Message) -> str:
        reply = await ctx.llm.run([{"role": "user", "content": plan.body}], max_steps=6)
        return reply.content
