"""What an agent author writes against: the Agent base class and the Context it is given.

An agent is a class with four async methods, called in a loop by the runtime:
``observe`` (is there anything to do? ``None`` means no, and the agent goes idle),
``plan``, ``act`` and ``learn``. Everything the agent may touch arrives through its
:class:`Context`: the model (``ctx.llm``), durable state (``ctx.state``), its config,
the task that woke it, a logger, and why it is being stopped. The runtime (a daemon,
or :mod:`agentos.testing`) builds the context; this module does no I/O of its own.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final, Protocol

import msgspec
import pydantic

from agentos.core.chat import (
    Reply,
    tool_choice_of,
    validate_messages,
    validate_tools,
)
from agentos.core.durations import parse_duration
from agentos.core.fairness import QuotaExceeded
from agentos.core.lifecycle import StopReason
from agentos.core.messages import Message
from agentos.core.outcomes import Outcome
from agentos.core.waits import WaitKind, WaitLog, WaitSpec, WaitTimeout, ask_spec, deadline_of
from agentos.engine.base import Completion, ContextOverflow, Engine, EngineError, KVSnapshot
from agentos.telemetry import Telemetry
from agentos.tools import Tool, Toolbox, ToolsArg, toolbox_of

__all__ = [
    "LLM",
    "Agent",
    "Compaction",
    "Context",
    "Message",
    "QuotaExceeded",
    "Reply",
    "SessionProvider",
    "StateCodec",
    "TaskInfo",
    "Usage",
    "WaitTimeout",
    "agent_logger",
    "freeze_config",
]

log = logging.getLogger("agentos.sdk")


class Agent:
    """Base class of every agent. Override the four loop methods; all are optional.

    Declare durable state with a class attribute ``State``: a ``msgspec.Struct`` or a
    pydantic model whose fields all have defaults. ``ctx.state`` is an instance of it,
    saved to Redis after every loop iteration that changed it and restored when the
    agent restarts, hibernates or moves to another daemon. Without ``State``,
    ``ctx.state`` is a plain JSON-serialisable dict.
    """

    State: ClassVar[type[Any] | None] = None
    tools: ClassVar[Sequence[Tool | Callable[..., Any]]] = ()
    """The agent's tools (functions decorated with :func:`agentos.tool`); ``ctx.tools``
    holds them, and ``ctx.llm.run`` offers them to the model by default."""

    async def observe(self, ctx: Context) -> Any | None:
        """Look at the world; return what to work on, or None when there is nothing to do."""
        return ctx.take_message()

    async def plan(self, ctx: Context, observation: Any) -> Any:
        """Decide what to do about ``observation``. Returns the plan handed to ``act``."""
        return observation

    async def act(self, ctx: Context, plan: Any) -> Any:
        """Carry out ``plan``. Returns the outcome handed to ``learn``."""
        return plan

    async def learn(self, ctx: Context, outcome: Any) -> None:
        """Update ``ctx.state`` from ``outcome``."""

    async def on_stop(self, ctx: Context, reason: StopReason) -> None:
        """Called once before the agent stops (shutdown, delete, respec, hibernate)."""


class StateCodec:
    """Encodes and decodes an agent class's durable state (msgspec JSON bytes)."""

    def __init__(self, state_type: type[Any] | None) -> None:
        if state_type is not None and not (
            (isinstance(state_type, type) and issubclass(state_type, msgspec.Struct))
            or (isinstance(state_type, type) and issubclass(state_type, pydantic.BaseModel))
        ):
            raise TypeError(
                f"Agent.State must be a msgspec.Struct or a pydantic model, not {state_type!r}"
            )
        self.state_type = state_type

    def new(self) -> Any:
        """A fresh state value (the type's defaults, or an empty dict)."""
        if self.state_type is None:
            return {}
        return self.state_type()

    def encode(self, value: Any) -> bytes:
        """Serialise ``value``; raises TypeError when it does not fit the declared type."""
        if isinstance(value, pydantic.BaseModel):
            return value.model_dump_json().encode()
        try:
            return msgspec.json.encode(value)
        except (TypeError, msgspec.EncodeError) as e:
            raise TypeError(f"agent state is not serialisable: {e}") from None

    def decode(self, data: bytes) -> Any:
        """Rebuild a state value from :meth:`encode`'s bytes."""
        if self.state_type is None:
            return msgspec.json.decode(data)
        if issubclass(self.state_type, pydantic.BaseModel):
            return self.state_type.model_validate_json(data)
        return msgspec.json.decode(data, type=self.state_type)


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """The task being worked on: one wake-up of the agent and its loop iterations."""

    id: str
    trigger: str  # start, inbox, heartbeat, schedule, every, at, wake, test
    attempt: int = 1
    message: Message | None = None
    started_at: float = 0.0


