"""The quota policy evaluator: one pure function from policies, metrics, time and memory.

See the package docstring (:mod:`agentos.core.policy`) for the semantics in brief and
:func:`evaluate` for the details. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from zoneinfo import ZoneInfo

from agentos.core.durations import format_duration
from agentos.core.policy.conditions import (
    _cleared_because,
    _condition,
    _differences,
    _duration,
    _fired_because,
    _metric_holds,
    _not_holding,
    _number,
    _window_holds,
)
from agentos.core.policy.effects import (
    _effective,
    _in_effect,
    _max_steps,
    _observed,
    _stored_steps,
)
from agentos.core.policy.quotas import (
    Change,
    ClassQuota,
    Evaluation,
    Limits,
    RuleMemory,
    RuleStatus,
)
from agentos.core.spec.quota import QuotaPolicyResource, Rule

__all__ = ["base_quotas", "evaluate"]


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
