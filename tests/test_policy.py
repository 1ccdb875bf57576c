"""Tests for agentos.core.policy: policies + metrics + time + memory -> quotas."""

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from agentos.core.policy import (
    METRIC_HELP,
    ClassQuota,
    Evaluation,
    Limits,
    RuleMemory,
    base_quotas,
    evaluate,
)
from agentos.core.spec import METRICS, QuotaPolicyResource

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC).timestamp()  # a Monday, noon UTC

CLASSES: dict[str, Any] = {
    "batch": {
        "tokensPerMinute": 8000,
        "maxConcurrent": 4,
        "dailyTokens": 100_000,
        "perAgent": {"tokensPerMinute": 4000, "maxConcurrent": 2},
    },
    "standard": {"tokensPerMinute": 20_000},
}

SHED: dict[str, Any] = {
    "when": {"metric": "queue_wait_p95_s", "above": 2},
    "then": {"class": "batch", "scale": 0.5},
}


def _policy(
    *rules: Mapping[str, Any],
    name: str = "p",
    classes: Mapping[str, Any] = CLASSES,
    timezone: str = "UTC",
) -> QuotaPolicyResource:
    return QuotaPolicyResource.model_validate(
        {
            "metadata": {"name": name},
            "spec": {
                "timezone": timezone,
                "classes": dict(classes),
                "rules": [{"name": f"r{index}", **rule} for index, rule in enumerate(rules)],
            },
        }
    )


def _rule(base: Mapping[str, Any] = SHED, **changes: Any) -> dict[str, Any]:
    """``base`` with ``changes``; ``when``/``then`` changes are merged into the base's."""
    rule = dict(base)
    for key, value in changes.items():
        rule[key] = {**rule[key], **value} if key in ("when", "then") else value
    return rule


def _metrics(value: float | None) -> dict[str, float]:
    return {} if value is None else dict.fromkeys(METRICS, value)


def _run(
    policies: Mapping[str, QuotaPolicyResource], samples: list[tuple[float, float | None]]
) -> list[Evaluation]:
    """Evaluate at ``T0 + t`` for each (t, metric value), carrying memory through JSON."""
    memory: dict[str, RuleMemory] = {}
    results = []
    for offset, value in samples:
        result = evaluate(policies, _metrics(value), T0 + offset, memory)
        results.append(result)
        stored = json.loads(json.dumps({k: m.to_json() for k, m in result.memory.items()}))
        memory = {key: RuleMemory.from_json(data) for key, data in stored.items()}
    return results


# --------------------------------------------------------------------------- base quotas


def test_base_quotas() -> None:
    a = _policy(name="a")
    b = _policy(name="b", classes={"batch": {"tokensPerMinute": 1}, "gold": {"maxConcurrent": 9}})
    quotas = base_quotas({"b": b, "a": a})
    assert list(quotas) == ["batch", "standard", "gold"]
    batch = quotas["batch"]  # defined by both: the first policy by name wins
    assert (batch.policy, batch.timezone, batch.rules) == ("a", "UTC", ())
    assert batch.limits == batch.base == Limits(8000, 4, 100_000)
    assert batch.per_agent == batch.base_per_agent == Limits(4000, 2)
    assert quotas["standard"].per_agent == Limits()
    assert quotas["gold"] == ClassQuota(
        name="gold",
        policy="b",
        timezone="UTC",
        limits=Limits(max_concurrent=9),
        per_agent=Limits(),
        base=Limits(max_concurrent=9),
        base_per_agent=Limits(),
    )
    assert base_quotas({}) == {}


def test_evaluate_without_rules_gives_the_base_quotas() -> None:
    policies = {"p": _policy()}
    result = evaluate(policies, {}, T0, {})
    assert result == Evaluation(quotas=base_quotas(policies), memory={}, changes=(), rules=())


def test_rules_of_a_class_defined_by_an_earlier_policy_are_ignored() -> None:
    policies = {"a": _policy(name="a"), "b": _policy(_rule(), name="b")}
    memory = {"b/r0": RuleMemory(steps=1, changed_at=T0)}
    result = evaluate(policies, _metrics(9), T0, memory)
    assert result.quotas == base_quotas(policies)
    assert (result.rules, result.changes, result.memory) == ((), (), {})


# ------------------------------------------------------------------------------ timelines

