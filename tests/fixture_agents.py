"""Small agents the daemon and CLI tests run (entrypoints ``tests.fixture_agents:NAME``)."""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from typing import Any

import anyio
import msgspec

import agentos

# Heartbeat checks each Watcher made (agent name -> count), for tests that need to see
# heartbeats go by (the daemon runs in the test's process).
HEARTBEAT_CHECKS: Tally[str] = Tally()
# Set by test_watchdog's Blocker once it blocks the event loop.
LOOP_BLOCKED = threading.Event()


async def work(seconds: float) -> None:
    """A step that takes ``seconds`` of simulated work: the one timed wait of these
    agents, because the duration of a step is what the tests using them are about
    (a task timeout, a fire during a running task, an ``on_stop`` that takes its grace
    period, calls spaced out to build queue pressure)."""
    if seconds > 0:
        await anyio.sleep(seconds)


class CountState(msgspec.Struct):
    n: int = 0
    texts: list[str] = msgspec.field(default_factory=list)


class Counter(agentos.Agent):
    """Counts to ``config.limit`` (default 3), one model call per step."""

    State = CountState

    async def observe(self, ctx: agentos.Context) -> Any:
        return True if ctx.state.n < int(ctx.config.get("limit", 3)) else None

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        completion = await ctx.llm.generate(f"step {ctx.state.n}", max_tokens=4)
        ctx.state.n += 1
        return completion.text


class EchoState(msgspec.Struct):
    bodies: list[str] = msgspec.field(default_factory=list)
    replies: list[str] = msgspec.field(default_factory=list)
    stopped_with: str = ""


class Echo(agentos.Agent):
    """Records every message body; asks the model about it when config.llm is set."""

    State = EchoState

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        assert isinstance(plan, agentos.Message)
        ctx.state.bodies.append(plan.body)
        if ctx.config.get("llm"):
            completion = await ctx.llm.generate(plan.body, max_tokens=8)
            ctx.state.replies.append(completion.text)
        return plan.body

    async def on_stop(self, ctx: agentos.Context, reason: agentos.StopReason) -> None:
        ctx.state.stopped_with = reason.value


class Crasher(agentos.Agent):
    """Fails in act every time."""

    async def observe(self, ctx: agentos.Context) -> Any:
        return True

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        raise RuntimeError("boom: the tool is broken")


class Busy(agentos.Agent):
    """Never idle: one no-op step after another (for throughput and shutdown tests)."""

    async def observe(self, ctx: agentos.Context) -> Any:
        return True


class Slow(agentos.Agent):
    """Each step sleeps ``config.sleep`` seconds, ignoring ctx.stopping."""

    async def observe(self, ctx: agentos.Context) -> Any:
        return True

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        await work(float(ctx.config.get("sleep", 60)))
        return None


class FlushState(msgspec.Struct):
    flushed_with: str = ""


class Flusher(agentos.Agent):
    """Idle until stopped; its on_stop takes ``config.flush_s`` (default 0.5) seconds of
    "flushing" before it records why it stopped: the last write of a stopping daemon."""

    State = FlushState

    async def on_stop(self, ctx: agentos.Context, reason: agentos.StopReason) -> None:
        await work(float(ctx.config.get("flush_s", 0.5)))
        ctx.state.flushed_with = reason.value


class NotAnAgent:
    """An entrypoint that is not an Agent subclass."""


class ReaderState(msgspec.Struct):
    replies: list[str] = msgspec.field(default_factory=list)