@dataclass(slots=True)
class Usage:
    """Tokens and calls an agent used, summed by the LLM handle."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, completion: Completion | Reply) -> None:
        """Count one finished inference."""
        self.calls += 1
        self.input_tokens += completion.input_tokens
        self.output_tokens += completion.output_tokens


class SessionProvider(Protocol):
    """Where the model handle gets the agent's engine session from.

    In a daemon the runtime opens the session (slot and restored context) before a
    task's agent code runs, so :meth:`ensure` finds it open; it only does work when
    agent code calls the model outside a task (a heartbeat's ``observe`` of a
    hibernated agent), and then wakes the agent.
    """

    async def ensure(self) -> object:
        """Make sure the agent holds an engine session with its context in it."""
        ...


class _PlainSession:
    """A session opened on first use, for engines driven without a runtime (tests)."""

    def __init__(self, engine: Engine, session_id: str) -> None:
        self._engine = engine
        self._id = session_id

    async def ensure(self) -> None:
        if not self._engine.has_session(self._id):
            self._engine.open_session(self._id)


class Admission(Protocol):
    """What the runtime's quota governor hands out per call (see ``agentos.governor``)."""

    def start(self) -> None:
        """The engine begins the call now."""

    def used(self, tokens: int) -> None:
        """The call used ``tokens`` (input + output)."""


Admitter = Callable[[Callable[[], int], "float | None"], AbstractAsyncContextManager[Admission]]
"""``admit(estimate, timeout_s)``: an async context manager around one inference call that
waits for (or refuses, with :class:`QuotaExceeded`) its quota; ``estimate()`` gives the
tokens the call may use at most."""


class _Default(enum.Enum):
    TOKEN = 0


_DEFAULT: Final = _Default.TOKEN


class _Unmetered:
    def start(self) -> None:
        pass

    def used(self, tokens: int) -> None:
        pass


@asynccontextmanager
async def _admit_all(
    estimate: Callable[[], int], timeout_s: float | None
) -> AsyncIterator[Admission]:
    yield _Unmetered()


@dataclass(frozen=True, slots=True)
class Compaction:
    """A call's context did not fit the model and was compacted (``onOverflow: compact``).

    ``operation`` is ``chat`` (the oldest turns were dropped, the system message(s) and
    every tool call with its result kept) or ``text`` (a text context was emptied and
    the prompt sent alone). ``dropped_tokens`` is the context's size before, as the
    engine counted it (0 when it does not say).
    """

    operation: str
    dropped_messages: int
    kept_messages: int
    dropped_tokens: int = 0

    def describe(self) -> str:
        """One line for the agent's ``ContextCompacted`` event."""
        if self.operation == "text":
            return (
                f"the text context ({self.dropped_tokens} tokens) did not fit the model; "
                "it was emptied and the prompt sent alone"
            )
        return (
            f"the conversation did not fit the model: dropped its {self.dropped_messages} "
            f"oldest messages, kept {self.kept_messages} (system messages and tool "
            "results with their calls included) and sent them again"
        )


