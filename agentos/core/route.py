"""Which model serves one call of a routed agent: filter, then choose, counting the move.

An agent's ``spec.route`` lists candidate models. For each call the router first
drops the candidates the call may not use, each with the reason it was skipped:

1. **data boundary** — a model whose ``dataBoundary`` lies outside the agent's
   ``dataClass`` never sees its data, whatever else happens (failover included);
2. **capabilities** — tools offered to a model that cannot call them, a conversation
   longer than its context;
3. **health** — a model cooling down after a failed call (429, 5xx, timeout), or one
   whose engine cannot start;
4. **budget** — a call whose projected cost would pass the task's ``maxCostPerTask``
   or the class's remaining ``dailyCost``;
5. **latency** — a model whose observed time to first token is over ``ttftTarget``
   (a soft filter: used only when nothing faster is left).

Then the strategy chooses: ``cascade`` takes the first candidate at or above the
task's escalation level (the agent asked for a stronger model, or a reply failed its
own check), ``cheapest`` the lowest projected cost, ``fastest`` the lowest predicted
time to first token. The projected cost counts the move: a model that does not hold
the conversation (no warm KV, no prefix cache) must prefill all of it again, so the
history is priced at its full input price there and at its cached price where it is
warm. Pure: the caller passes the stats and ``now``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from agentos.core.spec.route import Route

__all__ = [
    "DEFAULT_BOUNDARY",
    "Call",
    "Candidate",
    "Choice",
    "ModelStats",
    "choose",
    "projected_cost",
    "reply_problem",
    "within",
]

DEFAULT_BOUNDARY = "host"
"""The data boundary of the daemon's own engine (``default``): it runs on the host."""

_EWMA = 0.3  # weight of the newest observation in a model's latency and output averages


def within(boundary: str, data_class: str, region: str | None = None) -> bool:
    """Whether data sent to a model with ``boundary`` stays within ``data_class``.

    ``host`` ⊂ ``site`` ⊂ ``region:NAME`` ⊂ ``any``: a model that keeps data on its
    host satisfies every class; a hosted model (``any``) only ``any``; two regions
    never satisfy each other. A model on a host or site declared in another ``region``
    (its ``placement.region``) does not satisfy ``region:NAME``.
    """
    if data_class == "any":
        return True
    if boundary == "any":
        return False
    if data_class.startswith("region:") and boundary in ("host", "site"):
        return region is None or data_class == f"region:{region}"
    if boundary == "host":
        return True
    if boundary == "site":
        return data_class != "host"
    # boundary is region:NAME
    return data_class == boundary


@dataclass(frozen=True, slots=True)
class Candidate:
    """One model of a route as the router sees it (from its Model resource)."""

    name: str
    boundary: str = DEFAULT_BOUNDARY
    input_price: float = 0.0  # per 1k tokens
    cached_price: float = 0.0
    output_price: float = 0.0
    tools: bool = True
    max_context: int | None = None
    region: str | None = None  # placement.region, where a host or site model is


@dataclass(slots=True)
class ModelStats:
    """What the router has seen of one model on this daemon."""

    ttft_s: float | None = None  # moving average of the time to first token
    output_tokens: float | None = None  # moving average of tokens generated per call
    cooldown_until: float = 0.0  # epoch seconds: skipped until then
    cooldown_why: str = ""
    down: str = ""  # why its engine cannot serve at all ("" while it can)

    def observe(self, *, ttft_s: float, output_tokens: int) -> None:
        """Fold one served call into the averages."""
        self.ttft_s = ttft_s if self.ttft_s is None else (1 - _EWMA) * self.ttft_s + _EWMA * ttft_s
        out = float(output_tokens)
        self.output_tokens = (
            out if self.output_tokens is None else (1 - _EWMA) * self.output_tokens + _EWMA * out
        )

    def cool(self, until: float, why: str) -> None:
        """Skip the model until ``until`` because ``why``."""
        self.cooldown_until = max(self.cooldown_until, until)
        self.cooldown_why = why


@dataclass(frozen=True, slots=True)
class Call:
    """The call being routed, in tokens."""

    new_tokens: int  # the prompt or the new turns
    history_tokens: int  # the conversation before them
    max_tokens: int
    needs_tools: bool = False
    warm: frozenset[str] = frozenset()  # models that hold the history already


@dataclass(frozen=True, slots=True)
class Choice:
    """The router's answer: ``model`` (None: every candidate was skipped), why, the
    projected cost, and every candidate skipped with its reason."""

    model: str | None
    reason: str
    projected_cost: float = 0.0
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def skipped_text(self) -> str:
        """``model: why; …`` for an event."""
        return "; ".join(f"{m}: {why}" for m, why in self.skipped)


def projected_cost(candidate: Candidate, call: Call, stats: ModelStats | None) -> float:
    """What ``call`` would cost on ``candidate``: the new tokens, the history (cached
    price where warm, a full re-prefill where not) and the expected output (the model's
    average so far, at most ``max_tokens``; half of it before any call)."""
    expected = call.max_tokens / 2
    if stats is not None and stats.output_tokens is not None:
        expected = stats.output_tokens
    expected = min(float(call.max_tokens), expected)
    history_price = candidate.cached_price if candidate.name in call.warm else candidate.input_price
    return (
        call.new_tokens * candidate.input_price
        + call.history_tokens * history_price
        + expected * candidate.output_price
    ) / 1000


