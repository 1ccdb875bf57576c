"""``kind: QuotaPolicy``: quota classes and the rules that rescale them, with their checks.

A policy declares each class's limits (shared, and per agent) and rules that rescale
them while the fleet runs. What can be known before the fleet runs is checked here, so
that ``agentos apply`` refuses it: a rule for an unknown class, two rules with one name,
and two rules that would move the same limit of one class at the same time (which one
wins would depend on their order). The evaluator over these rules is
:mod:`agentos.core.policy`. Pure: validation only, no I/O.
"""

import re
from collections.abc import Sequence
from datetime import time
from typing import Final, Literal, Self, get_args

from pydantic import Field, field_validator, model_validator

from agentos.core.durations import Duration
from agentos.core.spec.route import FleetPrices
from agentos.core.specbase import (
    API_VERSION,
    Metadata,
    Name,
    TimeZoneName,
    _error,
    _errors,
    _Model,
    _show,
    _SubPath,
)

__all__ = [
    "METRICS",
    "ClassLimits",
    "Metric",
    "QuotaClass",
    "QuotaLimits",
    "QuotaPolicyResource",
    "QuotaPolicySpec",
    "Rule",
    "RuleThen",
    "RuleWhen",
    "Weekday",
]

_HOURS_RE = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")

Metric = Literal[
    "queue_wait_p95_s", "slot_utilisation", "budget_burn_rate", "error_rate", "throttle_rate"
]
METRICS: Final[tuple[Metric, ...]] = get_args(Metric)
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class QuotaLimits(_Model):
    """Limits of a quota class; a limit left out (``None``) is unlimited."""

    tokens_per_minute: int | None = Field(default=None, gt=0, strict=True)
    max_concurrent: int | None = Field(default=None, gt=0, strict=True)
    daily_tokens: int | None = Field(default=None, gt=0, strict=True)
    daily_agent_seconds: int | None = Field(default=None, gt=0, strict=True)


class ClassLimits(QuotaLimits):
    """Limits of a quota class.

    The class-level limits are shared by all agents of the class together; ``perAgent``
    limits apply to each agent of the class on its own (so one busy agent cannot take
    the whole class's share).
    """

    per_agent: QuotaLimits | None = Field(default=None, alias="perAgent")
    # Money the class may spend per day (in the Models' price unit), enforced before each
    # call on its projected cost.
    daily_cost: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)


QuotaClass = ClassLimits
"""A quota class is a named set of limits (shared, and optionally per agent)."""


