"""One routed agent's model calls: each call goes to the candidate the route picks.

An agent with ``spec.route`` holds its session (its slot, its KV, what hibernation
keeps) on one *home* model: the route's first candidate this daemon may serve. Every
call is routed by :func:`agentos.core.route.choose`. A call the home model serves goes
to the agent's session as usual. A call another candidate serves runs in a short-lived
session there with the whole conversation (a re-prefill: its input tokens are
metered and priced at that model, which is what "the cost of moving" means), and the
turns it added are sent to the home model with its next call there.

Failover is decided on the typed error before any text reaches the agent: an
:class:`EngineUnavailable` (429, 5xx, a timeout, a model that cannot start) cools that
model down for the route's ``cooldown`` on this daemon and the call is routed again,
never past the data boundary. On a ``cascade`` route a reply that fails the call's own
check (an empty answer, invalid JSON for ``response_format``, tool arguments that do
not fit their schema) escalates to the next candidate, as ``ctx.llm.escalate`` does;
the rejected reply is metered all the same, and a home session that holds it is
rebuilt from the conversation on its next call. When no candidate can serve, the call
waits a little for a cooldown to end, then parks the task (``onExhausted: park``, an
infrastructure fault) or raises :class:`RouteExhausted` to the agent (``fail``), with
a ``RouteExhausted`` event naming every candidate and why it was skipped. Money is
apart: a class whose ``dailyCost`` is spent parks the task with ``BudgetExhausted``
until its day ends; a task whose ``maxCostPerTask`` is spent ends (failed, like a
task past ``maxTokensPerTask``: a retry would find the same money spent, since a
retried or resumed task keeps what it spent). A ``Routed`` event is written only when
the choice changes.

What a route does not carry: turns answered away from home are in the daemon's memory
until the home model's next call; an agent hibernated before that wakes with the home
model's conversation (its state is kept as always).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import anyio

from agentos.core.chat import Reply, TokenUsage, ToolSpec
from agentos.core.route import (
    Call,
    Candidate,
    Choice,
    ModelStats,
    choose,
    reply_problem,
)
from agentos.core.routespec import Route
from agentos.engine.base import (
    Completion,
    Engine,
    EngineError,
    EngineUnavailable,
    KVSnapshot,
    NoFreeSlot,
    RouteExhausted,
    RouteUnavailable,
    SessionInfo,
    StreamChunk,
)
from agentos.runtime.routes_state import (
    Events,
    RouteSession,
    call_of,
    cascade_above,
    chat_away,
    cooling_until,
    exhausted_error,
    generate_away,
    index_of,
    json_format,
    no_events,
    no_limit,
)

__all__ = ["EXHAUSTED_WAIT_S", "RouteEngine", "RouteExhausted", "RouteUnavailable"]

log = logging.getLogger("agentos.routes")

EXHAUSTED_WAIT_S = 10.0
"""A call whose candidates are all cooling down waits this long at most for one."""
_MAX_ATTEMPTS = 8  # model calls one routed call may make (failovers and escalations)
_FULL_PAUSE_S = 1.0  # a candidate with no free slot is skipped this long


class RouteEngine:
    """An :class:`Engine` for one routed agent (see the module docstring)."""

    def __init__(
        self,
        *,
        agent: str,
        route: Route,
        candidates: Sequence[Candidate],
        home: str,
        primary: Engine,
        resolve: Callable[[str], Awaitable[Engine]],
        stats: dict[str, ModelStats],
        quota_class: str = "standard",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.agent = agent
        self.route = route
        self.candidates = tuple(candidates)
        self.home = home
        self.primary = primary
        self._resolve = resolve
        self.stats = stats
        self.quota_class = quota_class
        self.clock = clock
        self._sessions: dict[str, RouteSession] = {}
        # Set by the runner: where events go, what the task has cost, which task runs.
        self.events: Events = no_events
        self.spent: Callable[[], float] = lambda: 0.0
        self.task_id: Callable[[], str] = lambda: ""
        self.class_left: Callable[[], Awaitable[float | None]] = no_limit
        self.day_resets_in: Callable[[], float] = lambda: 3600.0
        # Meters a reply that was made and then rejected (it cost tokens all the same).
        self.charge: Callable[[Completion | Reply], None] = lambda _c: None
        # The candidates as their stored Models say now (set by the pool; None: fixed).
        self.refresh: Callable[[], Awaitable[Sequence[Candidate]]] | None = None

    # Identity and sessions are the home model's.

    @property
    def name(self) -> str:
        return self.primary.name

    @property
    def model(self) -> str:
        return self.primary.model

    @property
    def slots(self) -> int:
        return self.primary.slots

    @property
    def parallel(self) -> int:
        return self.primary.parallel

    def fingerprint(self) -> str:
        return self.primary.fingerprint()

    def count_tokens(self, text: str) -> int:
        return self.primary.count_tokens(text)

    def open_session(self, session_id: str) -> None:
        self.primary.open_session(session_id)
        self._forget(session_id)

    def close_session(self, session_id: str) -> None:
        self.primary.close_session(session_id)
        self._forget(session_id)

    def has_session(self, session_id: str) -> bool:
        return self.primary.has_session(session_id)

    def session_info(self, session_id: str) -> SessionInfo:
        return self.primary.session_info(session_id)

    async def reset_session(self, session_id: str) -> None:
        await self.primary.reset_session(session_id)
        self._forget(session_id)

    async def export_kv(self, session_id: str) -> KVSnapshot:
        return await self.primary.export_kv(session_id)

    async def import_kv(self, session_id: str, snapshot: KVSnapshot) -> bool:
        self._forget(session_id)
        return await self.primary.import_kv(session_id, snapshot)

    async def prefill(
        self, session_id: str, tokens: Sequence[int], conversation: bytes = b""
    ) -> float:
        self._forget(session_id)
        return await self.primary.prefill(session_id, tokens, conversation)

    def conversation(self, session_id: str) -> list[dict[str, Any]]:
        """The conversation as the agent sees it: the home model's, less a rejected
        reply it holds, plus the turns other models answered since."""
        state = self._sessions.get(session_id)
        home = self.primary.conversation(session_id)
        if state is None:
            return home
        if state.drop:
            home = home[: max(0, len(home) - state.drop)]
        return [*home, *(dict(m) for m in state.unsent)]

    def describe(self) -> dict[str, Any]:
        """The home model's description, with the route's candidates."""
        inner = getattr(self.primary, "describe", None)
        info: dict[str, Any] = dict(inner()) if callable(inner) else {}
        return {**info, "route": [c.name for c in self.candidates], "home": self.home}

    def _forget(self, session_id: str) -> None:
        """The session's context is gone (closed, reset, restored): so are the turns
        other models answered; the running task's escalation stays."""
        state = self._sessions.pop(session_id, None)
        if state is not None and (state.task or state.last):
            kept = self._sessions[session_id] = RouteSession()
            kept.task, kept.level, kept.served = state.task, state.level, state.served
            kept.last = state.last  # the choice is unchanged: no new Routed event

    def _state(self, session_id: str) -> RouteSession:
        state = self._sessions.get(session_id)
        if state is None:
            state = self._sessions[session_id] = RouteSession()
        task = self.task_id()
        if task != state.task:
            state.task, state.level, state.served = task, 0, -1
        return state

    # Escalation.

    def escalate(self, session_id: str, reason: str) -> bool:
        """Send the rest of this task's calls to the candidate after the one that served
        the last call (``ctx.llm.escalate``); False when there is none."""
        state = self._state(session_id)
        nxt = cascade_above(self.route, self.candidates, max(state.level, state.served))
        if nxt is None:
            return False
        state.level = nxt
        self._note(f"escalated to {self.candidates[nxt].name}: {reason}")
        return True

    def _note(self, text: str) -> None:
        log.info("%s: %s", self.agent, text)

    # Choosing.

    async def _refresh(self) -> None:
        """Take the candidates' Models as stored now (a re-apply changes the next call)."""
        if self.refresh is not None:
            self.candidates = tuple(await self.refresh())

    def _call(
        self, session_id: str, new_text: str, max_tokens: int, *, tools: bool
    ) -> tuple[Call, RouteSession]:
        state = self._state(session_id)
        call = call_of(
            self.primary, session_id, state, self.home, new_text, max_tokens, tools=tools
        )
        return call, state

    async def _choose(self, state: RouteSession, call: Call, failed: dict[str, str]) -> Choice:
        """The model for ``call``; waits a little when every candidate is cooling down,
        then parks or fails the call (see the module docstring)."""
        waited = False
        while True:
            now = self.clock()
            choice = choose(
                self.route,
                self.candidates,
                call,
                stats=self.stats,
                now=now,
                level=state.level,
                spent=self.spent(),
                class_left=await self.class_left(),
                exclude=failed,
            )
            if choice.model is not None:
                if choice.model != state.last:
                    await self.events("Routed", choice.model, choice.reason)
                return choice
            until = cooling_until(self.candidates, self.stats, now, failed)
            if until is not None and not waited and until - now <= EXHAUSTED_WAIT_S:
                waited = True
                await anyio.sleep(max(0.0, until - now))
                continue
            # Nothing can serve the call: park it, fail it, or end it for money (see the
            # module docstring).
            await self.events("RouteExhausted", self.route.on_exhausted, choice.skipped_text())
            raise exhausted_error(
                self.route,
                choice,
                agent=self.agent,
                quota_class=self.quota_class,
                spent=self.spent(),
                day_resets_in=self.day_resets_in,
            )

    async def _engine(self, model: str) -> Engine:
        return self.primary if model == self.home else await self._resolve(model)

    def _failed(self, model: str, error: EngineError) -> str:
        why = f"{type(error).__name__}: {error}"[:300]
        # A full model frees a slot soon; one that failed is left alone for the cooldown.
        pause = _FULL_PAUSE_S if isinstance(error, NoFreeSlot) else self.route.cooldown
        self.stats.setdefault(model, ModelStats()).cool(self.clock() + pause, why)
        log.warning("%s: model %s failed (%s); routing again", self.agent, model, why)
        return f"failed this call: {why}"

    def _served(self, state: RouteSession, model: str, ttft_s: float, output_tokens: int) -> None:
        self.stats.setdefault(model, ModelStats()).observe(
            ttft_s=ttft_s, output_tokens=output_tokens
        )
        state.last = model
        state.served = index_of(self.candidates, model)

    async def _check_failed(self, state: RouteSession, model: str, problem: str) -> bool:
        """A reply of ``model`` failed its check: escalate past it when the cascade can."""
        index = index_of(self.candidates, model)
        nxt = cascade_above(self.route, self.candidates, index)
        if nxt is None or index < state.level:
            # Nothing stronger, or this model served although the cascade is already past
            # it (those above it cannot serve now): its reply is the best there is.
            return False
        state.level = max(state.level, nxt)
        state.last = model
        self._note(f"reply of {model} failed its check ({problem}); escalating")
        return True

    # Calls.

    async def chat(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[ToolSpec] = (),
        tool_choice: str = "auto",
        parallel_tool_calls: bool = True,
        response_format: Mapping[str, Any] | None = None,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
    ) -> Reply:
        options: dict[str, Any] = {
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": parallel_tool_calls,
            "response_format": response_format,
            "max_tokens": max_tokens,
            "stop": stop,
            "temperature": temperature,
        }
        turns = [dict(m) for m in messages]
        new_text = " ".join(str(m.get("content") or "") for m in turns)
        schemas = {t.name: t.parameters for t in tools}
        json_wanted, schema = json_format(response_format)
        failed: dict[str, str] = {}
        await self._refresh()
        for _attempt in range(_MAX_ATTEMPTS):
            call, state = self._call(session_id, new_text, max_tokens, tools=bool(tools))
            choice = await self._choose(state, call, failed)
            model = choice.model
            assert model is not None
            try:
                reply = await self._chat_on(model, session_id, state, turns, options)
            except (EngineUnavailable, NoFreeSlot) as e:  # down, throttled, full
                failed[model] = self._failed(model, e)
                continue
            problem = reply_problem(
                reply.content,
                [(c.name, c.arguments, c.error) for c in reply.tool_calls],
                tools=schemas,
                json_wanted=json_wanted,
                schema=schema,
            )
            if problem and await self._check_failed(state, model, problem):
                self.charge(replace(reply, served_by=model))
                if model == self.home:
                    # Home holds the turns and the rejected reply; the conversation
                    # does not yet (the next model answers them).
                    state.drop = len(turns) + 1
                else:
                    del state.unsent[len(state.unsent) - len(turns) - 1 :]
                await self.events("Escalated", model, f"reply failed its check: {problem}")
                continue
            self._served(state, model, reply.time_to_first_token_s, reply.output_tokens)
            return replace(reply, served_by=model, routed=choice.reason)
        raise RouteUnavailable(f"no model of the route answered in {_MAX_ATTEMPTS} attempts")

    async def _chat_on(
        self,
        model: str,
        session_id: str,
        state: RouteSession,
        turns: list[dict[str, Any]],
        options: dict[str, Any],
    ) -> Reply:
        if model == self.home:
            if state.drop:
                history = self.conversation(session_id)
                await self.primary.reset_session(session_id)
                # Home is empty now: until it answers, the conversation is all unsent
                # (a failover after this point still has every turn).
                state.unsent, state.drop = history, 0
            reply = await self.primary.chat(session_id, [*state.unsent, *turns], **options)
            state.unsent = []
            return reply
        engine = await self._engine(model)
        history = self.conversation(session_id)
        reply = await chat_away(engine, session_id, [*history, *turns], options)
        state.unsent = [*state.unsent, *turns, reply.message()]
        return reply

    async def generate(
        self,
        session_id: str,
        prompt: str,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> Completion:
        options: dict[str, Any] = {
            "max_tokens": max_tokens,
            "stop": stop,
            "temperature": temperature,
            "grammar": grammar,
            "json_schema": json_schema,
        }
        failed: dict[str, str] = {}
        await self._refresh()
        for _attempt in range(_MAX_ATTEMPTS):
            call, state = self._call(session_id, prompt, max_tokens, tools=False)
            choice = await self._choose(state, call, failed)
            model = choice.model
            assert model is not None
            try:
                completion = await self._generate_on(model, session_id, state, prompt, options)
            except (EngineUnavailable, NoFreeSlot) as e:  # down, throttled, full
                failed[model] = self._failed(model, e)
                continue
            problem = reply_problem(
                completion.text,
                [],
                tools={},
                json_wanted=json_schema is not None,
                schema=json_schema,
            )
            if problem and await self._check_failed(state, model, problem):
                self.charge(replace(completion, served_by=model))
                await self.events("Escalated", model, f"reply failed its check: {problem}")
                continue
            state.transcript.extend((prompt, completion.text))
            if model != self.home:
                state.unsent_text += prompt + completion.text
            self._served(state, model, completion.time_to_first_token_s, completion.output_tokens)
            return replace(completion, served_by=model, routed=choice.reason)
        raise RouteUnavailable(f"no model of the route answered in {_MAX_ATTEMPTS} attempts")

    async def _generate_on(
        self, model: str, session_id: str, state: RouteSession, prompt: str, options: dict[str, Any]
    ) -> Completion:
        if model == self.home:
            completion = await self.primary.generate(
                session_id, state.unsent_text + prompt, **options
            )
            state.unsent_text = ""
            return completion
        engine = await self._engine(model)
        return await generate_away(engine, session_id, "".join(state.transcript) + prompt, options)

    async def stream(
        self,
        session_id: str,
        prompt: str,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        grammar: str | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        # A stream is routed as a whole: it is answered by one generate and yielded at once.
        completion = await self.generate(
            session_id,
            prompt,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            grammar=grammar,
            json_schema=json_schema,
        )
        usage = TokenUsage(
            completion.input_tokens, completion.cached_tokens, completion.output_tokens
        )
        yield StreamChunk(completion.text, ())
        yield StreamChunk("", (), True, completion.finish_reason, usage)
