"""The model as one agent sees it: the LLM handle behind ``ctx.llm``.

Each agent has its own context (an engine session) in the engine the daemon shares
among its agents; :class:`LLM` is every call an agent makes on it (``generate``,
``stream``, ``chat``, the tool loop ``run``). A call takes the agent's session, then
its quota admission, then the engine (:mod:`agentos.sdk.calls`); a call made before a
durable wait is served again from the task's wait log rather than sent twice; a
context that outgrew the model is compacted (:mod:`agentos.sdk.compaction`).
"""

from __future__ import annotations

import enum
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from agentos.core.chat import Reply, tool_choice_of, validate_messages, validate_tools
from agentos.core.waits import WaitLog
from agentos.engine.base import Completion, Engine
from agentos.sdk.calls import (
    Admitter,
    PlainSession,
    SessionProvider,
    Usage,
    admit_all,
    completion_record,
    metered,
    replayed_completion,
)
from agentos.sdk.compaction import (
    Compaction,
    answer_dangling,
    chat_fitting,
    context_tokens,
    generate_fitting,
    holds,
)
from agentos.telemetry import Telemetry
from agentos.tools import Toolbox, ToolsArg, toolbox_of

__all__ = ["LLM"]

log = logging.getLogger("agentos.sdk")


class _Default(enum.Enum):
    TOKEN = 0


_DEFAULT: Final = _Default.TOKEN


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
        self._admit = admit or admit_all
        self._session = session_id
        self._provider = session or PlainSession(engine, session_id)
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
        return context_tokens(self._engine, self._session)

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
                return replayed_completion(hit)
        queued = time.perf_counter()
        # The session first: a call never waits for a slot while it holds a quota
        # admission or an engine turn (agents holding slots need those turns).
        await self._provider.ensure()
        completion = await metered(
            lambda: generate_fitting(
                prompt,
                engine=self._engine,
                session_id=self._session,
                on_overflow=self.on_overflow,
                compacted=self._compacted,
                options={
                    "max_tokens": max_tokens,
                    "stop": stop,
                    "temperature": temperature,
                    "grammar": grammar,
                    "json_schema": json_schema,
                },
            ),
            admit=self._admit,
            estimate=lambda: self._engine.count_tokens(prompt) + max_tokens,
            timeout_s=quota_timeout_s,
            engine=self._engine,
            telemetry=self._telemetry,
            operation=operation,
            prompt=prompt,
            queued=queued,
            kv_restored=lambda: self.kv_restored,
        )
        self.kv_restored = False
        self._count(completion)
        if self.replay is not None:
            self.replay.record(operation, prompt, completion_record(completion))
        return completion

    async def _compacted(self, compaction: Compaction) -> None:
        log.info("%s: %s", self._session, compaction.describe())
        if self.on_compacted is not None:
            told = self.on_compacted(compaction)
            if told is not None:
                await told

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
                if not holds(history, reply.message()):
                    self._replayed_turns += [*answer_dangling(known, new), *new, reply.message()]
                return reply
        new = self._replayed_turns + answer_dangling(known, new) + new
        self._replayed_turns = []
        queued = time.perf_counter()
        await self._provider.ensure()
        estimate = sum(self._engine.count_tokens(str(m.get("content") or "")) for m in new)
        kept = history

        async def call() -> Reply:
            nonlocal kept
            reply, kept = await chat_fitting(
                history,
                new,
                engine=self._engine,
                session_id=self._session,
                on_overflow=self.on_overflow,
                compacted=self._compacted,
                options={
                    "tools": specs,
                    "tool_choice": choice,
                    "parallel_tool_calls": parallel_tool_calls,
                    "response_format": response_format,
                    "max_tokens": max_tokens,
                    "stop": stop,
                    "temperature": temperature,
                },
            )
            return reply

        reply = await metered(
            call,
            admit=self._admit,
            estimate=lambda: estimate + len(new) * 4 + max_tokens,
            timeout_s=self._timeout(quota_timeout_s),
            engine=self._engine,
            telemetry=self._telemetry,
            operation="chat",
            prompt=json.dumps(new, ensure_ascii=False) if self._telemetry.capture_content else "",
            queued=queued,
            kv_restored=lambda: self.kv_restored,
        )
        history = kept
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