class LLM:
    """The model as one agent sees it: its own context (session) in the shared engine.

    Every call appends to the agent's context, so a later call sees what earlier ones
    said; that context is what hibernation keeps. :meth:`reset` starts over.

    When a call's context no longer fits the model (:class:`ContextOverflow`) and
    :attr:`on_overflow` is ``compact`` (the agent's ``spec.context.onOverflow``), the
    call compacts it and is sent again, and :attr:`on_compacted` is told how (the
    runtime records a ``ContextCompacted`` event); with ``fail`` the call raises.
    """

    def __init__(
        self,
        engine: Engine,
        session_id: str,
        *,
        session: SessionProvider | None = None,
        on_usage: Callable[[Completion | Reply], None] | None = None,
        telemetry: Telemetry | None = None,
        admit: Admitter | None = None,
        on_overflow: str = "compact",
        on_compacted: Callable[[Compaction], Awaitable[None] | None] | None = None,
    ) -> None:
        self._engine = engine
        self.on_overflow = on_overflow
        """``compact`` or ``fail``: what a call does when its context does not fit."""
        self.on_compacted = on_compacted
        """Told of every compaction (the runtime records a ``ContextCompacted`` event)."""
        self._admit = admit or _admit_all
        self._session = session_id
        self._provider = session or _PlainSession(engine, session_id)
        self._on_usage = on_usage
        self._telemetry = telemetry or Telemetry.disabled()
        self.usage = Usage()
        self.kv_restored = False  # set by the runtime after a wake restored the KV
        # The waits' log of this loop iteration: a resumed task's calls made before its
        # wait are served from it (set by the Context).
        self.replay: WaitLog | None = None
        # Turns of replayed chats that the conversation does not hold (a task run again
        # on a context older than the task): sent with the next chat that reaches the
        # model, so its turns answer calls the conversation knows.
        self._replayed_turns: list[dict[str, Any]] = []
        self.quota_timeout_s: float | None = 60.0
        """How long a call may wait for its quota before :class:`QuotaExceeded` (None: no
        limit); a ``quota_timeout_s=`` argument overrides it for one call."""
        self.toolbox = Toolbox(  # the agent's (ctx.tools)
            telemetry=self._telemetry, away=getattr(self._provider, "away", None)
        )
        self._ctx: Any = None  # the Context, for tools that take ``ctx``
        self._messages: list[dict[str, Any]] = []  # the conversation as last seen

    @property
    def model(self) -> str:
        """The model's name, as traces report it."""
        return self._engine.model

    @property
    def context_tokens(self) -> int:
        """Tokens in the agent's context now (0 before the first call or after reset)."""
        if not self._engine.has_session(self._session):
            return 0
        return self._engine.session_info(self._session).n_tokens

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is for this model."""
        return self._engine.count_tokens(text)

    async def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
        quota_timeout_s: float | _Default | None = _DEFAULT,
    ) -> Completion:
        """Append ``prompt`` to the context and return the model's continuation.

        ``grammar`` (GBNF) or ``json_schema`` (a JSON Schema dict) constrain the output
        on engines that support them (llama; the sim engine ignores both).
        The call is admitted by the agent's quota first: it may wait up to
        ``quota_timeout_s`` (default :attr:`quota_timeout_s`) for a rate limit or a
        slot. Raises :class:`QuotaExceeded` (with ``retry_after_s``) when it cannot be
        admitted in time or a daily budget is spent, and
        :class:`agentos.engine.EngineError` when the engine fails.
        """
        return await self._generate(
            "text_completion",
            prompt,
            max_tokens,
            stop,
            temperature,
            grammar,
            json_schema,
            self._timeout(quota_timeout_s),
        )

    def _timeout(self, value: float | _Default | None) -> float | None:
        return self.quota_timeout_s if isinstance(value, _Default) else value

    async def _generate(
        self,
        operation: str,
        prompt: str,
        max_tokens: int,
        stop: Sequence[str],
        temperature: float,
        grammar: str | None,
        json_schema: Mapping[str, Any] | None,
        quota_timeout_s: float | None,
    ) -> Completion:
        if self.replay is not None:
            hit = self.replay.replayed(operation, prompt)
            if hit is not None:  # made before a wait, in the run that parked: not again
                return Completion(
                    text=str(hit.get("text", "")),
                    input_tokens=int(hit.get("input_tokens", 0)),
                    output_tokens=int(hit.get("output_tokens", 0)),
                    finish_reason=str(hit.get("finish_reason", "stop")),
                    time_to_first_token_s=0.0,
                    duration_s=0.0,
                )
        queued = time.perf_counter()
        # The session first: a call never waits for a slot while it holds a quota
        # admission or an engine turn (agents holding slots need those turns).
        await self._provider.ensure()
        async with self._admit(
            lambda: self._engine.count_tokens(prompt) + max_tokens, quota_timeout_s
        ) as admission:
            queue_wait = time.perf_counter() - queued
            admission.start()
            with self._telemetry.inference(
                model=self._engine.model,
                provider=self._engine.name,
                operation=operation,
                prompt=prompt,
            ) as inference:
                completion = await self._generate_fitting(
                    prompt,
                    max_tokens=max_tokens,
                    stop=stop,
                    temperature=temperature,
                    grammar=grammar,
                    json_schema=json_schema,
                )
                admission.used(completion.input_tokens + completion.output_tokens)
                inference.finish(
                    input_tokens=completion.input_tokens,
                    output_tokens=completion.output_tokens,
                    time_to_first_token_s=completion.time_to_first_token_s,
                    kv_restored=self.kv_restored,
                    queue_wait_s=queue_wait,
                    cached_tokens=completion.cached_tokens,
                    response_model=completion.served_by,
                    route_reason=completion.routed,
                    server_address=completion.served_at,
                )
        self.kv_restored = False
        self._count(completion)
        if self.replay is not None:
            self.replay.record(
                operation,
                prompt,
                {
                    "text": completion.text,
                    "input_tokens": completion.input_tokens,
                    "output_tokens": completion.output_tokens,
                    "finish_reason": completion.finish_reason,
                },
            )
        return completion

    async def _generate_fitting(self, prompt: str, **options: Any) -> Completion:
        """``engine.generate``; on overflow with ``compact``, the prompt alone once more.

        A text context has no turns to tell apart (no system message, no tool call to
        keep with its result): it is one stream of text, and cutting it anywhere but
        the start could split a token or a sentence the model then continues. So the
        context is emptied and the prompt, the call's own input, is sent alone; if even
        that does not fit, the context is put back and the overflow raised.
        """
        try:
            return await self._engine.generate(self._session, prompt, **options)
        except ContextOverflow:
            if self.on_overflow != "compact":
                raise
            before = self.context_tokens
            saved = await self._engine.export_kv(self._session)
            await self._engine.reset_session(self._session)
            try:
                completion = await self._engine.generate(self._session, prompt, **options)
            except ContextOverflow:
                await self._put_back(saved)
                raise
        await self._compacted(Compaction("text", 0, 0, before))
        return completion

    async def _put_back(self, saved: KVSnapshot) -> None:
        """Restore the context exported before a compaction that did not help."""
        try:
            await self._engine.reset_session(self._session)
            imported = saved.data is not None and await self._engine.import_kv(self._session, saved)
            if not imported and (saved.tokens or saved.conversation):
                await self._engine.prefill(self._session, saved.tokens, saved.conversation)
        except EngineError as e:
            log.warning("%s: the context could not be put back: %s", self._session, e)

    async def _compacted(self, compaction: Compaction) -> None:
        log.info("%s: %s", self._session, compaction.describe())
        if self.on_compacted is not None:
            told = self.on_compacted(compaction)
            if told is not None:
                await told

    async def _chat_fitting(
        self, history: list[dict[str, Any]], new: list[dict[str, Any]], **options: Any
    ) -> tuple[Reply, list[dict[str, Any]]]:
        """``engine.chat``; on overflow with ``compact``, the oldest turns are dropped
        (half of them each time, see :func:`compact_history`) and the session reset and
        sent the rest with the new turns, until it fits or nothing is left to drop (then
        the conversation is put back and the overflow raised). Returns the reply and the
        history it was answered with."""
        try:
            return await self._engine.chat(self._session, new, **options), history
        except ContextOverflow:
            if self.on_overflow != "compact":
                raise
            before = self.context_tokens
            saved = await self._engine.export_kv(self._session)
            kept = history
            while True:
                smaller = compact_history(kept, new)
                if smaller is None:
                    await self._put_back(saved)
                    raise
                kept = smaller
                await self._engine.reset_session(self._session)
                try:
                    reply = await self._engine.chat(self._session, [*kept, *new], **options)
                except ContextOverflow:
                    continue
                await self._compacted(
                    Compaction("chat", len(history) - len(kept), len(kept), before)
                )
                return reply, kept

    async def stream(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
        quota_timeout_s: float | _Default | None = _DEFAULT,
    ) -> AsyncIterator[str]:
        """Like :meth:`generate`, yielding text as the model produces it.

        The call is metered as the server counted it when the engine reports that (a
        remote server), and also when the caller stops reading early.
        """
        input_tokens = self._engine.count_tokens(prompt)
        first: float | None = None
        text: list[str] = []
        output_tokens = 0
        cached_tokens = 0
        reason = "stop"
        await self._provider.ensure()
        async with self._admit(
            lambda: input_tokens + max_tokens, self._timeout(quota_timeout_s)
        ) as admission:
            admission.start()
            started = time.perf_counter()
            try:
                async for chunk in self._engine.stream(
                    self._session,
                    prompt,
                    max_tokens=max_tokens,
                    stop=stop,
                    temperature=temperature,
                    grammar=grammar,
                    json_schema=json_schema,
                ):
                    output_tokens += len(chunk.token_ids)
                    if chunk.finished:
                        reason = chunk.finish_reason or reason
                        if chunk.usage is not None:
                            input_tokens = chunk.usage.input_tokens
                            cached_tokens = chunk.usage.cached_tokens
                            output_tokens = chunk.usage.output_tokens
                    if chunk.text:
                        if first is None:
                            first = time.perf_counter() - started
                        text.append(chunk.text)
                        yield chunk.text
            finally:
                admission.used(input_tokens + output_tokens)
                self._count(
                    Completion(
                        text="".join(text),
                        input_tokens=input_tokens,
                        output_tokens=output_tokens,
                        finish_reason=reason,
                        time_to_first_token_s=first or 0.0,
                        duration_s=time.perf_counter() - started,
                        cached_tokens=cached_tokens,
                    )
                )

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The agent's conversation: every chat turn so far, OpenAI-shaped (a copy).

        It survives hibernation and moves with the agent; :meth:`reset` empties it.
        """
        if self._engine.has_session(self._session):
            self._messages = self._engine.conversation(self._session)
        return [dict(m) for m in self._messages]

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: ToolsArg | None = None,
        tool_choice: str | None = "auto",
        response_format: Mapping[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        quota_timeout_s: float | _Default | None = _DEFAULT,
    ) -> Reply:
        """Append ``messages`` (the NEW turns: ``system``, ``user``, ``tool`` results...) to
        the agent's conversation (:attr:`messages`) and return the model's :class:`Reply`,
        which is appended too.

        ``tools`` (a list of tools or functions, or a toolbox such as ``ctx.tools``) are
        offered to the model; ``tool_choice`` is ``auto``, ``required``, ``none`` or a
        tool's name. ``response_format`` is OpenAI's (``{"type": "json_schema", ...}``).
        Servers get both natively; local engines describe the tools in the prompt and
        constrain the output to their schemas. Tool calls the conversation left
        unanswered are answered "not run" first, so the conversation stays valid.
        Raises ValueError naming the bad item (a message, a tool) before any call,
        :class:`QuotaExceeded` and :class:`agentos.engine.EngineError` as
        :meth:`generate` does.
        """
        specs = [] if tools is None else toolbox_of(tools, self.toolbox).specs()
        validate_tools(specs)
        choice = tool_choice_of(tool_choice, specs)
        if self._engine.has_session(self._session):
            history = self._engine.conversation(self._session)
        else:
            history = self._messages
        if self.replay is None or self.replay.at_start:
            self._replayed_turns = []  # a new iteration: nothing replayed yet
        known = [*history, *self._replayed_turns]
        new = validate_messages(messages, known)
        # The key leaves out what the conversation adds (dangling answers): a resumed task
        # calls with the same turns on a conversation that may already hold them.
        key = json.dumps([new, [t.name for t in specs], choice], sort_keys=True, default=str)
        if self.replay is not None:
            hit = self.replay.replayed("chat", key)
            if hit is not None:  # made before a wait, in the run that parked: not again
                reply = Reply.from_dict(hit)
                if not _holds(history, reply.message()):
                    self._replayed_turns += [*_answer_dangling(known, new), *new, reply.message()]
                return reply
        new = self._replayed_turns + _answer_dangling(known, new) + new
        self._replayed_turns = []
        queued = time.perf_counter()
        await self._provider.ensure()
        estimate = sum(self._engine.count_tokens(str(m.get("content") or "")) for m in new)
        async with self._admit(
            lambda: estimate + len(new) * 4 + max_tokens, self._timeout(quota_timeout_s)
        ) as admission:
            queue_wait = time.perf_counter() - queued
            admission.start()
            with self._telemetry.inference(
                model=self._engine.model,
                provider=self._engine.name,
                operation="chat",
                prompt=json.dumps(new, ensure_ascii=False)
                if self._telemetry.capture_content
                else "",
            ) as inference:
                reply, history = await self._chat_fitting(
                    history,
                    new,
                    tools=specs,
                    tool_choice=choice,
                    parallel_tool_calls=parallel_tool_calls,
                    response_format=response_format,
                    max_tokens=max_tokens,
                    stop=stop,
                    temperature=temperature,
                )
                admission.used(reply.usage.input_tokens + reply.usage.output_tokens)
                inference.finish(
                    input_tokens=reply.usage.input_tokens,
                    output_tokens=reply.usage.output_tokens,
                    time_to_first_token_s=reply.time_to_first_token_s,
                    kv_restored=self.kv_restored,
                    queue_wait_s=queue_wait,
                    cached_tokens=reply.cached_tokens,
                    response_model=reply.served_by,
                    route_reason=reply.routed,
                    server_address=reply.served_at,
                )
        self.kv_restored = False
        self._messages = [*history, *new, reply.message()]
        self._count(reply)
        if self.replay is not None:
            self.replay.record("chat", key, reply.to_dict())
        return reply

    async def run(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: ToolsArg | None = None,
        max_steps: int = 8,
        *,
        tool_choice: str | None = "auto",
        max_tokens: int = 256,
        temperature: float = 0.0,
        quota_timeout_s: float | _Default | None = _DEFAULT,
    ) -> Reply:
        """The tool loop: chat, run every tool call the reply asks for, send the results,
        until a reply has no tool calls or ``max_steps`` chats were made; returns the
        last :class:`Reply` (check ``reply.tool_calls``: non-empty means the step limit
        stopped the loop, and those calls were not run).

        ``tools=None`` offers the agent's toolbox (``ctx.tools``), ``tools=[]`` none.
        A ``required`` or named ``tool_choice`` applies to the first step only (after a
        tool has run, the model may answer), so the loop can end. Parallel calls of one
        reply run concurrently; their results go back in the order of the calls.
        """
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        box = self.toolbox if tools is None else toolbox_of(tools, self.toolbox)
        offered: ToolsArg | None = box if len(box) else None
        choice = tool_choice
        pending: Sequence[Mapping[str, Any]] = list(messages)
        for step in range(max_steps):
            reply = await self.chat(
                pending,
                tools=offered,
                tool_choice=choice if offered is not None else None,
                max_tokens=max_tokens,
                temperature=temperature,
                quota_timeout_s=quota_timeout_s,
            )
            if not reply.tool_calls or step + 1 == max_steps:
                return reply
            pending = await box.call_all(reply.tool_calls)
            if choice not in (None, "auto", "none"):
                choice = "auto"
        raise AssertionError("unreachable")  # pragma: no cover

    def escalate(self, reason: str) -> bool:
        """Ask for a stronger model: on a ``cascade`` route the rest of this task's calls
        go to the next candidate (a ``Routed`` event says why). Returns False when there
        is none (the last candidate, or an agent with one model)."""
        if not isinstance(reason, str) or not reason:
            raise ValueError("ctx.llm.escalate needs a reason")
        escalate = getattr(self._engine, "escalate", None)
        return bool(escalate(self._session, reason)) if callable(escalate) else False

    async def reset(self) -> None:
        """Forget the context: the next call starts from an empty one."""
        if self._engine.has_session(self._session):
            await self._engine.reset_session(self._session)
        self._messages = []

    def _count(self, completion: Completion | Reply) -> None:
        self.usage.add(completion)
        if self._on_usage is not None:
            self._on_usage(completion)


