"""Whether a rule's condition holds (metric and time window), and the words that say why.

The evaluator's changes and ``agentos policy explain`` show each rule's condition, why
it fired or cleared, and how the limits moved; those sentences are built here, next to
the checks they describe. Pure: no I/O.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Final, get_args

from agentos.core.durations import format_duration
from agentos.core.policy.quotas import _FIELDS, Limits
from agentos.core.spec.quota import RuleWhen, Weekday

__all__ = ["METRIC_HELP"]

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


_WEEKDAYS: Final[tuple[Weekday, ...]] = get_args(Weekday)  # in datetime.weekday() order


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


def _not_holding(when: RuleWhen, value: float | None, timezone: str) -> str:
    if when.metric is not None:
        op, threshold = _comparison(when)
        if value is None:
            return f"{when.metric} has no data"
        if not _metric_holds(when, value):
            return f"{when.metric} is {value:.4g} (needs {op} {threshold:g})"
    return f"outside {_window(when)} ({timezone})"
