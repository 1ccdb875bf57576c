"""An agent that answers the messages sent to its inbox (``agentos send inbox-assistant "..."``).

It exists to show a message-driven agent, and the pydantic flavour of durable state
(:mod:`examples.folder_digest` shows the msgspec one). A few commands are handled
locally, without the model, because a lookup needs no inference and costs no tokens:

* ``remember KEY=VALUE``, ``recall KEY`` (``recall`` alone lists the keys), ``forget KEY``
* ``stats`` and ``help``

Anything else is a question for the model; the facts it was told to remember are given
to the model as context. Every answer is appended to the outbox (``config.outbox``,
default ``./var/outbox.jsonl``, one JSON object per line with the message id, question
and answer) where a person or a program can read it, and the last 20 are kept in state.
The task's result is the answer's text, so ``agentos send inbox-assistant "..." --wait``
prints the answer itself.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio.to_thread
from pydantic import BaseModel, Field

from agentos import Agent, Context, Message

__all__ = ["Answer", "AssistantState", "InboxAssistant"]

MAX_ANSWERS = 20
MAX_FACTS = 100
MAX_VALUE_CHARS = 500
MAX_QUESTION_CHARS = 1_000
# A small model is easily swamped; a handful of facts is all the prompt carries.
FACTS_IN_PROMPT = 10
ANSWER_MAX_TOKENS = 60
DEFAULT_OUTBOX = "./var/outbox.jsonl"
# A key is one word, so "recall the time we met" is a question rather than a lookup.
_KEY_RE = re.compile(r"[\w.-]{1,64}")

HELP = (
    "Commands: remember KEY=VALUE, recall KEY, recall, forget KEY, stats, help "
    "(a KEY is one word). "
    "Anything else is answered by the model."
)

SYSTEM = "The assistant answers each question correctly in one short sentence."
# Turns that show a base model the shape of an answer: short, on one line, to the point.
EXAMPLES: tuple[dict[str, str], ...] = (
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "How many minutes are there in two hours?"},
    {"role": "assistant", "content": "There are 120 minutes in two hours."},
)

Command = Literal["remember", "recall", "forget", "stats", "help", "ask", "invalid"]


class Answer(BaseModel):
    """One answered message, as kept in state and written to the outbox."""

    id: str
    question: str
    answer: str
    source: Literal["local", "model"]
    at: float


class AssistantState(BaseModel):
    """Durable state: what the user asked to remember, recent answers and counters."""

    memory: dict[str, str] = Field(default_factory=dict)
    answers: list[Answer] = Field(default_factory=list)
    handled: int = 0
    model_answers: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """What a message asks for."""

    message: Message
    command: Command
    key: str = ""
    value: str = ""  # remember: the value; ask: the question; invalid: what is wrong


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a message, and the change to memory it implies."""

    answer: Answer
    remember: tuple[str, str] | None = None
    forget: str | None = None