def choose(
    route: Route,
    candidates: Sequence[Candidate],
    call: Call,
    *,
    stats: Mapping[str, ModelStats],
    now: float,
    level: int = 0,
    spent: float = 0.0,
    class_left: float | None = None,
    exclude: Mapping[str, str] | None = None,
) -> Choice:
    """The model for ``call`` (see the module docstring).

    ``level``: the cascade's escalation level in this task (0: the first candidate);
    ``spent``: what the task has cost so far; ``class_left``: what the quota class may
    still spend today (None: no limit); ``exclude``: models this call already failed on,
    with why.
    """
    skipped: list[tuple[str, str]] = []
    usable: list[tuple[int, Candidate, float]] = []
    slow: list[tuple[int, Candidate, float]] = []
    budget_left = None if route.max_cost_per_task is None else route.max_cost_per_task - spent
    for index, c in enumerate(candidates):
        why = _filtered(route, c, call, stats.get(c.name), now, (exclude or {}).get(c.name))
        cost = projected_cost(c, call, stats.get(c.name))
        if not why and budget_left is not None and cost > budget_left + 1e-12:
            why = f"projected cost {cost:.6g} is over the task's remaining budget {budget_left:.6g}"
        if not why and class_left is not None and cost > class_left + 1e-12:
            why = f"projected cost {cost:.6g} is over the class's daily cost left {class_left:.6g}"
        if why:
            skipped.append((c.name, why))
            continue
        s = stats.get(c.name)
        target = route.ttft_target
        if target is not None and s is not None and s.ttft_s is not None and s.ttft_s > target:
            slow.append((index, c, cost))
            continue
        usable.append((index, c, cost))
    note = ""
    if not usable and slow:
        usable = slow
        note = f" (every usable model is slower than the {route.ttft_target:g}s target)"
    else:
        for _, c, _ in slow:
            s = stats[c.name]
            skipped.append((c.name, f"time to first token {s.ttft_s:.3g}s over the target"))
    if not usable:
        return Choice(None, "no candidate can serve", 0.0, tuple(skipped))
    if route.strategy == "cheapest":
        index, c, cost = min(usable, key=lambda u: (u[2], u[0]))
        reason = f"cheapest: projected {cost:.6g}"
    elif route.strategy == "fastest":
        index, c, cost = min(usable, key=lambda u: (_ttft(stats.get(u[1].name)), u[0]))
        ttft = _ttft(stats.get(c.name))
        reason = "fastest: not measured yet" if ttft == 0.0 else f"fastest: ttft {ttft:.3g}s"
    else:
        above = [u for u in usable if u[0] >= level]
        index, c, cost = above[0] if above else usable[-1]
        if index == 0:
            reason = "cascade: first candidate"
        elif index == level:
            reason = f"cascade: escalated to level {level}"
        else:
            reason = f"cascade: candidate {index + 1} (those before it skipped)"
    if skipped:
        reason += " — skipped " + "; ".join(f"{m}: {w}" for m, w in skipped)
    return Choice(c.name, reason + note, cost, tuple(skipped))


def _ttft(stats: ModelStats | None) -> float:
    return 0.0 if stats is None or stats.ttft_s is None else stats.ttft_s


def _filtered(
    route: Route,
    c: Candidate,
    call: Call,
    stats: ModelStats | None,
    now: float,
    failed: str | None,
) -> str:
    """Why ``c`` may not serve ``call`` ("" when it may)."""
    if not within(c.boundary, route.data_class, c.region):
        where = f" in region {c.region}" if c.region else ""
        return f"data boundary {c.boundary}{where} is outside dataClass {route.data_class}"
    if call.needs_tools and not c.tools:
        return "cannot call tools"
    if c.max_context is not None:
        needed = call.history_tokens + call.new_tokens + call.max_tokens
        if needed > c.max_context:
            return f"needs {needed} tokens of context, has {c.max_context}"
    if failed:
        return failed
    if stats is not None:
        if stats.down:
            return f"down: {stats.down}"
        if stats.cooldown_until > now:
            left = math.ceil(stats.cooldown_until - now)
            return f"cooling down {left}s more ({stats.cooldown_why})"
    return ""


def reply_problem(
    content: str | None,
    tool_calls: Sequence[tuple[str, Mapping[str, Any], str | None]],
    *,
    tools: Mapping[str, Mapping[str, Any]],
    json_wanted: bool,
    schema: Mapping[str, Any] | None = None,
) -> str:
    """Why a reply fails the call's own check ("" when it passes): an empty answer, tool
    arguments that are not JSON or fail their tool's schema, a tool that was not
    offered, or text that is not the JSON (``schema``) the call asked for.

    ``tool_calls`` are (name, arguments, parse error) triples; ``tools`` maps the
    offered tools' names to their parameter schemas.
    """
    if not (content or "").strip() and not tool_calls:
        return "empty answer"
    for name, arguments, error in tool_calls:
        if error:
            return f"tool call {name}: {error}"
        if name not in tools:
            return f"tool call {name}: no such tool was offered"
        problem = _schema_problem(arguments, tools[name])
        if problem:
            return f"tool call {name}: {problem}"
    if json_wanted and not tool_calls:
        try:
            value = json.loads(content or "")
        except ValueError as e:
            return f"not valid JSON: {e}"
        if schema is not None:
            problem = _schema_problem(value, schema)
            if problem:
                return f"JSON does not fit the schema: {problem}"
    return ""


def _schema_problem(value: Any, schema: Mapping[str, Any]) -> str:
    try:
        validator = jsonschema.Draft202012Validator(dict(schema))
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except jsonschema.SchemaError:
        return ""  # a schema we cannot read is not the reply's fault
    if error is None:
        return ""
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where + ': ' if where else ''}{error.message}"[:300]
