"""Tests for agentos.core.policy: when a rule's condition holds, what `policy explain`
says of each rule, what is remembered between evaluations, and the JSON forms."""

import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest

from agentos.core.policy import (
    METRIC_HELP,
    ClassQuota,
    Limits,
    RuleMemory,
    base_quotas,
    evaluate,
)
from agentos.core.spec import METRICS
from tests.policy_samples import T0, make_policy, make_rule, run_samples

# ---------------------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    ("when", "timezone", "at", "holds"),
    [
        ({"hours": "09:00-18:00"}, "UTC", datetime(2026, 1, 5, 9, 0), True),
        ({"hours": "09:00-18:00"}, "UTC", datetime(2026, 1, 5, 8, 59, 59), False),
        ({"hours": "09:00-18:00"}, "UTC", datetime(2026, 1, 5, 17, 59, 59), True),
        ({"hours": "09:00-18:00"}, "UTC", datetime(2026, 1, 5, 18, 0), False),
        ({"hours": "22:00-06:00"}, "UTC", datetime(2026, 1, 5, 22, 0), True),
        ({"hours": "22:00-06:00"}, "UTC", datetime(2026, 1, 5, 23, 30), True),
        ({"hours": "22:00-06:00"}, "UTC", datetime(2026, 1, 6, 5, 59), True),
        ({"hours": "22:00-06:00"}, "UTC", datetime(2026, 1, 6, 6, 0), False),
        ({"hours": "22:00-06:00"}, "UTC", datetime(2026, 1, 5, 12, 0), False),
        # Paris is UTC+1 in winter, UTC+2 in summer.
        ({"hours": "09:00-18:00"}, "Europe/Paris", datetime(2026, 1, 5, 8, 30), True),
        ({"hours": "09:00-18:00"}, "Europe/Paris", datetime(2026, 1, 5, 17, 30), False),
        ({"hours": "09:00-18:00"}, "Europe/Paris", datetime(2026, 7, 6, 7, 30), True),
        ({"hours": "09:00-18:00"}, "Europe/Paris", datetime(2026, 7, 6, 16, 30), False),
        ({"hours": "09:00-18:00"}, "Europe/Paris", datetime(2026, 7, 6, 15, 59), True),
        # 02:00-03:00 does not exist in Paris on the day clocks go forward.
        ({"hours": "02:00-03:00"}, "Europe/Paris", datetime(2026, 3, 29, 0, 59), False),
        ({"hours": "02:00-03:00"}, "Europe/Paris", datetime(2026, 3, 29, 1, 0), False),
        ({"hours": "02:00-03:00"}, "Europe/Paris", datetime(2026, 3, 30, 0, 30), True),
        ({"weekdays": ["mon"]}, "UTC", datetime(2026, 1, 5, 12, 0), True),
        ({"weekdays": ["sat", "sun"]}, "UTC", datetime(2026, 1, 5, 12, 0), False),
        ({"weekdays": ["sun"]}, "UTC", datetime(2026, 1, 4, 23, 30), True),
        # Sunday 23:30 UTC is already Monday in Paris.
        ({"weekdays": ["sun"]}, "Europe/Paris", datetime(2026, 1, 4, 23, 30), False),
        ({"weekdays": ["mon"]}, "Europe/Paris", datetime(2026, 1, 4, 23, 30), True),
        # Weekdays name the day it is now: Saturday 01:00 is not in Friday's night.
        ({"hours": "22:00-06:00", "weekdays": ["fri"]}, "UTC", datetime(2026, 1, 9, 23), True),
        ({"hours": "22:00-06:00", "weekdays": ["fri"]}, "UTC", datetime(2026, 1, 10, 1), False),
        ({"hours": "22:00-06:00", "weekdays": ["sat"]}, "UTC", datetime(2026, 1, 10, 1), True),
    ],
)
def test_time_windows(when: dict[str, Any], timezone: str, at: datetime, holds: bool) -> None:
    rule = {"when": when, "then": {"class": "batch", "set": {"maxConcurrent": 1}}}
    now = at.replace(tzinfo=UTC).timestamp()
    result = evaluate({"p": make_policy(rule, timezone=timezone)}, {}, now, {})
    (status,) = result.rules
    assert status.holds is holds
    assert result.quotas["batch"].limits.max_concurrent == (1 if holds else 4)


