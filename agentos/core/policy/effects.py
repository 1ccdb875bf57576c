"""What a rule does to a class's limits: scale or set, clamp, and step bookkeeping.

A ``scale`` rule compounds with each step and moves only the load limits (daily budgets
are money, not load); a ``set`` rule has one step; ``min`` / ``max`` clamp the class and
only bound how far a scale moves per-agent limits. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Final

from agentos.core.policy.quotas import _FIELDS, Limits, RuleMemory
from agentos.core.spec.quota import QuotaLimits, Rule

# Load limits a scale moves; daily budgets are money, not load, so only a set changes them.
_SCALED: Final = ("tokens_per_minute", "max_concurrent")


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