class RuleWhen(_Model):
    """The condition of a rule: a metric threshold, a time window, or both."""

    metric: Metric | None = None
    above: float | None = Field(default=None, allow_inf_nan=False)
    below: float | None = Field(default=None, allow_inf_nan=False)
    for_: Duration = Field(default=0.0, alias="for")
    hours: str | None = None
    weekdays: tuple[Weekday, ...] | None = Field(default=None, min_length=1)

    @field_validator("hours")
    @classmethod
    def _valid_hours(cls, value: str | None) -> str | None:
        if value is not None:
            match = _HOURS_RE.fullmatch(value)
            if not match:
                raise ValueError(f'expected a time window like "09:00-18:00"; got {_show(value)}')
            if value[:5] == value[6:]:
                raise ValueError(f"the time window {_show(value)} is empty (start equals end)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.metric is None:
            orphans = [
                ((key,), "only makes sense with a metric")
                for key, value in (("above", self.above), ("below", self.below))
                if value is not None
            ]
            if self.for_ > 0:
                orphans.append((("for",), "only makes sense with a metric"))
            if orphans:
                raise _errors(orphans)
            if self.hours is None and self.weekdays is None:
                raise _error(
                    "needs a metric (with above or below) and/or a time window (hours, weekdays)"
                )
        elif (self.above is None) == (self.below is None):
            raise _error(f"metric {self.metric} needs exactly one of: above, below")
        return self

    @property
    def hours_window(self) -> tuple[time, time] | None:
        """The ``hours`` window as (start, end) local times; end < start wraps midnight."""
        if self.hours is None:
            return None
        start, end = self.hours.split("-")
        return time.fromisoformat(start), time.fromisoformat(end)


class RuleThen(_Model):
    """The effect of a rule on one quota class: scale it or set limits, then clamp."""

    class_: Name = Field(alias="class")
    scale: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    set: QuotaLimits | None = None
    min: QuotaLimits | None = None
    max: QuotaLimits | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        issues: list[tuple[_SubPath, str]] = []
        if (self.scale is None) == (self.set is None):
            issues.append(((), "needs exactly one of: scale, set"))
        if self.min is not None and self.max is not None:
            for name, field in QuotaLimits.model_fields.items():
                low, high = getattr(self.min, name), getattr(self.max, name)
                if low is not None and high is not None and low > high:
                    key = field.alias or name
                    issues.append((("min", key), f"min ({low}) is greater than max ({high})"))
        if issues:
            raise _errors(issues)
        return self


class Rule(_Model):
    """A dynamic rescaling rule of a quota policy."""

    name: Name
    when: RuleWhen
    then: RuleThen
    cooldown: Duration = 0.0
    stabilization: Duration = 0.0


class QuotaPolicySpec(_Model):
    """Quota classes and the rules that rescale them while the fleet runs."""

    timezone: TimeZoneName = "UTC"
    classes: dict[Name, ClassLimits] = Field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    # The fleet's prices per agent-hour and per GB-hour of KV (token prices are on each
    # Model); at most one applied policy declares them.
    prices: FleetPrices | None = None

    @model_validator(mode="after")
    def _rules_fit_classes(self) -> Self:
        issues: list[tuple[_SubPath, str]] = []
        first: dict[str, int] = {}
        known = ", ".join(sorted(self.classes)) or "none are defined"
        for index, rule in enumerate(self.rules):
            if rule.name in first:
                issues.append(
                    (
                        ("rules", index, "name"),
                        f'duplicate rule name "{rule.name}" '
                        f"(first used by rules[{first[rule.name]}])",
                    )
                )
            else:
                first[rule.name] = index
            if rule.then.class_ not in self.classes:
                issues.append(
                    (
                        ("rules", index, "then", "class"),
                        f'unknown class "{rule.then.class_}" (expected one of the classes '
                        f"of this policy: {known})",
                    )
                )
        issues.extend(_overlapping_rules(self.rules))
        if issues:
            raise _errors(issues)
        return self


# The limits each kind of effect changes: a scale moves the load limits only (daily
# budgets are money, not load), a set changes exactly what it gives.
_SCALED_FIELDS: Final = ("tokens_per_minute", "max_concurrent")


def _touched_fields(then: RuleThen) -> tuple[str, ...]:
    if then.set is None:
        return _SCALED_FIELDS
    return tuple(name for name in QuotaLimits.model_fields if getattr(then.set, name) is not None)


def _minute_ranges(window: tuple[time, time]) -> list[tuple[int, int]]:
    """Return an hours window as half-open minute-of-day ranges (two if it wraps)."""
    start, end = (moment.hour * 60 + moment.minute for moment in window)
    return [(start, end)] if start < end else [(start, 24 * 60), (0, end)]


def _exclusive(first: RuleWhen, second: RuleWhen) -> bool:
    """Whether the two conditions provably never hold at the same time."""
    if (
        first.weekdays is not None
        and second.weekdays is not None
        and not set(first.weekdays) & set(second.weekdays)
    ):
        return True
    if first.hours_window is not None and second.hours_window is not None:
        others = _minute_ranges(second.hours_window)
        if not any(
            start < other_end and other_start < end
            for start, end in _minute_ranges(first.hours_window)
            for other_start, other_end in others
        ):
            return True
    if first.metric is not None and first.metric == second.metric:
        # "value > a" and "value < b" cannot both be true when b <= a.
        for high, low in ((first, second), (second, first)):
            if high.above is not None and low.below is not None and low.below <= high.above:
                return True
    return False


def _overlapping_rules(rules: Sequence[Rule]) -> list[tuple[_SubPath, str]]:
    # Two rules moving the same limit of one class at the same time would fight, and
    # which one wins would depend on their order in the list.
    issues: list[tuple[_SubPath, str]] = []
    for index, rule in enumerate(rules):
        touched = _touched_fields(rule.then)
        for earlier_index, earlier in enumerate(rules[:index]):
            if earlier.then.class_ != rule.then.class_ or _exclusive(earlier.when, rule.when):
                continue
            common = [name for name in _touched_fields(earlier.then) if name in touched]
            if not common:
                continue
            keys = " and ".join(QuotaLimits.model_fields[name].alias or name for name in common)
            verb = "scales" if rule.then.set is None else "sets"
            issues.append(
                (
                    ("rules", index, "then"),
                    f'{verb} {keys} of class "{rule.then.class_}" like rules[{earlier_index}] '
                    f'("{earlier.name}") and their conditions can hold at the same time; '
                    "give them disjoint hours/weekdays or merge them",
                )
            )
            break
    return issues


class QuotaPolicyResource(_Model):
    """``kind: QuotaPolicy``."""

    api_version: Literal["agentos/v1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["QuotaPolicy"] = "QuotaPolicy"
    metadata: Metadata
    spec: QuotaPolicySpec