_SYSTEM_ROLES = ("system", "developer")


def compact_history(
    history: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]] | None:
    """``history`` with the oldest half of its turns dropped, to make room for ``new``;
    None when no turn is left to drop.

    The system message(s) are kept (first, in their order). A turn is a user or
    assistant message with the tool results that follow it, so a tool call is never
    kept without its result or the other way round; the turn whose calls ``new``
    answers (``new`` opens with tool results) is always kept. The kept part starts at
    a user message when one is left, as chat templates expect.
    """
    system = [dict(m) for m in history if m.get("role") in _SYSTEM_ROLES]
    turns: list[list[dict[str, Any]]] = []
    for m in history:
        if m.get("role") in _SYSTEM_ROLES:
            continue
        if m.get("role") == "tool" and turns:
            turns[-1].append(dict(m))
        else:
            turns.append([dict(m)])
    answered = 1 if new and new[0].get("role") == "tool" and turns else 0
    droppable = len(turns) - answered
    if droppable <= 0:
        return None
    cut = (droppable + 1) // 2
    while cut < droppable and turns[cut][0].get("role") != "user":
        cut += 1
    return system + [m for turn in turns[cut:] for m in turn]


def _holds(history: Sequence[Mapping[str, Any]], reply: Mapping[str, Any]) -> bool:
    """Whether the conversation has the assistant turn ``reply`` (by its calls' ids, or
    its text when it made no call)."""
    ids = [c["id"] for c in reply.get("tool_calls") or ()]
    for m in reversed(history):
        if m.get("role") != "assistant":
            continue
        if ids and [c.get("id") for c in m.get("tool_calls") or ()] == ids:
            return True
        if not ids and not m.get("tool_calls") and m.get("content") == reply.get("content"):
            return True
    return False


