"""What a route keeps of one agent's session, and the pure steps of a routed call.

:class:`RouteSession` is the route's memory of one session: the turns other models
answered that the home model has not seen yet, the cascade's level in the running task,
the model that served last. The rest are steps of :class:`~agentos.runtime.routes.RouteEngine`
with no state of their own: the error a call ends with when no candidate can serve
(:func:`exhausted_error`), a call on a candidate other than home in a short-lived
session (:func:`chat_away`, :func:`generate_away`), and what a ``response_format`` asks
for. Kept apart from the engine, which decides where each call goes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentos.core.chat import Reply
from agentos.core.fairness import QuotaExceeded
from agentos.core.limits import TaskLimitExceeded
from agentos.core.route import Call, Candidate, Choice, ModelStats, within
from agentos.core.routespec import Route
from agentos.engine.base import Completion, Engine, RouteExhausted, RouteUnavailable

__all__ = [
    "Events",
    "RouteSession",
    "call_of",
    "cascade_above",
    "chat_away",
    "cooling_until",
    "exhausted_error",
    "generate_away",
    "index_of",
    "json_format",
    "no_events",
    "no_limit",
]

_MONEY = "remaining budget"  # how core.route says a candidate was skipped for the task's money
_DAILY = "daily cost left"  # ... and for the class's

Events = Callable[[str, str, str], Awaitable[None]]


@dataclass(slots=True)
class RouteSession:
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


async def no_events(_type: str, _reason: str, _message: str) -> None:
    return None


async def no_limit() -> float | None:
    return None


def call_of(
    primary: Engine,
    session_id: str,
    state: RouteSession,
    home: str,
    new_text: str,
    max_tokens: int,
    *,
    tools: bool,
) -> Call:
    """The call the router weighs: its new text, the history a candidate would prefill
    (home's context and the turns it lacks), and which models hold it warm."""
    history = 0
    if primary.has_session(session_id):
        history = primary.session_info(session_id).n_tokens
    history += sum(primary.count_tokens(str(m.get("content") or "")) for m in state.unsent)
    history += primary.count_tokens(state.unsent_text) if state.unsent_text else 0
    warm = {home} if not state.drop else set()
    if state.last and state.last != home:
        warm.add(state.last)  # its prefix cache holds the conversation
    return Call(
        new_tokens=primary.count_tokens(new_text),
        history_tokens=history,
        max_tokens=max_tokens,
        needs_tools=tools,
        warm=frozenset(warm),
    )


def cascade_above(route: Route, candidates: Sequence[Candidate], index: int) -> int | None:
    """The next cascade candidate after ``index`` that may see the agent's data
    (None: none, or not a cascade)."""
    if route.strategy != "cascade":
        return None
    for j in range(index + 1, len(candidates)):
        c = candidates[j]
        if within(c.boundary, route.data_class, c.region):
            return j
    return None


def index_of(candidates: Sequence[Candidate], model: str) -> int:
    """The position of ``model`` among ``candidates`` (0 when it is not one)."""
    for index, c in enumerate(candidates):
        if c.name == model:
            return index
    return 0


def cooling_until(
    candidates: Sequence[Candidate],
    stats: Mapping[str, ModelStats],
    now: float,
    failed: Mapping[str, str],
) -> float | None:
    """When the first candidate cooling down now (and not failed in this call) is
    available again; None when none is cooling down."""
    cooling = [
        s.cooldown_until
        for c in candidates
        if (s := stats.get(c.name)) is not None and s.cooldown_until > now and c.name not in failed
    ]
    return min(cooling) if cooling else None


def exhausted_error(
    route: Route,
    choice: Choice,
    *,
    agent: str,
    quota_class: str,
    spent: float,
    day_resets_in: Callable[[], float],
) -> BaseException:
    """What a call ends with when nothing can serve it: a park (the class's money, or
    the route's ``onExhausted: park``), the end of the task (its own money is spent) or
    :class:`RouteExhausted` to the agent (``fail``). A :class:`TaskLimitExceeded` is a
    ``BaseException``: agent code's ``except Exception`` does not keep the task going."""
    skipped = choice.skipped_text()
    money = [why for _, why in choice.skipped if _MONEY in why or _DAILY in why]
    if any(_DAILY in why for why in money):
        return QuotaExceeded(
            kind="budget",
            scope="class",
            quota_class=quota_class,
            limit="dailyCost",
            retry_after_s=day_resets_in(),
            agent=agent,
        )
    if money:
        # The task's own money is spent: like maxTokensPerTask, the task ends (a
        # retry would find the same budget spent; it is not a crash).
        return TaskLimitExceeded(
            f"maxCostPerTask: the task has spent {spent:.6g} of "
            f"{route.max_cost_per_task:g} and no model fits in the rest ({skipped})"
        )
    message = f"no model of the route can serve: {skipped}"
    if route.on_exhausted == "fail":
        return RouteExhausted(message)
    return RouteUnavailable(message)


async def chat_away(
    engine: Engine,
    session_id: str,
    messages: Sequence[Mapping[str, Any]],
    options: Mapping[str, Any],
) -> Reply:
    """A chat call on a candidate other than home, in a short-lived session there with
    the whole conversation (a re-prefill)."""
    ephemeral = f"{session_id}.route"
    engine.open_session(ephemeral)
    try:
        return await engine.chat(ephemeral, messages, **options)
    finally:
        engine.close_session(ephemeral)


async def generate_away(
    engine: Engine, session_id: str, text: str, options: Mapping[str, Any]
) -> Completion:
    """A generate call on a candidate other than home (see :func:`chat_away`)."""
    ephemeral = f"{session_id}.route"
    engine.open_session(ephemeral)
    try:
        return await engine.generate(ephemeral, text, **options)
    finally:
        engine.close_session(ephemeral)


def json_format(
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
