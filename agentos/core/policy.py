"""The quota policy evaluator: from declared policies, fleet metrics and time to effective quotas.

A QuotaPolicy declares each class's limits and rules that rescale them while the fleet
runs ("halve batch's rate while the queue wait stays above 2s for 30s"). Whether a rule
fires, steps again, or gives way depends on how long its condition has held, on its
``for``, ``cooldown`` and ``stabilization``, so the evaluator carries a small memory per
rule from one evaluation to the next. Doing this in one pure function,
:func:`evaluate`, with ``now`` and that memory passed in and returned, lets every
daemon compute the same answer from what is stored in Redis, lets ``agentos policy
explain`` show why a limit is what it is, and lets tests replay hours of metrics in
microseconds. No I/O happens here: the caller reads the inputs and stores the results
(:meth:`ClassQuota.to_json`, :meth:`RuleMemory.to_json`).

Semantics in brief (the docstring of :func:`evaluate` has the details):

* A rule's condition holds when its metric is known and compares true, and the policy's
  local time is inside its hours and weekdays. A missing metric is "no data": it never
  holds.
* Once it has held for ``for``, the rule applies one step; a ``scale`` rule applies
  another every ``cooldown`` while it keeps holding (compounding), until the limits stop
  changing; a ``set`` rule has one step.
* When the condition has not held for ``stabilization``, the rule's steps are undone at
  once ("restored"); holding again before that keeps the rule in effect.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final, get_args
from zoneinfo import ZoneInfo

from agentos.core.durations import format_duration
from agentos.core.spec import QuotaLimits, QuotaPolicyResource, Rule, RuleWhen, Weekday

__all__ = [
    "METRIC_HELP",
    "Change",
    "ClassQuota",
    "Evaluation",
    "Limits",
    "RuleMemory",
    "RuleStatus",
    "base_quotas",
    "evaluate",
]

METRIC_HELP: Final[dict[str, str]] = {
    "queue_wait_p95_s": "95th percentile of how long inference calls waited to be admitted "
    "(seconds)",
    "slot_utilisation": "share of the engines' inference slots in use (0 to 1)",
    "budget_burn_rate": "pace of spending the daily budgets: share of the budget spent over "
    "share of the day gone (1 = on pace to spend exactly the budget)",
    "error_rate": "share of inference calls that failed (0 to 1)",
    "throttle_rate": "share of inference calls delayed or refused by a quota (0 to 1)",
}
"""One line per metric a rule can watch, with its unit (``agentos policy explain``)."""

# (field name, key in YAML and JSON), in the spec's order.
_FIELDS: Final[tuple[tuple[str, str], ...]] = tuple(
    (name, field.alias or name) for name, field in QuotaLimits.model_fields.items()
)
_KEY: Final[dict[str, str]] = dict(_FIELDS)
# Load limits a scale moves; daily budgets are money, not load, so only a set changes them.
_SCALED: Final = ("tokens_per_minute", "max_concurrent")
_WEEKDAYS: Final[tuple[Weekday, ...]] = get_args(Weekday)  # in datetime.weekday() order


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class Limits:
    """A set of quota limits in force; ``None`` is unlimited."""

    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    daily_agent_seconds: int | None = None

    @classmethod
    def from_spec(cls, spec: QuotaLimits | None) -> Limits:
        """Return the limits declared by ``spec`` (all unlimited for ``None``)."""
        if spec is None:
            return cls()
        return cls(**{name: getattr(spec, name) for name, _ in _FIELDS})

    def to_json(self) -> dict[str, int]:
        """Return the limits with the spec's camelCase keys, unlimited ones left out."""
        return {key: value for name, key in _FIELDS if (value := getattr(self, name)) is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Limits:
        """Return the limits of :meth:`to_json` output; unknown keys are ignored."""
        return cls(**{name: _optional_int(data.get(key)) for name, key in _FIELDS})

    def describe(self) -> str:
        """Return e.g. ``"tokensPerMinute=5000 maxConcurrent=1"``, or ``"unlimited"``."""
        return " ".join(f"{key}={value}" for key, value in self.to_json().items()) or "unlimited"


@dataclass(frozen=True, slots=True)
class ClassQuota:
    """A quota class's limits in force now, what was declared, and the rules behind it.

    ``limits`` are shared by all agents of the class, ``per_agent`` apply to each agent
    on its own. ``rules`` describes the rules in effect, e.g.
    ``("shed-batch-under-pressure x2 (scale 0.25)",)``.
    """

    name: str
    policy: str
    timezone: str
    limits: Limits
    per_agent: Limits
    base: Limits
    base_per_agent: Limits
    rules: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Return plain JSON data that :meth:`from_json` turns back into an equal quota."""
        return {
            "name": self.name,
            "policy": self.policy,
            "timezone": self.timezone,
            "limits": self.limits.to_json(),
            "perAgent": self.per_agent.to_json(),
            "base": self.base.to_json(),
            "basePerAgent": self.base_per_agent.to_json(),
            "rules": list(self.rules),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClassQuota:
        """Return the quota of :meth:`to_json` output.

        Raises:
            KeyError: if ``name``, ``policy`` or ``timezone`` is missing.
        """
        return cls(
            name=str(data["name"]),
            policy=str(data["policy"]),
            timezone=str(data["timezone"]),
            limits=Limits.from_json(data.get("limits", {})),
            per_agent=Limits.from_json(data.get("perAgent", {})),
            base=Limits.from_json(data.get("base", {})),
            base_per_agent=Limits.from_json(data.get("basePerAgent", {})),
            rules=tuple(str(reason) for reason in data.get("rules", ())),
        )


@dataclass(frozen=True, slots=True)
class RuleMemory:
    """What the evaluator remembers about one rule between evaluations.

    ``since``: when the condition started to hold without a break (``None`` while it does
    not hold). ``clear_since``: when it stopped holding while the rule is in effect.
    ``steps``: how many times the rule's effect is applied now (0: not in effect).
    ``changed_at``: when ``steps`` last changed (the start of the cooldown).
    """

    since: float | None = None
    clear_since: float | None = None
    steps: int = 0
    changed_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Return plain JSON data (unset times left out) for :meth:`from_json`."""
        data: dict[str, Any] = {"steps": self.steps}
        for key, value in (
            ("since", self.since),
            ("clearSince", self.clear_since),
            ("changedAt", self.changed_at),
        ):
            if value is not None:
                data[key] = value
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RuleMemory:
        """Return the memory of :meth:`to_json` output; missing keys take their defaults."""
        return cls(
            since=_optional_float(data.get("since")),
            clear_since=_optional_float(data.get("clearSince")),
            steps=int(data.get("steps", 0)),
            changed_at=_optional_float(data.get("changedAt")),
        )


@dataclass(frozen=True, slots=True)
class Change:
    """One rescale made by a rule, to be recorded as an event.

    ``action`` is ``"rescaled"`` (a step applied) or ``"restored"`` (the rule's steps
    undone). ``before`` / ``after`` are the class-level limits; ``reason`` is a sentence
    with the metric's value, the threshold, how long, and every limit that changed.
    """

    policy: str
    rule: str
    class_: str
    action: str
    before: Limits
    after: Limits
    reason: str


@dataclass(frozen=True, slots=True)
class RuleStatus:
    """Where one rule stands after an evaluation (a line of ``agentos policy explain``).

    ``state`` is ``"idle"`` (not in effect and not about to be), ``"pending"`` (the
    condition holds, waiting for ``for``), ``"active"`` (in effect, nothing blocks it),
    ``"cooling"`` (the cooldown blocks its next step) or ``"recovering"`` (the condition
    stopped holding; the stabilization window runs). ``wait_s`` is what is left of the
    for / cooldown / stabilization that blocks the next change. ``next`` is what the
    class's limits would be after this rule's next change (``None``: it would change
    nothing).
    """

    policy: str
    rule: str
    class_: str
    metric: str | None
    value: float | None
    condition: str
    holds: bool
    held_for_s: float
    steps: int
    state: str
    wait_s: float
    current: Limits
    next: Limits | None
    message: str


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The result of :func:`evaluate`.

    ``memory`` is keyed ``"<policy>/<rule>"`` and replaces the memory passed in.
    """

    quotas: dict[str, ClassQuota]
    memory: dict[str, RuleMemory]
    changes: tuple[Change, ...]
    rules: tuple[RuleStatus, ...]


# ------------------------------------------------------------------------------ effects


def _scaled(limits: Limits, factor: float) -> Limits:
    tokens, concurrent = limits.tokens_per_minute, limits.max_concurrent
    return replace(
        limits,
        tokens_per_minute=None if tokens is None else max(1, round(tokens * factor)),
        # The epsilon keeps 3 * 0.1 * 10 from flooring to 2.
        max_concurrent=(
            None if concurrent is None else max(1, math.floor(concurrent * factor + 1e-9))
        ),
    )


def _clamped(limits: Limits, low: QuotaLimits | None, high: QuotaLimits | None) -> Limits:
    values: dict[str, int | None] = {}
    for name, _ in _FIELDS:
        value: int | None = getattr(limits, name)
        floor = None if low is None else getattr(low, name)
        ceiling = None if high is None else getattr(high, name)
        if value is not None and floor is not None:
            value = max(value, floor)
        if ceiling is not None:
            value = ceiling if value is None else min(value, ceiling)
        values[name] = value
    return Limits(**values)


def _scaled_per_agent(
    before: Limits, factor: float, low: QuotaLimits | None, high: QuotaLimits | None
) -> Limits:
    # The rule's min / max are written for the class. Per-agent limits are usually far
    # below them, so a plain clamp would raise them; instead they only bound how far the
    # scaling may move a per-agent limit (never below min, never above max, never past
    # where it started), so that a clamped class does not keep shrinking its agents.
    after = _scaled(before, factor)
    values: dict[str, int | None] = {}
    for name in _SCALED:
        start: int | None = getattr(before, name)
        value: int | None = getattr(after, name)
        if start is None or value is None:
            values[name] = value
            continue
        floor = None if low is None else getattr(low, name)
        ceiling = None if high is None else getattr(high, name)
        if floor is not None:
            value = max(value, min(floor, start))
        if ceiling is not None:
            value = min(value, max(ceiling, start))
        values[name] = value
    return replace(after, **values)


def _applied(rule: Rule, steps: int, quota: tuple[Limits, Limits]) -> tuple[Limits, Limits]:
    if steps <= 0:
        return quota
    limits, per_agent = quota
    then = rule.then
    if then.scale is not None:
        factor = then.scale**steps
        limits = _scaled(limits, factor)
        per_agent = _scaled_per_agent(per_agent, factor, then.min, then.max)
    elif then.set is not None:
        given = {
            name: value for name, _ in _FIELDS if (value := getattr(then.set, name)) is not None
        }
        limits = replace(limits, **given)
    return _clamped(limits, then.min, then.max), per_agent


def _effective(
    base: tuple[Limits, Limits], rules: Sequence[Rule], steps: Mapping[str, int]
) -> tuple[Limits, Limits]:
    quota = base
    for rule in rules:
        quota = _applied(rule, steps.get(rule.name, 0), quota)
    return quota


def _max_steps(rule: Rule) -> int | None:
    return 1 if rule.then.set is not None else None


def _observed(before: RuleMemory, holds: bool, steps: int, now: float) -> RuleMemory:
    """Return the memory with ``since`` / ``clear_since`` brought up to ``now``."""
    if holds:
        since = now if before.since is None else before.since
        return replace(before, since=since, clear_since=None, steps=steps)
    if steps > 0:
        clear_since = now if before.clear_since is None else before.clear_since
        return replace(before, since=None, clear_since=clear_since, steps=steps)
    return replace(before, since=None, clear_since=None, steps=steps)


def _stored_steps(rule: Rule, memory: RuleMemory) -> int:
    # The rule may have changed since the memory was written (a scale became a set).
    limit = _max_steps(rule)
    steps = max(0, memory.steps)
    return steps if limit is None else min(steps, limit)


def _in_effect(rule: Rule, steps: int) -> str:
    if rule.then.scale is not None:
        return f"{rule.name} x{steps} (scale {rule.then.scale**steps:.4g})"
    return f"{rule.name} (set {Limits.from_spec(rule.then.set).describe()})"


# ---------------------------------------------------------------------------- conditions


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _metric_holds(when: RuleWhen, value: float | None) -> bool:
    if when.metric is None:
        return True
    if value is None:
        return False
    if when.above is not None:
        return value > when.above
    return when.below is not None and value < when.below


def _window_holds(when: RuleWhen, local: datetime) -> bool:
    if when.weekdays is not None and _WEEKDAYS[local.weekday()] not in when.weekdays:
        return False
    window = when.hours_window
    if window is None:
        return True
    start, end = window
    moment = local.time()
    return start <= moment < end if start < end else (moment >= start or moment < end)


def _comparison(when: RuleWhen) -> tuple[str, float]:
    if when.above is not None:
        return ">", when.above
    assert when.below is not None  # a validated metric condition has one of them
    return "<", when.below


def _window(when: RuleWhen) -> str:
    days = ", ".join(when.weekdays or ())
    if when.hours is not None:
        return f"hours {when.hours}" + (f" on {days}" if days else "")
    return f"weekdays {days}"


def _has_window(when: RuleWhen) -> bool:
    return when.hours is not None or when.weekdays is not None


def _condition(when: RuleWhen, timezone: str) -> str:
    parts: list[str] = []
    if when.metric is not None:
        op, threshold = _comparison(when)
        text = f"{when.metric} {op} {threshold:g}"
        if when.for_ > 0:
            text += f" for {format_duration(when.for_)}"
        parts.append(text)
    if _has_window(when):
        parts.append(_window(when))
    text = ", ".join(parts)
    return f"{text} ({timezone})" if _has_window(when) else text


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return format_duration(round(seconds, 3) if seconds < 1 else float(round(seconds)))


def _fired_because(when: RuleWhen, value: float | None, timezone: str, held_s: float) -> str:
    parts: list[str] = []
    if when.metric is not None and value is not None:
        op, threshold = _comparison(when)
        text = f"{when.metric} was {value:.4g} ({op} {threshold:g})"
        parts.append(f"{text} for {_duration(held_s)}" if held_s > 0 else text)
    if _has_window(when):
        parts.append(f"inside {_window(when)} {timezone}")
    return ", ".join(parts)


def _cleared_because(when: RuleWhen, value: float | None, timezone: str, clear_s: float) -> str:
    if when.metric is not None and not _metric_holds(when, value):
        op, threshold = _comparison(when)
        if value is None:
            what = f"{when.metric} has no data"
        else:
            what = f"{when.metric} back to {value:.4g} (not {op} {threshold:g})"
    else:
        what = f"outside {_window(when)} {timezone}"
    return f"{what} for {_duration(clear_s)}" if clear_s > 0 else what


def _show_limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _differences(before: tuple[Limits, Limits], after: tuple[Limits, Limits]) -> str:
    parts: list[str] = []
    for prefix, old, new in (("", before[0], after[0]), ("perAgent.", before[1], after[1])):
        for name, key in _FIELDS:
            was, now = getattr(old, name), getattr(new, name)
            if was != now:
                parts.append(f"{prefix}{key} {_show_limit(was)} -> {_show_limit(now)}")
    return ", ".join(parts) or "no limit changes"


# ---------------------------------------------------------------------------- evaluation


@dataclass(frozen=True, slots=True)
class _Class:
    name: str
    policy: str
    timezone: str
    order: int  # the policy's place by name, to list rules policy by policy
    base: tuple[Limits, Limits]
    rules: tuple[tuple[int, Rule], ...]  # (index in the policy, rule), in policy order


def _classes(policies: Mapping[str, QuotaPolicyResource]) -> list[_Class]:
    # A class defined by two policies belongs to the first by name; the other's
    # definition and its rules for that class are ignored (the caller reports the clash).
    owned: dict[str, _Class] = {}
    for order, policy_name in enumerate(sorted(policies)):
        spec = policies[policy_name].spec
        for class_name, declared in spec.classes.items():
            if class_name in owned:
                continue
            owned[class_name] = _Class(
                name=class_name,
                policy=policy_name,
                timezone=spec.timezone,
                order=order,
                base=(Limits.from_spec(declared), Limits.from_spec(declared.per_agent)),
                rules=tuple(
                    (index, rule)
                    for index, rule in enumerate(spec.rules)
                    if rule.then.class_ == class_name
                ),
            )
    return list(owned.values())


def _quota(cls: _Class, quota: tuple[Limits, Limits], reasons: tuple[str, ...]) -> ClassQuota:
    return ClassQuota(
        name=cls.name,
        policy=cls.policy,
        timezone=cls.timezone,
        limits=quota[0],
        per_agent=quota[1],
        base=cls.base[0],
        base_per_agent=cls.base[1],
        rules=reasons,
    )


def base_quotas(policies: Mapping[str, QuotaPolicyResource]) -> dict[str, ClassQuota]:
    """Return every class's quota as declared, with no rule in effect.

    Classes are keyed by name; a class defined by several policies comes from the first
    policy by name.
    """
    return {cls.name: _quota(cls, cls.base, ()) for cls in _classes(policies)}


def evaluate(
    policies: Mapping[str, QuotaPolicyResource],
    metrics: Mapping[str, float],
    now: float,
    memory: Mapping[str, RuleMemory],
) -> Evaluation:
    """Return the effective quotas at ``now`` (epoch seconds), and what changed and why.

    ``policies`` are keyed by name; ``metrics`` holds the fleet metrics by name (a metric
    that is missing, or not a finite number, has no data); ``memory`` is the previous
    evaluation's :attr:`Evaluation.memory` (empty the first time).

    Rules of a class apply in policy order, each to what the rules before it made of the
    class's limits. A ``scale`` rule multiplies tokensPerMinute (rounded) and
    maxConcurrent (floored) of the class, and of its per-agent limits, by
    ``scale ** steps``, never below 1; a ``set`` rule replaces the class limits it
    gives. Then the rule's ``min`` / ``max`` clamp the class limits (a ``max`` also caps
    an unlimited one); for per-agent limits they only bound how far a scale moves them.
    A step that would leave the class's limits (shared and per agent) as they are is not
    taken, so a rule clamped at its ``min`` stops recording changes. A rule that was
    restored waits for its cooldown before it steps again.

    A class defined by several policies comes from the first policy by name; the other
    policies' rules for it are ignored. The returned memory holds every rule evaluated;
    memory of rules that are no longer in any policy is dropped.
    """
    quotas: dict[str, ClassQuota] = {}
    memories: dict[str, RuleMemory] = {}
    changes: list[tuple[tuple[int, int], Change]] = []
    statuses: list[tuple[tuple[int, int], RuleStatus]] = []
    for cls in _classes(policies):
        local = datetime.fromtimestamp(now, ZoneInfo(cls.timezone))
        rules = [rule for _, rule in cls.rules]
        values = {
            rule.name: _number(metrics.get(rule.when.metric)) if rule.when.metric else None
            for rule in rules
        }
        holds = {
            rule.name: _metric_holds(rule.when, values[rule.name])
            and _window_holds(rule.when, local)
            for rule in rules
        }
        remembered = {
            rule.name: memory.get(f"{cls.policy}/{rule.name}", RuleMemory()) for rule in rules
        }
        steps = {rule.name: _stored_steps(rule, remembered[rule.name]) for rule in rules}
        updated: dict[str, RuleMemory] = {}

        for index, rule in cls.rules:
            mem = _observed(remembered[rule.name], holds[rule.name], steps[rule.name], now)
            current = _effective(cls.base, rules, steps)
            change: tuple[str, dict[str, int], str] | None = None
            if holds[rule.name]:
                assert mem.since is not None
                held_s = now - mem.since
                limit = _max_steps(rule)
                if (
                    held_s >= rule.when.for_
                    and (mem.changed_at is None or now - mem.changed_at >= rule.cooldown)
                    and (limit is None or steps[rule.name] < limit)
                ):
                    stepped = {**steps, rule.name: steps[rule.name] + 1}
                    why = _fired_because(rule.when, values[rule.name], cls.timezone, held_s)
                    change = ("rescaled", stepped, why)
            elif mem.steps > 0:
                assert mem.clear_since is not None
                clear_s = now - mem.clear_since
                if clear_s >= rule.stabilization:
                    restored = {**steps, rule.name: 0}
                    why = _cleared_because(rule.when, values[rule.name], cls.timezone, clear_s)
                    change = ("restored", restored, why)
            if change is not None:
                action, new_steps, why = change
                after = _effective(cls.base, rules, new_steps)
                if action == "restored" or after != current:
                    steps = new_steps
                    mem = replace(mem, steps=new_steps[rule.name], changed_at=now, clear_since=None)
                    verb = "restored " if action == "restored" else ""
                    changes.append(
                        (
                            (cls.order, index),
                            Change(
                                policy=cls.policy,
                                rule=rule.name,
                                class_=cls.name,
                                action=action,
                                before=current[0],
                                after=after[0],
                                reason=f"{why}: {verb}{_differences(current, after)}",
                            ),
                        )
                    )
            updated[rule.name] = mem

        final = _effective(cls.base, rules, steps)
        reasons = tuple(_in_effect(rule, steps[rule.name]) for rule in rules if steps[rule.name])
        quotas[cls.name] = _quota(cls, final, reasons)
        for index, rule in cls.rules:
            memories[f"{cls.policy}/{rule.name}"] = updated[rule.name]
            status = _status(
                cls,
                rule,
                updated[rule.name],
                values[rule.name],
                holds[rule.name],
                now,
                steps,
                final,
            )
            statuses.append(((cls.order, index), status))

    return Evaluation(
        quotas=quotas,
        memory=memories,
        changes=tuple(change for _, change in sorted(changes, key=lambda item: item[0])),
        rules=tuple(status for _, status in sorted(statuses, key=lambda item: item[0])),
    )


def _status(
    cls: _Class,
    rule: Rule,
    mem: RuleMemory,
    value: float | None,
    holds: bool,
    now: float,
    steps: Mapping[str, int],
    final: tuple[Limits, Limits],
) -> RuleStatus:
    rules = [other for _, other in cls.rules]
    held_s = now - mem.since if holds and mem.since is not None else 0.0
    if not holds and mem.steps > 0:
        candidate = 0
    elif _max_steps(rule) is not None and mem.steps >= 1:
        candidate = None
    else:
        candidate = mem.steps + 1
    after = (
        None if candidate is None else _effective(cls.base, rules, {**steps, rule.name: candidate})
    )
    next_limits = None if after is None or after == final else after[0]
    cooldown_s = 0.0 if mem.changed_at is None else max(0.0, rule.cooldown - (now - mem.changed_at))
    wait_s = 0.0
    effect = f"in effect: {_in_effect(rule, mem.steps)}; " if mem.steps > 0 else ""
    if not holds:
        if mem.steps > 0:
            assert mem.clear_since is not None
            state = "recovering"
            wait_s = max(0.0, rule.stabilization - (now - mem.clear_since))
            message = (
                f"{effect}stopped holding {_duration(now - mem.clear_since)} ago, restores in "
                f"{_duration(wait_s)} unless it holds again"
            )
        else:
            state = "idle"
            message = "not in effect: " + _not_holding(rule.when, value, cls.timezone)
    elif next_limits is None:
        state = "active" if mem.steps > 0 else "idle"
        if mem.steps == 0:
            message = "holds, but applying it would not change the limits"
        elif rule.then.scale is not None:
            message = f"{effect}at its bounds, no further steps"
        else:
            message = f"in effect: {_in_effect(rule, mem.steps)}"
    elif held_s < rule.when.for_:
        state = "pending"
        wait_s = max(rule.when.for_ - held_s, cooldown_s)
        message = (
            f"{effect}holds for {_duration(held_s)} of {format_duration(rule.when.for_)}, "
            f"applies in {_duration(wait_s)}"
        )
    elif cooldown_s > 0:
        state = "cooling"
        wait_s = cooldown_s
        message = f"{effect}cooldown, next step in {_duration(wait_s)}"
    else:
        state = "active"
        message = f"{effect}applies at the next evaluation"
    if after is not None and next_limits is not None:
        message += f"; next: {_differences(final, after)}"
    return RuleStatus(
        policy=cls.policy,
        rule=rule.name,
        class_=cls.name,
        metric=rule.when.metric,
        value=value,
        condition=_condition(rule.when, cls.timezone),
        holds=holds,
        held_for_s=held_s,
        steps=mem.steps,
        state=state,
        wait_s=wait_s,
        current=final[0],
        next=next_limits,
        message=message,
    )


def _not_holding(when: RuleWhen, value: float | None, timezone: str) -> str:
    if when.metric is not None:
        op, threshold = _comparison(when)
        if value is None:
            return f"{when.metric} has no data"
        if not _metric_holds(when, value):
            return f"{when.metric} is {value:.4g} (needs {op} {threshold:g})"
    return f"outside {_window(when)} ({timezone})"
