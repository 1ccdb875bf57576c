"""An agent that proposes an action, asks a person for approval, and acts only on yes.

Send it a request (``agentos send approval-gate "rotate the staging API keys"``); it asks
the model for a one-line plan, then ``ctx.ask``s whether to carry it out. The task is
parked in Redis while it waits: the agent gives its engine slot back and no daemon holds
it. Answer with ``agentos pending`` / ``agentos answer approval-gate TASK --yes`` (or
``--no``); after ``timeout`` (config, default 1h) the answer is "no". Only a yes appends
the plan to the actions log (``config.actions``), which stands for doing the thing.

Code before a wait runs again when the task resumes: the plan comes from the model call
made before the wait, served from its record, so the plan approved is the plan performed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgspec

import agentos
from agentos.sdk import Context, Message

PROMPT = (
    "Turn each request into one concrete, reversible step.\n"
    "Request: free up disk space on the build host\n"
    "Step: delete build caches older than 7 days under /var/cache/build\n"
    "Request: {request}\n"
    "Step:"
)


class GateState(msgspec.Struct):
    approved: int = 0
    refused: int = 0


class ApprovalGate(agentos.Agent):
    State = GateState

    async def act(self, ctx: Context, message: Message) -> str:
        request = message.body.strip()
        reply = await ctx.llm.generate(PROMPT.format(request=request), max_tokens=40, stop=["\n"])
        plan = reply.text.strip() or request
        answer = await ctx.ask(
            f"Carry out: {plan}?",
            choices=["yes", "no"],
            timeout=ctx.config.get("timeout", "1h"),
            default="no",
        )
        if answer != "yes":
            ctx.state.refused += 1
            return f"not done (answer: {answer}): {plan}"
        record = {"at": time.time(), "request": request, "done": plan}
        _append_line(Path(ctx.config.get("actions", "./var/actions.jsonl")), json.dumps(record))
        ctx.state.approved += 1
        return f"done: {plan}"


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