def long_text(words: int) -> str:
    """A deterministic, varied text of about ``words`` words (the context to hibernate)."""
    subjects = ["The river", "A small robot", "The old library", "Our team", "The garden"]
    verbs = ["remembers", "measures", "describes", "repairs", "watches"]
    objects = ["the morning light", "a broken clock", "seven letters", "the north wall", "rain"]
    parts = []
    for i in range(words // 6 + 1):
        parts.append(f"{subjects[i % 5]} {verbs[(i * 3) % 5]} {objects[(i * 7) % 5]} on day {i}.")
    return " ".join(parts)


class Reader(agentos.Agent):
    """Reads a long text into its context on "read N", then answers "continue"."""

    State = ReaderState

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        assert isinstance(plan, agentos.Message)
        if plan.body.startswith("read "):
            prompt = long_text(int(plan.body.split()[1])) + "\nSummary:"
        else:
            prompt = "\nQuestion: what happens next?\nAnswer:"
        completion = await ctx.llm.generate(prompt, max_tokens=16)
        ctx.state.replies.append(completion.text)
        return completion.text


class TickState(msgspec.Struct):
    fires: list[str] = msgspec.field(default_factory=list)
    last_task: str = ""


class Ticker(agentos.Agent):
    """Counts the time-trigger tasks it runs (one step each); ``config.sleep`` per step."""

    State = TickState

    async def observe(self, ctx: agentos.Context) -> Any:
        if ctx.task.trigger in ("every", "schedule", "at") and ctx.state.last_task != ctx.task.id:
            return ctx.task.trigger
        return None

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        await work(float(ctx.config.get("sleep", 0)))
        ctx.state.last_task = ctx.task.id
        ctx.state.fires.append(ctx.task.id)
        return plan


class WatchState(msgspec.Struct):
    pending: int = 0
    handled: int = 0
    checks: int = 0


class Watcher(agentos.Agent):
    """Heartbeat agent: work exists only when ``state.pending`` > 0 (set by a message)."""

    State = WatchState

    async def observe(self, ctx: agentos.Context) -> Any:
        message = ctx.take_message()
        if message is not None:
            ctx.state.pending += int(message.body)
        if ctx.task.trigger == "heartbeat":
            ctx.state.checks += 1  # not saved unless a task runs: observe-only costs nothing
            HEARTBEAT_CHECKS[ctx.name] += 1
        return True if ctx.state.pending else None

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        await ctx.llm.generate("one more item", max_tokens=2)
        ctx.state.pending -= 1
        ctx.state.handled += 1
        return ctx.state.handled


class Researcher(agentos.Agent):
    """All four phases, two model calls and one tool call per message (for tracing tests)."""

    async def plan(self, ctx: agentos.Context, observation: Any) -> Any:
        completion = await ctx.llm.generate(f"Plan: {observation.body}", max_tokens=4)
        return completion.text

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        with ctx.tool("search", query=str(plan)[:20]):
            found = ["result"]
        reply = await ctx.llm.chat([{"role": "user", "content": f"{plan} {found}"}], max_tokens=4)
        return reply.text

    async def learn(self, ctx: agentos.Context, outcome: Any) -> None:
        ctx.state["last"] = outcome


class Hammer(agentos.Agent):
    """Never idle: one model call after another, each logged as "end-time tokens" to
    ``config.log_dir/NAME`` (for quota tests that count what was admitted)."""

    async def observe(self, ctx: agentos.Context) -> Any:
        return True

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        await ctx.llm.reset()  # keep the context short: only the rate matters here
        c = await ctx.llm.generate("go", max_tokens=int(ctx.config.get("max_tokens", 20)))
        log_dir = ctx.config.get("log_dir")
        if log_dir:
            async with await anyio.open_file(f"{log_dir}/{ctx.name}", "a") as f:
                await f.write(f"{time.time():.4f} {c.input_tokens + c.output_tokens}\n")
        return None


class Caller(agentos.Agent):
    """Per message: ``config.calls`` model calls (default 5), ``config.gap`` s apart (0.2)."""

    State = CountState

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        calls, gap = int(ctx.config.get("calls", 5)), float(ctx.config.get("gap", 0.2))
        for i in range(calls):
            completion = await ctx.llm.generate(f"call {i}", max_tokens=4)
            ctx.state.texts.append(completion.text)
            if i < calls - 1:
                await work(gap)
        ctx.state.n += 1
        return f"{calls} calls"


# Events a test sets to release a Gate agent's act (agent name -> event) or a `hold`
# tool call (gate name -> event).
GATES: dict[str, anyio.Event] = {}


class Gate(agentos.Agent):
    """Per message: one model call, then waits until the test sets ``GATES[name]``."""

    State = CountState

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        await ctx.llm.generate("before the gate", max_tokens=2)
        gate = GATES.setdefault(ctx.name, anyio.Event())
        await gate.wait()
        ctx.state.n += 1
        return "through"


class Parity(agentos.Agent):
    """Counts messages; crashes on odd bodies when ``config.crash_odd`` is set."""

    State = CountState

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        await ctx.llm.generate(f"n={ctx.state.n}", max_tokens=2)
        if ctx.config.get("crash_odd") and int(plan.body) % 2:
            raise ValueError(f"odd: {plan.body}")
        ctx.state.n += 1
        return ctx.state.n


class Outcome(msgspec.Struct):
    answer: str
    n: int


class Reporter(agentos.Agent):
    """Answers a message with a structured outcome, or sets its result explicitly."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        if ctx.config.get("explicit"):
            ctx.set_result({"a": 1, "body": plan.body})
        return Outcome(answer=plan.body.upper(), n=len(plan.body))


class Peeker(agentos.Agent):
    """Its observe asks the model before deciding; finds work once if ``config.work``."""

    State = CountState

    async def observe(self, ctx: agentos.Context) -> Any:
        await ctx.llm.generate("anything new?", max_tokens=2)
        return True if ctx.config.get("work") and ctx.state.n < 1 else None

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        ctx.state.n += 1
        return "looked"


HOLD: dict[str, anyio.Event] = {}


class Holder(agentos.Agent):
    """Records message bodies; the message "hold" waits until the test sets ``HOLD[name]``."""

    State = EchoState

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        assert isinstance(plan, agentos.Message)
        if plan.body == "hold":
            await HOLD.setdefault(ctx.name, anyio.Event()).wait()
        ctx.state.bodies.append(plan.body)
        return plan.body


class RecordState(msgspec.Struct):
    triggers: list[str] = msgspec.field(default_factory=list)
    last_task: str = ""


class Recorder(agentos.Agent):
    """Records what each task was for (one step each): a message's body, or the trigger."""

    State = RecordState

    async def observe(self, ctx: agentos.Context) -> Any:
        message = ctx.take_message()
        if message is not None:
            return f"message:{message.body}"
        timed = ("heartbeat", "wake", "every", "schedule", "at")
        if ctx.task.trigger in timed and ctx.state.last_task != ctx.task.id:
            return ctx.task.trigger
        return None

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        ctx.state.last_task = ctx.task.id
        ctx.state.triggers.append(plan)
        return plan


# The `hold` tool waits on GATES too (defined above): a tool call that runs exactly as
# long as the test wants, without sleeping for luck.


@agentos.tool(timeout=None)
async def hold(gate: str) -> str:
    """Wait until the test opens the gate."""
    await GATES.setdefault(gate, anyio.Event()).wait()
    return f"{gate} opened"


class ToolUser(agentos.Agent):
    """Answers each message with a tool loop over ``hold`` (the sim engine is scripted)."""

    tools = (hold,)

    async def act(self, ctx: agentos.Context, message: Any) -> Any:
        reply = await ctx.llm.run([{"role": "user", "content": message.body}], max_steps=4)
        return reply.content


class Chatter(agentos.Agent):
    """Answers each message with one chat turn, keeping the whole conversation."""

    async def act(self, ctx: agentos.Context, message: Any) -> Any:
        reply = await ctx.llm.chat([{"role": "user", "content": message.body}], max_tokens=8)
        return reply.text


class Picky(agentos.Agent):
    """Raises on a message that starts with "poison"; echoes the others."""

    async def act(self, ctx: agentos.Context, message: Any) -> Any:
        if message.body.startswith("poison"):
            raise ValueError(f"cannot digest {message.body!r}")
        return message.body


class Gated(agentos.Agent):
    """A message "gate:NAME" waits until the test opens GATES[NAME]; others echo."""

    async def act(self, ctx: agentos.Context, message: Any) -> Any:
        if message.body.startswith("gate:"):
            await GATES.setdefault(message.body[5:], anyio.Event()).wait()
        return message.body


class DownstreamDown(agentos.Agent):
    """Every heartbeat's observe finds the model down (an infrastructure fault)."""

    async def observe(self, ctx: agentos.Context) -> Any:
        from agentos.engine import EngineUnavailable

        raise EngineUnavailable("the model is down")


class Swallower(agentos.Agent):
    """Calls the model until told otherwise, swallowing every exception it can."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        for i in range(1000):
            try:
                await ctx.llm.generate(f"step {i}", max_tokens=8)
            except Exception:
                continue
        return "never"


class Logger(agentos.Agent):
    """Logs each message it gets with ctx.log (one line per level it is asked for)."""

    async def act(self, ctx: agentos.Context, plan: Any) -> Any:
        ctx.log.info("got %r", plan.body)
        if "warn" in plan.body:
            ctx.log.warning("careful: %s", plan.body)
        return "logged"
