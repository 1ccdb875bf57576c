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
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from agentos.core.chat import Reply, TokenUsage, ToolSpec
from agentos.core.fairness import QuotaExceeded
from agentos.core.limits import TaskLimitExceeded
from agentos.core.route import (
    Call,
    Candidate,
    Choice,
    ModelStats,
    choose,
    reply_problem,
    within,
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

__all__ = ["EXHAUSTED_WAIT_S", "RouteEngine", "RouteExhausted", "RouteUnavailable"]

log = logging.getLogger("agentos.routes")

EXHAUSTED_WAIT_S = 10.0
"""A call whose candidates are all cooling down waits this long at most for one."""
_MAX_ATTEMPTS = 8  # model calls one routed call may make (failovers and escalations)
_FULL_PAUSE_S = 1.0  # a candidate with no free slot is skipped this long
_MONEY = "remaining budget"  # how core.route says a candidate was skipped for the task's money
_DAILY = "daily cost left"  # ... and for the class's

Events = Callable[[str, str, str], Awaitable[None]]


@dataclass(slots=True)
class _Session:
    """What the route keeps of one agent's session."""

    unsent: list[dict[str, Any]] = field(default_factory=list)  # chat turns home lacks
    unsent_text: str = ""  # text the home context lacks (generate)
    # Trailing messages home holds that the conversation does not (a rejected reply and
    # the turns it answered): home is rebuilt from the conversation before its next call.
    drop: int = 0
    level: int = 0  # the cascade's escalation level in this task: the lowest candidate
    served: int = -1  # the candidate that served this task's last call (-1: none yet)
    task: str = ""  # the task the level belongs to
    last: str = ""  # the model that served the last call
    transcript: list[str] = field(default_factory=list)  # text prompts and answers


async def _no_events(_type: str, _reason: str, _message: str) -> None:
    return None


async def _no_limit() -> float | None:
    return None


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
        self._sessions: dict[str, _Session] = {}
        # Set by the runner: where events go, what the task has cost, which task runs.
        self.events: Events = _no_events
        self.spent: Callable[[], float] = lambda: 0.0
        self.task_id: Callable[[], str] = lambda: ""
        self.class_left: Callable[[], Awaitable[float | None]] = _no_limit
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
            kept = self._sessions[session_id] = _Session()
            kept.task, kept.level, kept.served = state.task, state.level, state.served
            kept.last = state.last  # the choice is unchanged: no new Routed event

    def _state(self, session_id: str) -> _Session:
        state = self._sessions.get(session_id)
        if state is None:
            state = self._sessions[session_id] = _Session()
        task = self.task_id()
        if task != state.task:
            state.task, state.level, state.served = task, 0, -1
        return state

    # Escalation.

    def escalate(self, session_id: str, reason: str) -> bool:
        """Send the rest of this task's calls to the candidate after the one that served
        the last call (``ctx.llm.escalate``); False when there is none."""
        state = self._state(session_id)
        nxt = self._above(max(state.level, state.served))
        if nxt is None:
            return False
        state.level = nxt
        self._note(f"escalated to {self.candidates[nxt].name}: {reason}")
        return True

    def _above(self, index: int) -> int | None:
        """The next cascade candidate after ``index`` that may see the agent's data
        (None: none, or not a cascade)."""
        if self.route.strategy != "cascade":
            return None
        for j in range(index + 1, len(self.candidates)):
            c = self.candidates[j]
            if within(c.boundary, self.route.data_class, c.region):
                return j
        return None

    def _index(self, model: str) -> int:
        for index, c in enumerate(self.candidates):
            if c.name == model:
                return index
        return 0

    def _note(self, text: str) -> None:
        log.info("%s: %s", self.agent, text)

    # Choosing.

    async def _refresh(self) -> None:
        """Take the candidates' Models as stored now (a re-apply changes the next call)."""
        if self.refresh is not None:
            self.candidates = tuple(await self.refresh())

    def _call(
        self, session_id: str, new_text: str, max_tokens: int, *, tools: bool
    ) -> tuple[Call, _Session]:
        state = self._state(session_id)
        history = 0
        if self.primary.has_session(session_id):
            history = self.primary.session_info(session_id).n_tokens
        history += sum(self.count_tokens(str(m.get("content") or "")) for m in state.unsent)
        history += self.count_tokens(state.unsent_text) if state.unsent_text else 0
        warm = {self.home} if not state.drop else set()
        if state.last and state.last != self.home:
            warm.add(state.last)  # its prefix cache holds the conversation
        call = Call(
            new_tokens=self.count_tokens(new_text),
            history_tokens=history,
            max_tokens=max_tokens,
            needs_tools=tools,
            warm=frozenset(warm),
        )
        return call, state

    async def _choose(self, state: _Session, call: Call, failed: dict[str, str]) -> Choice:
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
            cooling = [
                s.cooldown_until
                for c in self.candidates
                if (s := self.stats.get(c.name)) is not None
                and s.cooldown_until > now
                and c.name not in failed
            ]
            if cooling and not waited and min(cooling) - now <= EXHAUSTED_WAIT_S:
                waited = True
                await anyio.sleep(max(0.0, min(cooling) - now))
                continue
            await self._exhausted(choice)

    async def _exhausted(self, choice: Choice) -> None:
        """Nothing can serve the call: park it, fail it, or end it for money (see the
        module docstring)."""
        skipped = choice.skipped_text()
        await self.events("RouteExhausted", self.route.on_exhausted, skipped)
        money = [why for _, why in choice.skipped if _MONEY in why or _DAILY in why]
        if any(_DAILY in why for why in money):
            raise QuotaExceeded(
                kind="budget",
                scope="class",
                quota_class=self.quota_class,
                limit="dailyCost",
                retry_after_s=self.day_resets_in(),
                agent=self.agent,
            )
        if money:
            # The task's own money is spent: like maxTokensPerTask, the task ends (a
            # retry would find the same budget spent; it is not a crash).
            raise TaskLimitExceeded(
                f"maxCostPerTask: the task has spent {self.spent():.6g} of "
                f"{self.route.max_cost_per_task:g} and no model fits in the rest ({skipped})"
            )
        message = f"no model of the route can serve: {skipped}"
        if self.route.on_exhausted == "fail":
            raise RouteExhausted(message)
        raise RouteUnavailable(message)

    async def _engine(self, model: str) -> Engine:
        return self.primary if model == self.home else await self._resolve(model)

    def _failed(self, model: str, error: EngineError) -> str:
        why = f"{type(error).__name__}: {error}"[:300]
        # A full model frees a slot soon; one that failed is left alone for the cooldown.
        pause = _FULL_PAUSE_S if isinstance(error, NoFreeSlot) else self.route.cooldown
        self.stats.setdefault(model, ModelStats()).cool(self.clock() + pause, why)
        log.warning("%s: model %s failed (%s); routing again", self.agent, model, why)
        return f"failed this call: {why}"

    def _served(self, state: _Session, model: str, ttft_s: float, output_tokens: int) -> None:
        self.stats.setdefault(model, ModelStats()).observe(
            ttft_s=ttft_s, output_tokens=output_tokens
        )
        state.last = model
        state.served = self._index(model)

    async def _check_failed(self, state: _Session, model: str, problem: str) -> bool:
        """A reply of ``model`` failed its check: escalate past it when the cascade can."""
        index = self._index(model)
        nxt = self._above(index)
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
        json_wanted, schema = _json_format(response_format)
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
        state: _Session,
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
        ephemeral = f"{session_id}.route"
        engine.open_session(ephemeral)
        try:
            reply = await engine.chat(ephemeral, [*history, *turns], **options)
        finally:
            engine.close_session(ephemeral)
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
        self, model: str, session_id: str, state: _Session, prompt: str, options: dict[str, Any]
    ) -> Completion:
        if model == self.home:
            completion = await self.primary.generate(
                session_id, state.unsent_text + prompt, **options
            )
            state.unsent_text = ""
            return completion
        engine = await self._engine(model)
        ephemeral = f"{session_id}.route"
        engine.open_session(ephemeral)
        try:
            text = "".join(state.transcript) + prompt
            return await engine.generate(ephemeral, text, **options)
        finally:
            engine.close_session(ephemeral)

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


def _json_format(
    response_format: Mapping[str, Any] | None,
) -> tuple[bool, Mapping[str, Any] | None]:
    """Whether ``response_format`` asks for JSON, and its schema when it gives one."""
    if not response_format:
        return False, None
    kind = response_format.get("type")
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        return True, schema if isinstance(schema, Mapping) else None
    return False, None