# Each step: (seconds after T0, every metric's value or None for no data,
#             batch's (tokensPerMinute, maxConcurrent), the rule's steps and state,
#             actions of the changes made).
TIMELINES = [
    pytest.param(
        _rule(when={"for": "30s"}, cooldown="1m"),
        [
            (0, 3.0, (8000, 4), 0, "pending", ()),
            (20, 3.0, (8000, 4), 0, "pending", ()),
            (30, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
        ],
        id="fires-only-after-for",
    ),
    pytest.param(
        _rule(when={"for": "30s"}, cooldown="1m"),
        [
            (0, 3.0, (8000, 4), 0, "pending", ()),
            (20, 1.0, (8000, 4), 0, "idle", ()),
            (30, 3.0, (8000, 4), 0, "pending", ()),
            (50, 3.0, (8000, 4), 0, "pending", ()),
            (60, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
        ],
        id="a-break-restarts-for",
    ),
    pytest.param(
        _rule(cooldown="1m"),
        [
            (0, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
            (30, 3.0, (4000, 2), 1, "cooling", ()),
            (59, 3.0, (4000, 2), 1, "cooling", ()),
            (60, 3.0, (2000, 1), 2, "cooling", ("rescaled",)),
            (120, 3.0, (1000, 1), 3, "cooling", ("rescaled",)),
            (180, 3.0, (500, 1), 4, "cooling", ("rescaled",)),
        ],
        id="compounds-every-cooldown",
    ),
    pytest.param(
        _rule(then={"min": {"tokensPerMinute": 1500}}),
        [
            (0, 3.0, (4000, 2), 1, "active", ("rescaled",)),
            (10, 3.0, (2000, 1), 2, "active", ("rescaled",)),
            (20, 3.0, (1500, 1), 3, "active", ("rescaled",)),
            (30, 3.0, (1500, 1), 3, "active", ()),
            (40, 3.0, (1500, 1), 3, "active", ()),
        ],
        id="clamps-at-min-then-stops",
    ),
    pytest.param(
        _rule(then={"min": {"tokensPerMinute": 8000, "maxConcurrent": 4}}),
        [
            (0, 3.0, (8000, 4), 0, "idle", ()),
            (10, 3.0, (8000, 4), 0, "idle", ()),
        ],
        id="no-step-when-nothing-would-change",
    ),
    pytest.param(
        _rule(cooldown="10m", stabilization="30s"),
        [
            (0, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
            (10, 1.0, (4000, 2), 1, "recovering", ()),
            (39, 1.0, (4000, 2), 1, "recovering", ()),
            (40, 1.0, (8000, 4), 0, "idle", ("restored",)),
            (50, 1.0, (8000, 4), 0, "idle", ()),
        ],
        id="restored-after-stabilization",
    ),
    pytest.param(
        _rule(cooldown="10m"),
        [
            (0, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
            (10, 2.0, (8000, 4), 0, "idle", ("restored",)),
        ],
        id="restored-at-once-without-stabilization",
    ),
    pytest.param(
        _rule(cooldown="10m", stabilization="30s"),
        [
            (0, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
            (20, 1.0, (4000, 2), 1, "recovering", ()),
            (40, 3.0, (4000, 2), 1, "cooling", ()),
            (50, 1.0, (4000, 2), 1, "recovering", ()),
            (70, 1.0, (4000, 2), 1, "recovering", ()),
            (80, 1.0, (8000, 4), 0, "idle", ("restored",)),
        ],
        id="flapping-within-stabilization-does-not-restore",
    ),
    pytest.param(
        _rule(cooldown="1m"),
        [
            (0, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
            (10, 1.0, (8000, 4), 0, "idle", ("restored",)),
            (20, 3.0, (8000, 4), 0, "cooling", ()),
            (70, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
        ],
        id="cooldown-blocks-stepping-not-restoring",
    ),
    pytest.param(
        _rule(cooldown="10m"),
        [
            (0, None, (8000, 4), 0, "idle", ()),
            (10, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
            (20, None, (8000, 4), 0, "idle", ("restored",)),
        ],
        id="missing-metric-is-no-data",
    ),
    pytest.param(
        {
            "when": {"metric": "slot_utilisation", "below": 0.25},
            "then": {"class": "batch", "scale": 2, "max": {"tokensPerMinute": 10_000}},
            "cooldown": "10m",
        },
        [
            (0, 0.1, (10_000, 8), 1, "cooling", ("rescaled",)),
            (10, 0.25, (8000, 4), 0, "idle", ("restored",)),
            (20, 0.24, (8000, 4), 0, "cooling", ()),  # a restore starts a cooldown too
            (610, 0.24, (10_000, 8), 1, "cooling", ("rescaled",)),
        ],
        id="below-rule",
    ),
    pytest.param(
        {
            "when": {"metric": "error_rate", "above": 0.5},
            "then": {"class": "batch", "set": {"maxConcurrent": 1, "dailyTokens": 500}},
        },
        [
            (0, 0.9, (8000, 1), 1, "active", ("rescaled",)),
            (10, 0.9, (8000, 1), 1, "active", ()),
            (20, 0.1, (8000, 4), 0, "idle", ("restored",)),
        ],
        id="set-rule-has-one-step",
    ),
]


@pytest.mark.parametrize(("rule", "timeline"), TIMELINES)
def test_timeline(
    rule: dict[str, Any],
    timeline: list[tuple[float, float | None, tuple[int, int], int, str, tuple[str, ...]]],
) -> None:
    results = _run({"p": _policy(rule)}, [(t, value) for t, value, *_ in timeline])
    for (t, _, limits, steps, state, actions), result in zip(timeline, results, strict=True):
        batch = result.quotas["batch"].limits
        (status,) = result.rules
        got = (
            (batch.tokens_per_minute, batch.max_concurrent),
            status.steps,
            status.state,
            tuple(change.action for change in result.changes),
        )
        assert got == (limits, steps, state, actions), f"at {t}s: {status.message}"
        assert result.memory["p/r0"].steps == status.steps
        assert result.quotas["standard"] == base_quotas({"p": _policy(rule)})["standard"]


# ----------------------------------------------------------------------- what a step does


def test_scale_moves_load_limits_of_class_and_agents_but_never_budgets() -> None:
    (result,) = _run({"p": _policy(_rule(cooldown="1m"))}, [(0, 3.0)])
    assert result.quotas["batch"] == ClassQuota(
        name="batch",
        policy="p",
        timezone="UTC",
        limits=Limits(4000, 2, 100_000),
        per_agent=Limits(2000, 1),
        base=Limits(8000, 4, 100_000),
        base_per_agent=Limits(4000, 2),
        rules=("r0 x1 (scale 0.5)",),
    )


@pytest.mark.parametrize(
    ("then", "limits", "per_agent"),
    [
        pytest.param({"scale": 0.5}, Limits(4000, 2, 100_000), Limits(2000, 1), id="down"),
        pytest.param(
            {"scale": 4, "max": {"tokensPerMinute": 10_000}},
            Limits(10_000, 16, 100_000),
            Limits(10_000, 8),
            id="up-bounded-by-max",
        ),
        pytest.param(
            # The class's min is above the per-agent limit: the agent keeps what it had
            # rather than being raised to the class's floor.
            {"scale": 0.5, "min": {"tokensPerMinute": 6000}},
            Limits(6000, 2, 100_000),
            Limits(4000, 1),
            id="per-agent-below-min-kept",
        ),
        pytest.param(
            {"scale": 0.1, "min": {"tokensPerMinute": 1000, "dailyTokens": 200_000}},
            Limits(1000, 1, 200_000),
            Limits(1000, 1),
            id="min-clamps-class-fields",
        ),
        pytest.param(
            {"scale": 0.5, "max": {"dailyAgentSeconds": 60}},
            Limits(4000, 2, 100_000, 60),
            Limits(2000, 1),
            id="max-caps-an-unlimited-field",
        ),
        pytest.param(
            {"set": {"tokensPerMinute": 100, "dailyTokens": 5}, "min": {"maxConcurrent": 8}},
            Limits(100, 8, 5),
            Limits(4000, 2),
            id="set-replaces-class-limits-only",
        ),
        pytest.param(
            {"set": {"dailyTokens": 5}, "max": {"tokensPerMinute": 300}},
            Limits(300, 4, 5),
            Limits(4000, 2),
            id="set-then-clamp",
        ),
    ],
)
def test_effect_of_one_step(then: dict[str, Any], limits: Limits, per_agent: Limits) -> None:
    rule = {"when": SHED["when"], "then": {"class": "batch", **then}}
    (result,) = _run({"p": _policy(rule)}, [(0, 3.0)])
    quota = result.quotas["batch"]
    assert (quota.limits, quota.per_agent) == (limits, per_agent)
    (change,) = result.changes
    assert (change.before, change.after) == (quota.base, limits)


def test_unlimited_fields_stay_unlimited_under_scale_and_min() -> None:
    rule = _rule(then={"class": "standard", "min": {"maxConcurrent": 2}})
    (result,) = _run({"p": _policy(rule)}, [(0, 3.0)])
    assert result.quotas["standard"].limits == Limits(tokens_per_minute=10_000)


def test_rules_of_a_class_apply_in_policy_order() -> None:
    policies = {
        "p": _policy(
            {"when": {"weekdays": ["mon"]}, "then": {"class": "batch", "set": {"dailyTokens": 9}}},
            _rule(then={"min": {"maxConcurrent": 3}}),
            _rule(then={"class": "standard", "scale": 0.5}, when={"metric": "error_rate"}),
        )
    }
    (result,) = _run(policies, [(0, 3.0)])
    assert result.quotas["batch"].limits == Limits(4000, 3, 9)
    assert result.quotas["batch"].rules == ("r0 (set dailyTokens=9)", "r1 x1 (scale 0.5)")
    assert result.quotas["standard"].rules == ("r2 x1 (scale 0.5)",)
    assert [(c.rule, c.class_) for c in result.changes] == [
        ("r0", "batch"),
        ("r1", "batch"),
        ("r2", "standard"),
    ]
    assert [s.rule for s in result.rules] == ["r0", "r1", "r2"]


# ------------------------------------------------------------------------------- reasons


def test_change_reasons() -> None:
    rule = _rule(when={"for": "30s"}, cooldown="10m", stabilization="10s")
    results = _run({"p": _policy(rule)}, [(0, 3.1), (30, 3.1), (40, 0.4), (50, 0.4)])
    (fired,) = results[1].changes
    assert (fired.policy, fired.rule, fired.class_, fired.action) == (
        "p",
        "r0",
        "batch",
        "rescaled",
    )
    assert (fired.before, fired.after) == (Limits(8000, 4, 100_000), Limits(4000, 2, 100_000))
    assert fired.reason == (
        "queue_wait_p95_s was 3.1 (> 2) for 30s: tokensPerMinute 8000 -> 4000, "
        "maxConcurrent 4 -> 2, perAgent.tokensPerMinute 4000 -> 2000, "
        "perAgent.maxConcurrent 2 -> 1"
    )
    assert results[2].changes == ()
    (restored,) = results[3].changes
    assert restored.action == "restored"
    assert (restored.before, restored.after) == (fired.after, fired.before)
    assert restored.reason == (
        "queue_wait_p95_s back to 0.4 (not > 2) for 10s: restored tokensPerMinute "
        "4000 -> 8000, maxConcurrent 2 -> 4, perAgent.tokensPerMinute 2000 -> 4000, "
        "perAgent.maxConcurrent 1 -> 2"
    )


def test_change_reasons_of_time_windows_and_missing_data() -> None:
    window = {
        "when": {"hours": "09:00-18:00", "weekdays": ["mon"]},
        "then": {"class": "batch", "set": {"tokensPerMinute": 1000}},
    }
    # T0 is 13:00 in Paris; 5h later it is 18:00.
    policies = {"p": _policy(window, timezone="Europe/Paris")}
    inside, outside = _run(policies, [(0, None), (5 * 3600, None)])
    assert [c.reason for c in inside.changes] == [
        "inside hours 09:00-18:00 on mon Europe/Paris: tokensPerMinute 8000 -> 1000"
    ]
    assert [c.reason for c in outside.changes] == [
        "outside hours 09:00-18:00 on mon Europe/Paris: restored tokensPerMinute 1000 -> 8000"
    ]

    both = {
        "when": {"metric": "queue_wait_p95_s", "above": 2, "hours": "09:00-18:00"},
        "then": {"class": "batch", "set": {"maxConcurrent": 1}},
    }
    fired, gone = _run({"p": _policy(both)}, [(0, 2.5), (60, None)])
    assert [c.reason for c in fired.changes] == [
        "queue_wait_p95_s was 2.5 (> 2), inside hours 09:00-18:00 UTC: maxConcurrent 4 -> 1"
    ]
    assert [c.reason for c in gone.changes] == [
        "queue_wait_p95_s has no data: restored maxConcurrent 1 -> 4"
    ]


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
    result = evaluate({"p": _policy(rule, timezone=timezone)}, {}, now, {})
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
    (status,) = evaluate({"p": _policy(rule)}, metrics, T0, {}).rules
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
    rule = _rule(when={"for": "30s"}, cooldown="1m", stabilization="20s")
    result = _run({"p": _policy(rule)}, samples)[-1]
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
    (status,) = evaluate({"p": _policy(rule)}, {}, T0, {}).rules
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
    (status,) = evaluate({"p": _policy(rule, timezone=timezone)}, {}, T0, {}).rules
    assert status.condition == condition


# -------------------------------------------------------------------------------- memory


def test_memory_of_rules_no_longer_in_a_policy_is_dropped() -> None:
    memory = {
        "p/gone": RuleMemory(steps=2, changed_at=T0),
        "other/r0": RuleMemory(steps=1),
        "p/r0": RuleMemory(since=T0 - 5),
    }
    policies = {
        "p": _policy(
            _rule(when={"metric": "error_rate"}, then={"class": "standard"}),
            _rule(when={"for": "1m"}),
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
    result = evaluate({"p": _policy(rule)}, {}, T0, memory)
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
    policy = _policy()
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
        *base_quotas({"p": _policy()}).values(),
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
