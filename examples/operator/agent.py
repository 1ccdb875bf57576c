"""An operator agent: takes a task from its inbox, works it through MCP tools, reports.

The OpenManus kind of always-on agent, on agentos: each inbox message is a task. The
model plans and acts with the tools of the ``workspace`` ToolServer (list, read and
write files, run allow-listed commands, in its own directory) through ``ctx.llm.run``;
the ToolServer asks a person before ``write_file`` and ``run`` (the task waits, holding
no slot and no MCP session, until ``agentos answer``); every call's result is recorded
as it returns, so a task that resumes or runs again after a crash never repeats one.
The result says what the agent did, call by call, and what it answers.

On the local base model (the default) tool calls come from constrained output, so they
are well-formed but not wise: the first step must call a tool (``tool_choice:
required``), after that the model may answer. Point ``spec.model`` at any
OpenAI-compatible Model for real work; the agent is the same.
"""

from __future__ import annotations

import json
from typing import Any

from agentos import Agent, Context, Message

__all__ = ["Operator"]

SYSTEM = (
    "You are an operator with a workspace directory. Do the task you are given with your "
    "tools: look at the files first, then read, write or run what the task needs. Writing "
    "a file and running a command need a person's approval; if one is refused, say so. "
    "When done, answer with one short paragraph saying what you did."
)
MAX_STEPS = 8


class Operator(Agent):
    """Works each inbox message through its tools and replies with what it did."""

    async def act(self, ctx: Context, plan: Message) -> dict[str, Any]:
        steps = int(ctx.config.get("maxSteps", MAX_STEPS))
        reply = await ctx.llm.run(
            [
                {"role": "system", "content": str(ctx.config.get("system", SYSTEM))},
                {"role": "user", "content": plan.body},
            ],
            max_steps=steps,
            tool_choice="required",
            max_tokens=int(ctx.config.get("maxTokens", 256)),
        )
        actions = _actions(_since(ctx.llm.messages, plan.body))
        unfinished = [c.name for c in reply.tool_calls]
        answer = (reply.content or "").strip()
        return {
            "answer": answer or ("(stopped at the step limit)" if unfinished else ""),
            "actions": actions,
            **({"stoppedBefore": unfinished} if unfinished else {}),
        }


def _since(messages: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """The turns after this task's own (the last user turn that is the task): a task that
    resumed after an approval finds its earlier turns in the conversation already."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user" and messages[i].get("content") == task:
            return messages[i + 1 :]
    return messages


def _actions(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each tool call of the conversation with its result, in order."""
    results = {m.get("tool_call_id"): m for m in messages if m.get("role") == "tool"}
    out = []
    for m in messages:
        for call in m.get("tool_calls") or ():
            fn = call.get("function", {})
            result = results.get(call.get("id"), {}).get("content", "(not run)")
            try:
                arguments = json.loads(fn.get("arguments") or "{}")
            except ValueError:
                arguments = fn.get("arguments")
            out.append(
                {
                    "tool": fn.get("name"),
                    "arguments": arguments,
                    "result": str(result)[:500],
                }
            )
    return out
