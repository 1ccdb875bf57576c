"""Agents that wait durably, for the wait tests: each logs what ran to a file in its config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import agentos
from agentos.sdk import Context, WaitTimeout


def note(ctx: Context, line: str) -> None:
    path = ctx.config.get("log")
    if path:
        with Path(path).open("a") as f:
            f.write(line + "\n")


class Approver(agentos.Agent):
    """Asks yes/no about each message; acts only on yes."""

    async def act(self, ctx: Context, message: Any) -> Any:
        note(ctx, f"before {message.body}")
        timeout = ctx.config.get("timeout")
        kwargs: dict[str, Any] = {}
        if "default" in ctx.config:
            kwargs["default"] = ctx.config["default"]
        try:
            answer = await ctx.ask(
                f"do {message.body}?", choices=["yes", "no"], timeout=timeout, **kwargs
            )
        except WaitTimeout:
            note(ctx, "timeout")
            return "timed out"
        note(ctx, f"after {answer}")
        return f"{message.body}: {answer}"


class TwoQuestions(agentos.Agent):
    """Asks two questions in a row and calls the model before each."""

    async def act(self, ctx: Context, message: Any) -> Any:
        first = await ctx.llm.generate(f"Q1 {message.body}", max_tokens=4)
        note(ctx, f"llm1 {ctx.llm.usage.calls}")
        a = await ctx.ask("first?", choices=["a", "b"])
        await ctx.llm.generate("Q2", max_tokens=4)
        note(ctx, f"llm2 {ctx.llm.usage.calls}")
        b = await ctx.ask("second?")  # free text
        note(ctx, f"done {a} {b}")
        return f"{a}/{b}/{first.text}"


class EventWaiter(agentos.Agent):
    """Waits for the event named in its message and returns its data."""

    async def act(self, ctx: Context, message: Any) -> Any:
        note(ctx, "waiting")
        data = await ctx.wait_for(message.body, timeout=ctx.config.get("timeout"))
        note(ctx, f"got {data}")
        return f"got {data}"


class EventSender(agentos.Agent):
    """Sends the event its message names to the agent in its config."""

    async def act(self, ctx: Context, message: Any) -> Any:
        ended = await ctx.send_event(ctx.config["to"], message.body, {"from": ctx.name})
        return f"sent, ended a wait: {ended}"


class Sleeper(agentos.Agent):
    """Sleeps for its message's duration, then says so."""

    async def act(self, ctx: Context, message: Any) -> Any:
        note(ctx, "sleeping")
        await ctx.sleep(message.body)
        note(ctx, "awake")
        return "slept"


class LateAsker(agentos.Agent):
    """Takes its message in one loop iteration and asks about it in the next, so the
    message is acknowledged before the task waits."""

    async def observe(self, ctx: Context) -> Any:
        message = ctx.take_message()
        if message is not None:
            return "took"
        if ctx.task.message is not None and ctx.state.get("asked") != ctx.task.id:
            return "ask"
        return None

    async def act(self, ctx: Context, plan: Any) -> Any:
        if plan == "took":
            return "took"
        answer = await ctx.ask("go?", choices=["yes", "no"])
        ctx.state["asked"] = ctx.task.id
        assert ctx.task.message is not None
        return f"{ctx.task.message.body}: {answer}"