@pytest.mark.parametrize(
    ("when", "metrics", "holds"),
    [
        ({"above": 2}, {"queue_wait_p95_s": 2.01}, True),
        ({"above": 2}, {"queue_wait_p95_s": 2}, False),
        ({"below": 2}, {"queue_wait_p95_s": 1.99}, True),
        ({"below": 2}, {"queue_wait_p95_s": 2.0}, False),
        ({"below": 2}, {}, False),
        ({"below": 2}, {"error_rate": 0.0}, False),
        ({"below": 2}, {"queue_wait_p95_s": math.nan}, False),
        ({"below": 2}, {"queue_wait_p95_s": True}, False),
        ({"above": -1}, {"queue_wait_p95_s": 0}, True),
        ({"above": 2, "hours": "00:00-12:00"}, {"queue_wait_p95_s": 3}, False),
        ({"above": 2, "hours": "12:00-13:00"}, {"queue_wait_p95_s": 3}, True),
    ],
)
def test_metric_conditions(when: dict[str, Any], metrics: dict[str, Any], holds: bool) -> None:
    rule = {
        "when": {"metric": "queue_wait_p95_s", **when},
        "then": {"class": "batch", "scale": 0.5},
    }
    (status,) = evaluate({"p": make_policy(rule)}, metrics, T0, {}).rules
    assert status.holds is holds
    assert status.state == ("active" if holds else "idle")


# ---------------------------------------------------------------------------- rule status

STEP1 = Limits(4000, 2, 100_000)
STEP2 = Limits(2000, 1, 100_000)
BASE = Limits(8000, 4, 100_000)


@pytest.mark.parametrize(
    ("samples", "expected", "message"),
    [
        pytest.param(
            [(0, 1.0)],
            {"holds": False, "held_for_s": 0, "state": "idle", "wait_s": 0, "next": STEP1},
            "not in effect: queue_wait_p95_s is 1 (needs > 2); next: tokensPerMinute "
            "8000 -> 4000, maxConcurrent 4 -> 2, perAgent.tokensPerMinute 4000 -> 2000, "
            "perAgent.maxConcurrent 2 -> 1",
            id="idle",
        ),
        pytest.param(
            [(0, None)],
            {"value": None, "state": "idle", "next": STEP1},
            "not in effect: queue_wait_p95_s has no data; next: ",
            id="idle-no-data",
        ),
        pytest.param(
            [(0, 3.0), (10, 3.0)],
            {"holds": True, "held_for_s": 10, "state": "pending", "wait_s": 20, "next": STEP1},
            "holds for 10s of 30s, applies in 20s; next: tokensPerMinute 8000 -> 4000",
            id="pending",
        ),
        pytest.param(
            [(0, 3.0), (30, 3.0), (45, 3.0)],
            {"steps": 1, "state": "cooling", "wait_s": 45, "current": STEP1, "next": STEP2},
            "in effect: r0 x1 (scale 0.5); cooldown, next step in 45s; next: tokensPerMinute "
            "4000 -> 2000",
            id="cooling",
        ),
        pytest.param(
            [(0, 3.0), (30, 3.0), (40, 1.0), (45, 1.0)],
            {"holds": False, "state": "recovering", "wait_s": 15, "next": BASE},
            "in effect: r0 x1 (scale 0.5); stopped holding 5s ago, restores in 15s unless "
            "it holds again; next: tokensPerMinute 4000 -> 8000",
            id="recovering",
        ),
        pytest.param(
            [(0, 3.0), (30, 3.0), (40, 1.0), (45, 3.0)],
            {"held_for_s": 0, "state": "pending", "wait_s": 45, "steps": 1, "next": STEP2},
            "in effect: r0 x1 (scale 0.5); holds for 0s of 30s, applies in 45s",
            id="pending-again-in-effect",
        ),
        pytest.param(
            # 8000 tokens per minute halve to 1 in 13 steps; the 14th changes nothing.
            [(t, 3.0) for t in range(0, 1200, 60)],
            {"steps": 13, "state": "active", "wait_s": 0, "next": None},
            "in effect: r0 x13 (scale 0.0001221); at its bounds, no further steps",
            id="active-at-bounds",
        ),
    ],
)
def test_rule_status(
    samples: list[tuple[float, float | None]], expected: dict[str, Any], message: str
) -> None:
    rule = make_rule(when={"for": "30s"}, cooldown="1m", stabilization="20s")
    result = run_samples({"p": make_policy(rule)}, samples)[-1]
    (status,) = result.rules
    assert (status.policy, status.rule, status.class_, status.metric) == (
        "p",
        "r0",
        "batch",
        "queue_wait_p95_s",
    )
    assert status.value == samples[-1][1]
    assert status.condition == "queue_wait_p95_s > 2 for 30s"
    assert status.current == result.quotas["batch"].limits
    assert {key: getattr(status, key) for key in expected} == expected
    assert status.message.startswith(message), status.message


def test_rule_status_of_a_set_rule_in_effect() -> None:
    rule = {"when": {"weekdays": ["mon"]}, "then": {"class": "batch", "set": {"dailyTokens": 9}}}
    (status,) = evaluate({"p": make_policy(rule)}, {}, T0, {}).rules
    assert (status.metric, status.value, status.state, status.steps, status.next) == (
        None,
        None,
        "active",
        1,
        None,
    )
    assert status.message == "in effect: r0 (set dailyTokens=9)"


