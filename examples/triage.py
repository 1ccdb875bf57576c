"""Two models, one job: a small model triages every question, a larger one answers the hard ones.

``triage`` runs on the cheap local model (``spec.model: default``, the daemon's engine).
For each message it asks that model one constrained question: is this hard? (A message
starting with ``!expert`` skips the question.) Easy ones
it answers itself; hard ones it hands to ``expert``, an agent on the ``large`` Model,
with ``ctx.send``. Both write their answers to the outbox (``config.outbox``), saying
which model answered, and ``agentos usage --by model`` shows what each model cost.

An agent's ``ctx.llm`` is bound to its ``spec.model``, so "use the larger model" is a
message to the agent that runs on it: the hand-over is durable (an inbox message, acked
after the expert's task) and each model's slots and quotas stay its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import anyio.to_thread
import msgspec

from agentos import Agent, Context, Message

__all__ = ["Expert", "Triage", "TriageState"]

DEFAULT_OUTBOX = "./var/triage-outbox.jsonl"
FORCE = "!expert"  # a sender who knows better skips the triage
VERDICT = 'root ::= " easy" | " hard"'
FEW_SHOT = (
    "Question: What is 2 + 2?\nDifficulty: easy\n"
    "Question: Prove that there are infinitely many primes of the form 4k+3.\nDifficulty: hard\n"
    "Question: What colour is the sky?\nDifficulty: easy\n"
)


class TriageState(msgspec.Struct):
    easy: int = 0
    hard: int = 0


async def _record(ctx: Context, question: str, answer: str, by: str) -> None:
    line = json.dumps({"at": time.time(), "question": question, "answer": answer, "by": by})
    path = Path(str(ctx.config.get("outbox", DEFAULT_OUTBOX)))

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(line + "\n")

    await anyio.to_thread.run_sync(write)


async def _answer(ctx: Context, question: str) -> str:
    await ctx.llm.reset()  # each question stands alone: keep the context short
    reply = await ctx.llm.generate(
        f"Question: {question}\nAnswer in one sentence:", max_tokens=48, stop=("\n",)
    )
    return reply.text.strip()


class Triage(Agent):
    """Answers easy questions with the small model; sends hard ones to ``expert``."""

    State = TriageState

    async def act(self, ctx: Context, plan: object) -> object:
        assert isinstance(plan, Message)
        question = plan.body.strip()
        forced = question.startswith(FORCE)
        if forced:
            question = question.removeprefix(FORCE).strip()
        else:
            await ctx.llm.reset()
            verdict = await ctx.llm.generate(
                f"{FEW_SHOT}Question: {question}\nDifficulty:", max_tokens=3, grammar=VERDICT
            )
        if forced or "hard" in verdict.text:
            ctx.state.hard += 1
            await ctx.send(str(ctx.config.get("expert", "expert")), question)
            return "sent to expert"
        ctx.state.easy += 1
        answer = await _answer(ctx, question)
        await _record(ctx, question, answer, ctx.llm.model)
        return answer


class Expert(Agent):
    """Answers what ``triage`` sends it, on the larger model."""

    async def act(self, ctx: Context, plan: object) -> object:
        assert isinstance(plan, Message)
        answer = await _answer(ctx, plan.body)
        await _record(ctx, plan.body, answer, ctx.llm.model)
        return answer