def _answer_dangling(
    history: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Tool messages for the calls of the conversation's last assistant turn that neither
    the history nor the new turns answer (a tool loop stopped at its step limit): every
    server refuses a conversation with an unanswered call."""
    last = next(
        (i for i in range(len(history) - 1, -1, -1) if history[i]["role"] == "assistant"), -1
    )
    if last < 0 or not history[last].get("tool_calls"):
        return []
    answered = {m.get("tool_call_id") for m in [*history[last + 1 :], *new] if m["role"] == "tool"}
    return [
        {
            "role": "tool",
            "tool_call_id": c["id"],
            "name": c["function"]["name"],
            "content": "error: this call was not run (the tool loop stopped first)",
        }
        for c in history[last]["tool_calls"]
        if c["id"] not in answered
    ]


Sender = Callable[[str, str], Awaitable[str]]


async def _no_sender(agent: str, body: str) -> str:
    raise RuntimeError("this context cannot send messages")


EventSender = Callable[[str, str, Any], Awaitable[bool]]


async def _no_events(agent: str, event: str, data: Any) -> bool:
    raise RuntimeError("this context cannot send events")


class _NoDefault(enum.Enum):
    TOKEN = 0


_NO_DEFAULT: Final = _NoDefault.TOKEN


def _seconds(value: float | str | None, what: str) -> float | None:
    if value is None or isinstance(value, int | float):
        return value
    try:
        return parse_duration(value)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


@dataclass(eq=False)
class Context:
    """Everything an agent may use during a task. Built by the runtime, one per agent."""

    name: str
    llm: LLM
    state: Any
    config: Mapping[str, Any]
    task: TaskInfo
    log: logging.LoggerAdapter[logging.Logger]
    stopping: StopReason | None = None
    _message_taken: bool = field(default=False, repr=False)
    _result: Any = field(default=None, repr=False)
    _has_result: bool = field(default=False, repr=False)
    _sender: Sender = field(default=_no_sender, repr=False)
    _telemetry: Telemetry = field(default_factory=Telemetry.disabled, repr=False)
    _events: EventSender = field(default=_no_events, repr=False)
    _waits: WaitLog = field(default_factory=lambda: WaitLog(time.time), repr=False)
    _outcome: Outcome | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.llm.replay = self._waits
        self.llm._ctx = self
        self.llm.toolbox.context = self

    @property
    def tools(self) -> Toolbox:
        """The agent's toolbox: its ``Agent.tools``, plus any added since (``ctx.tools.add``).

        ``await ctx.tools.call(tool_call)`` runs one call and returns the ``tool``
        message to pass in the next ``ctx.llm.chat``.
        """
        return self.llm.toolbox

    # ---------------------------------------------------------------- durable waits
    # Each wait ends the loop iteration the first time it is reached: the task is parked
    # in Redis and the agent released. When the wait ends, the iteration runs again and
    # every wait returns what was recorded for it, in order: code before a wait runs
    # again (make it idempotent, or put side effects after the wait), code after it once.

    async def ask(
        self,
        question: str,
        *,
        choices: Sequence[str] | None = None,
        timeout: float | str | None = None,  # noqa: ASYNC109 - a durable deadline
        default: Any = _NO_DEFAULT,
    ) -> Any:
        """Ask a person and return the answer: one of ``choices`` (``("yes", "no")`` for
        an approval), or free text when there are none.

        Answers come from `agentos answer`, ``POST /v1/agents/{name}/tasks/{task}/answer``
        or :meth:`agentos.Client.answer`. After ``timeout`` (seconds or "2h") ``default``
        is returned, or :class:`WaitTimeout` raised when there is none.
        """
        has_default = not isinstance(default, _NoDefault)
        spec = ask_spec(
            question,
            choices=choices,
            deadline=deadline_of(self._waits.clock(), _seconds(timeout, "ctx.ask timeout")),
            default=default if has_default else None,
            has_default=has_default,
        )
        return self._waits.wait(spec)

    async def wait_for(
        self,
        event: str,
        *,
        timeout: float | str | None = None,  # noqa: ASYNC109 - a durable deadline
    ) -> Any:
        """Wait for the event named ``event`` sent to this agent (by :meth:`send_event`
        of another agent, `agentos event`, HTTP) and return its data.

        An event sent before the agent waits for it is kept (the latest of each name)
        and taken by the next wait for it. Raises :class:`WaitTimeout` after ``timeout``.
        """
        if not isinstance(event, str) or not event or len(event) > 200:
            raise ValueError("ctx.wait_for needs an event name of 1 to 200 characters")
        deadline = deadline_of(self._waits.clock(), _seconds(timeout, "ctx.wait_for timeout"))
        return self._waits.wait(WaitSpec(WaitKind.EVENT, event, None, deadline))

    async def send_event(self, agent: str, event: str, data: Any = None) -> bool:
        """Send the event ``event`` (with JSON-serialisable ``data``) to ``agent``.

        Returns True when it ended a wait of that agent, False when it is kept for the
        agent's next ``wait_for(event)``.
        """
        return await self._events(agent, event, data)

    async def sleep_until(self, when: float | _dt.datetime) -> None:
        """Park the task until ``when`` (epoch seconds or an aware datetime), holding
        nothing meanwhile; the iteration then runs again and this call returns."""
        at = when.timestamp() if isinstance(when, _dt.datetime) else float(when)
        self._waits.wait(WaitSpec(WaitKind.SLEEP, "", None, at))

    async def sleep(self, duration: float | str) -> None:
        """:meth:`sleep_until` now + ``duration`` (seconds or "30m")."""
        seconds = _seconds(duration, "ctx.sleep")
        assert seconds is not None
        deadline = deadline_of(self._waits.clock(), seconds)
        assert deadline is not None
        await self.sleep_until(deadline)

    def take_message(self) -> Message | None:
        """The message that started this task, the first time it is asked for; then None.

        The default :meth:`Agent.observe` returns it, so an agent that only answers
        messages needs no observe of its own.
        """
        if self._message_taken or self.task.message is None:
            return None
        self._message_taken = True
        return self.task.message

    @property
    def message_taken(self) -> bool:
        """Whether the agent has taken this task's message (the runtime acks it then)."""
        return self._message_taken

    async def send(self, agent: str, body: str) -> str:
        """Send a message to another agent's inbox. Returns the message id."""
        return await self._sender(agent, body)

    def tool(self, name: str, **attributes: Any) -> AbstractContextManager[Any]:
        """Trace a tool call: ``with ctx.tool("grep"): ...`` opens ``execute_tool grep``.

        An exception inside marks the span failed and propagates.
        """
        return self._telemetry.tool(name, **attributes)

    def set_result(self, value: Any) -> None:
        """Make ``value`` this task's result, instead of what ``act`` returned last.

        The record keeps it as text: a ``str`` as is, data (a pydantic model, a Struct,
        a dataclass, a dict...) as JSON; ``agentos send --wait`` prints it. The latest
        call wins; None sets an empty result.
        """
        self._result = value
        self._has_result = True

    def succeed(self, score: float | None = None, reason: str | None = None) -> None:
        """Mark this task successful (``score`` in any scale you use, ``reason`` free
        text). The verdict goes on the task record and into ``agentos usage`` (success
        rate, cost per successful task); an Agent's ``spec.evaluate`` has the last word.
        The latest of :meth:`succeed` and :meth:`fail` wins.
        """
        self._outcome = Outcome("pass", None if score is None else float(score), reason)

    def fail(self, reason: str) -> None:
        """Mark this task failed (it did not do its job) without raising: the task ends
        normally, its result is kept, and it counts as unsuccessful in ``usage``."""
        if not isinstance(reason, str) or not reason:
            raise ValueError("ctx.fail needs a reason")
        self._outcome = Outcome("fail", None, reason)

    @property
    def outcome(self) -> Outcome | None:
        """The verdict :meth:`succeed` or :meth:`fail` gave this task (None: neither)."""
        return self._outcome

    @property
    def result(self) -> Any:
        """What :meth:`set_result` was last given in this task (None if it was not called)."""
        return self._result

    @property
    def has_result(self) -> bool:
        """Whether :meth:`set_result` was called in this task."""
        return self._has_result

    def begin(self, task: TaskInfo) -> None:
        """Runtime hook: switch the context to a new task."""
        self.task = task
        self._message_taken = False
        self._result = None
        self._has_result = False
        self._outcome = None
        self._waits.begin(enabled=False)


def agent_logger(name: str) -> logging.LoggerAdapter[logging.Logger]:
    """The logger handed to an agent as ``ctx.log`` (logger ``agentos.agent.NAME``)."""
    return logging.LoggerAdapter(logging.getLogger(f"agentos.agent.{name}"), {"agent": name})


def freeze_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view of an agent's config, so agent code cannot mutate the spec."""
    return MappingProxyType(dict(config))