@pytest.mark.parametrize(
    ("when", "timezone", "condition"),
    [
        ({"metric": "error_rate", "below": 0.5}, "UTC", "error_rate < 0.5"),
        (
            {"metric": "queue_wait_p95_s", "above": 2, "for": "30s", "hours": "09:00-18:00"},
            "Europe/Paris",
            "queue_wait_p95_s > 2 for 30s, hours 09:00-18:00 (Europe/Paris)",
        ),
        ({"weekdays": ["sat", "sun"]}, "UTC", "weekdays sat, sun (UTC)"),
        ({"hours": "22:00-06:00", "weekdays": ["fri"]}, "UTC", "hours 22:00-06:00 on fri (UTC)"),
    ],
)
def test_condition_text(when: dict[str, Any], timezone: str, condition: str) -> None:
    rule = {"when": when, "then": {"class": "batch", "scale": 0.5}}
    (status,) = evaluate({"p": make_policy(rule, timezone=timezone)}, {}, T0, {}).rules
    assert status.condition == condition


# -------------------------------------------------------------------------------- memory


def test_memory_of_rules_no_longer_in_a_policy_is_dropped() -> None:
    memory = {
        "p/gone": RuleMemory(steps=2, changed_at=T0),
        "other/r0": RuleMemory(steps=1),
        "p/r0": RuleMemory(since=T0 - 5),
    }
    policies = {
        "p": make_policy(
            make_rule(when={"metric": "error_rate"}, then={"class": "standard"}),
            make_rule(when={"for": "1m"}),
        )
    }
    result = evaluate(policies, {"queue_wait_p95_s": 3.0}, T0, memory)
    assert result.memory == {
        "p/r0": RuleMemory(),  # unaffected rules are remembered too
        "p/r1": RuleMemory(since=T0),
    }


def test_stored_steps_beyond_what_a_rule_allows_are_capped() -> None:
    rule = {"when": {"weekdays": ["mon"]}, "then": {"class": "batch", "set": {"dailyTokens": 9}}}
    memory = {"p/r0": RuleMemory(since=T0 - 60, steps=3, changed_at=T0 - 60)}
    result = evaluate({"p": make_policy(rule)}, {}, T0, memory)
    assert result.memory["p/r0"] == RuleMemory(since=T0 - 60, steps=1, changed_at=T0 - 60)
    assert result.changes == ()


# ---------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize(
    ("limits", "data", "text"),
    [
        (Limits(), {}, "unlimited"),
        (
            Limits(5000, 1),
            {"tokensPerMinute": 5000, "maxConcurrent": 1},
            "tokensPerMinute=5000 maxConcurrent=1",
        ),
        (
            Limits(daily_tokens=7, daily_agent_seconds=60),
            {"dailyTokens": 7, "dailyAgentSeconds": 60},
            "dailyTokens=7 dailyAgentSeconds=60",
        ),
    ],
)
def test_limits_json_and_describe(limits: Limits, data: dict[str, int], text: str) -> None:
    assert limits.to_json() == data
    assert Limits.from_json(data) == limits
    assert limits.describe() == text


def test_limits_from_spec() -> None:
    policy = make_policy()
    assert Limits.from_spec(policy.spec.classes["batch"]) == Limits(8000, 4, 100_000)
    assert Limits.from_spec(policy.spec.classes["batch"].per_agent) == Limits(4000, 2)
    assert Limits.from_spec(None) == Limits()


@pytest.mark.parametrize(
    "memory",
    [
        RuleMemory(),
        RuleMemory(since=T0 + 0.25, steps=3, changed_at=T0 - 1),
        RuleMemory(clear_since=T0, steps=1, changed_at=T0 - 100.5),
    ],
)
def test_rule_memory_json_round_trip(memory: RuleMemory) -> None:
    data = json.loads(json.dumps(memory.to_json()))
    assert RuleMemory.from_json(data) == memory
    assert RuleMemory.from_json({}) == RuleMemory()


@pytest.mark.parametrize(
    "quota",
    [
        *base_quotas({"p": make_policy()}).values(),
        ClassQuota(
            name="batch",
            policy="p",
            timezone="Europe/Paris",
            limits=Limits(1000, 1, 5),
            per_agent=Limits(500),
            base=Limits(8000, 4),
            base_per_agent=Limits(4000, 2),
            rules=("a x2 (scale 0.25)", "b (set dailyTokens=5)"),
        ),
    ],
)
def test_class_quota_json_round_trip(quota: ClassQuota) -> None:
    data = json.loads(json.dumps(quota.to_json()))
    assert ClassQuota.from_json(data) == quota


def test_every_metric_has_help() -> None:
    assert set(METRIC_HELP) == set(METRICS)
    assert all(text and "\n" not in text for text in METRIC_HELP.values())
