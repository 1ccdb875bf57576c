"""The agent and the evaluator of ``bench/routing.py``."""

from __future__ import annotations

import json
import time
from typing import Any

import agentos


class Solver(agentos.Agent):
    """Answers "what is A + B?" as JSON through its model (or route)."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        assert isinstance(plan, agentos.Message)
        started = time.perf_counter()
        reply = await ctx.llm.chat(
            [{"role": "user", "content": plan.body}],
            response_format={"type": "json_object"},
            max_tokens=16,
        )
        ctx.set_result(
            {
                "question": plan.body,
                "answer": reply.text,
                "by": reply.served_by,
                "ttft_s": reply.time_to_first_token_s,  # of the model that answered
                # From the call to its answer, rejected attempts included: the answer
                # comes whole here, so this is the first token as the agent sees it.
                "call_s": time.perf_counter() - started,
            }
        )
        return reply.text


def judge(task: Any, result: Any) -> bool:
    """Right when the answer is the JSON ``{"answer": A + B}``."""
    data = json.loads(result) if isinstance(result, str) else result
    a, b = (int(x) for x in data["question"].split("what is ")[1].rstrip("?").split(" + "))
    try:
        answer = json.loads(data["answer"])
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("answer") == a + b