class InboxAssistant(Agent):
    """Answers inbox messages: local memory commands, the model for everything else."""

    State = AssistantState

    async def observe(self, ctx: Context) -> Message | None:
        # Only messages wake this agent; the start task finds none and it goes idle.
        return ctx.take_message()

    async def plan(self, ctx: Context, observation: Message) -> Plan:
        return parse(observation)

    async def act(self, ctx: Context, plan: Plan) -> Reply:
        state: AssistantState = ctx.state
        reply = await self._answer(ctx, state, plan)
        outbox = Path(str(ctx.config.get("outbox", DEFAULT_OUTBOX)))
        # Written before learn saves state: if the daemon dies in between, the message
        # is delivered again (at least once) and answered twice; readers can drop
        # duplicates by id, which is better than an answer that was never written.
        await anyio.to_thread.run_sync(_append_line, outbox, reply.answer.model_dump_json())
        ctx.set_result(reply.answer.answer)  # what `send --wait` prints, not the record
        return reply

    async def learn(self, ctx: Context, outcome: Reply) -> None:
        state: AssistantState = ctx.state
        if outcome.remember is not None:
            key, value = outcome.remember
            state.memory[key] = value
        if outcome.forget is not None:
            state.memory.pop(outcome.forget, None)
        state.answers.append(outcome.answer)
        # State is saved after every message and carried through hibernation: bound it.
        del state.answers[:-MAX_ANSWERS]
        state.handled += 1
        if outcome.answer.source == "model":
            state.model_answers += 1
        ctx.log.info(
            "answered %s (%s): %s",
            outcome.answer.id,
            outcome.answer.source,
            _shorten(outcome.answer.answer, 80),
        )

    async def _answer(self, ctx: Context, state: AssistantState, plan: Plan) -> Reply:
        message = plan.message

        def local(text: str) -> Answer:
            return Answer(
                id=message.id, question=message.body, answer=text, source="local", at=time.time()
            )

        match plan.command:
            case "remember":
                if plan.key not in state.memory and len(state.memory) >= MAX_FACTS:
                    return Reply(local(f"My memory is full ({MAX_FACTS} facts); forget one."))
                return Reply(
                    local(f"OK, I will remember {plan.key} = {plan.value}."),
                    remember=(plan.key, plan.value),
                )
            case "recall" if not plan.key:
                keys = ", ".join(sorted(state.memory)) or "nothing yet"
                return Reply(local(f"I remember: {keys}."))
            case "recall":
                value = state.memory.get(plan.key)
                if value is None:
                    return Reply(
                        local(f"I don't know {plan.key}; teach me with remember {plan.key}=...")
                    )
                return Reply(local(f"{plan.key} = {value}"))
            case "forget":
                if plan.key not in state.memory:
                    return Reply(local(f"I did not know {plan.key} anyway."))
                return Reply(local(f"Forgot {plan.key}."), forget=plan.key)
            case "stats":
                usage = ctx.llm.usage
                return Reply(
                    local(
                        f"{state.handled} messages answered, {state.model_answers} by the "
                        f"model; {len(state.memory)} facts remembered. Since this agent "
                        f"started: {usage.calls} model calls, {usage.input_tokens} tokens in, "
                        f"{usage.output_tokens} out."
                    )
                )
            case "help":
                return Reply(local(HELP))
            case "invalid":
                return Reply(local(f"{plan.value} {HELP}"))
            case "ask":
                text = await _ask_model(ctx, state, plan.value)
                return Reply(
                    Answer(
                        id=message.id,
                        question=message.body,
                        answer=text,
                        source="model",
                        at=time.time(),
                    )
                )


def parse(message: Message) -> Plan:
    """Tell a local command from a question for the model.

    Only a well-formed command is one: "remember when we met?" is a question, not a
    broken ``remember``, so anything that does not fit a command goes to the model.
    """
    text = message.body.strip()
    if not text:
        return Plan(message, "invalid", value="The message was empty.")
    head, _, rest = text.partition(" ")
    head, rest = head.lower(), rest.strip()
    if head == "remember":
        key, sep, value = rest.partition("=")
        key, value = _key(key), value.strip()
        if sep and _KEY_RE.fullmatch(key) and value:
            if len(value) > MAX_VALUE_CHARS:
                return Plan(
                    message, "invalid", value=f"Values are at most {MAX_VALUE_CHARS} chars."
                )
            return Plan(message, "remember", key=key, value=value)
    elif head == "recall" and (not rest or _KEY_RE.fullmatch(_key(rest))):
        return Plan(message, "recall", key=_key(rest))
    elif head == "forget" and _KEY_RE.fullmatch(_key(rest)):
        return Plan(message, "forget", key=_key(rest))
    elif head == "stats" and not rest:
        return Plan(message, "stats")
    elif head == "help" and not rest:
        return Plan(message, "help")
    return Plan(message, "ask", value=text)


async def _ask_model(ctx: Context, state: AssistantState, question: str) -> str:
    system = SYSTEM
    if state.memory:
        facts = list(state.memory.items())[-FACTS_IN_PROMPT:]
        system += " Facts it knows: " + "; ".join(f"{k} = {v}" for k, v in facts) + "."
    # chat() renders "role: content" lines, so a newline inside the question would
    # look like the start of another turn to the model.
    flat = " ".join(question.split())[:MAX_QUESTION_CHARS]
    # Questions are independent: starting from an empty context keeps each prompt the
    # same size (no unbounded growth, small KV to hibernate) and keeps one user's
    # earlier question from colouring the next answer.
    await ctx.llm.reset()
    completion = await ctx.llm.chat(
        [{"role": "system", "content": system}, *EXAMPLES, {"role": "user", "content": flat}],
        max_tokens=ANSWER_MAX_TOKENS,
        # The examples answer on one line; a base model that goes on past the newline
        # is inventing the next turn.
        stop=("\n",),
        temperature=0.0,
    )
    answer = " ".join(completion.text.split())
    if not answer:
        return "(the model gave no answer)"
    if completion.finish_reason == "length":
        answer += " …"
    return answer


def _key(raw: str) -> str:
    return raw.strip().lower()


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
