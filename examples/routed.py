"""A helpdesk on a route: the small local model answers, the large one when it is unsure.

Each question is answered as JSON ``{"answer": ..., "confident": true|false}`` (the
call's ``response_format``, so a reply that is not that JSON fails the call's own check
and the route escalates by itself). When the model says it is not confident, the agent
asks for a stronger model with ``ctx.llm.escalate`` and asks again. It marks the task
successful or not (``ctx.succeed`` / ``ctx.fail``); the Agent's ``spec.evaluate``
(:func:`judge`) has the last word, and ``agentos usage --by route`` turns the verdicts
into a success rate and a cost per successful task.
"""

from __future__ import annotations

import json
from typing import Any

from agentos import Agent, Context, Message

__all__ = ["ANSWER_SCHEMA", "Helpdesk", "judge"]

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "minLength": 1, "maxLength": 400},
        "confident": {"type": "boolean"},
    },
    "required": ["answer", "confident"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
SYSTEM = (
    "You answer operators' questions about running agents in one or two sentences, as "
    'JSON: {"answer": "...", "confident": true or false}.'
)


def _parsed(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Helpdesk(Agent):
    """Answers each message; escalates when the model is not confident."""

    async def act(self, ctx: Context, plan: Any) -> Any:
        if not isinstance(plan, Message):
            return None
        await ctx.llm.reset()  # each question stands alone
        turns = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": plan.body}]
        reply = await ctx.llm.chat(turns, response_format=FORMAT, max_tokens=120)
        answer = _parsed(reply.text)
        if answer is not None and not answer.get("confident") and ctx.llm.escalate("not confident"):
            again = [{"role": "user", "content": "Answer again, as the expert."}]
            reply = await ctx.llm.chat(again, response_format=FORMAT, max_tokens=120)
            answer = _parsed(reply.text)
        if answer is None or not str(answer.get("answer", "")).strip():
            ctx.fail("no usable answer")
        else:
            ctx.succeed(reason=f"answered by {reply.served_by or ctx.llm.model}")
        ctx.set_result({"answer": (answer or {}).get("answer"), "by": reply.served_by})
        return reply.text


def judge(task: Any, result: Any) -> dict[str, Any]:
    """Pass when the task produced a non-empty answer; the reason says by which model."""
    data = json.loads(result) if isinstance(result, str) and result else result
    if not isinstance(data, dict) or not str(data.get("answer") or "").strip():
        return {"verdict": "fail", "reason": "no answer"}
    return {"verdict": "pass", "reason": f"answered by {data.get('by') or 'the first model'}"}
