"""Agents the route tests run (entrypoints ``tests.route_agents:NAME``)."""

from __future__ import annotations

import json
from typing import Any

import agentos


class JsonAsker(agentos.Agent):
    """Asks the model for JSON about each message; the result names who answered."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        assert isinstance(plan, agentos.Message)
        reply = await ctx.llm.chat(
            [{"role": "user", "content": plan.body}],
            response_format={"type": "json_object"},
            max_tokens=16,
        )
        ctx.set_result({"text": reply.text, "by": reply.served_by, "why": reply.routed})
        return reply.text


class Escalator(agentos.Agent):
    """Asks twice; between the calls it asks for a stronger model when told to."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        assert isinstance(plan, agentos.Message)
        first = await ctx.llm.chat([{"role": "user", "content": plan.body}], max_tokens=8)
        escalated = ctx.llm.escalate("the question is hard") if "hard" in plan.body else False
        second = await ctx.llm.chat([{"role": "user", "content": "and then?"}], max_tokens=8)
        ctx.set_result(
            json.dumps([first.served_by, second.served_by, escalated, second.input_tokens])
        )
        return second.text


class Judged(agentos.Agent):
    """Asks the model; succeeds when the answer is the expected text in the message."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        assert isinstance(plan, agentos.Message)
        reply = await ctx.llm.chat([{"role": "user", "content": plan.body}], max_tokens=8)
        if reply.text == "right":
            ctx.succeed(reason="the expected answer")
        else:
            ctx.fail(f"answered {reply.text!r}")
        return reply.text
