"""Tests for agentos.core.policy: policies + metrics + time + memory -> quotas (conditions,
rule status, memory and JSON: test_policy_status.py)."""

from typing import Any

import pytest

from agentos.core.policy import (
    ClassQuota,
    Evaluation,
    Limits,
    RuleMemory,
    base_quotas,
    evaluate,
)
from tests.policy_samples import SHED, T0, all_metrics, make_policy, make_rule, run_samples

# --------------------------------------------------------------------------- base quotas


def test_base_quotas() -> None:
    a = make_policy(name="a")
    b = make_policy(
        name="b", classes={"batch": {"tokensPerMinute": 1}, "gold": {"maxConcurrent": 9}}
    )
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
    policies = {"p": make_policy()}
    result = evaluate(policies, {}, T0, {})
    assert result == Evaluation(quotas=base_quotas(policies), memory={}, changes=(), rules=())


def test_rules_of_a_class_defined_by_an_earlier_policy_are_ignored() -> None:
    policies = {"a": make_policy(name="a"), "b": make_policy(make_rule(), name="b")}
    memory = {"b/r0": RuleMemory(steps=1, changed_at=T0)}
    result = evaluate(policies, all_metrics(9), T0, memory)
    assert result.quotas == base_quotas(policies)
    assert (result.rules, result.changes, result.memory) == ((), (), {})


# ------------------------------------------------------------------------------ timelines

# Each step: (seconds after T0, every metric's value or None for no data,
#             batch's (tokensPerMinute, maxConcurrent), the rule's steps and state,
#             actions of the changes made).
TIMELINES = [
    pytest.param(
        make_rule(when={"for": "30s"}, cooldown="1m"),
        [
            (0, 3.0, (8000, 4), 0, "pending", ()),
            (20, 3.0, (8000, 4), 0, "pending", ()),
            (30, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
        ],
        id="fires-only-after-for",
    ),
    pytest.param(
        make_rule(when={"for": "30s"}, cooldown="1m"),
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
        make_rule(cooldown="1m"),
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
        make_rule(then={"min": {"tokensPerMinute": 1500}}),
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
        make_rule(then={"min": {"tokensPerMinute": 8000, "maxConcurrent": 4}}),
        [
            (0, 3.0, (8000, 4), 0, "idle", ()),
            (10, 3.0, (8000, 4), 0, "idle", ()),
        ],
        id="no-step-when-nothing-would-change",
    ),
    pytest.param(
        make_rule(cooldown="10m", stabilization="30s"),
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
        make_rule(cooldown="10m"),
        [
            (0, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
            (10, 2.0, (8000, 4), 0, "idle", ("restored",)),
        ],
        id="restored-at-once-without-stabilization",
    ),
    pytest.param(
        make_rule(cooldown="10m", stabilization="30s"),
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
        make_rule(cooldown="1m"),
        [
            (0, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
            (10, 1.0, (8000, 4), 0, "idle", ("restored",)),
            (20, 3.0, (8000, 4), 0, "cooling", ()),
            (70, 3.0, (4000, 2), 1, "cooling", ("rescaled",)),
        ],
        id="cooldown-blocks-stepping-not-restoring",
    ),
    pytest.param(
        make_rule(cooldown="10m"),
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
    results = run_samples({"p": make_policy(rule)}, [(t, value) for t, value, *_ in timeline])
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
        assert result.quotas["standard"] == base_quotas({"p": make_policy(rule)})["standard"]


# ----------------------------------------------------------------------- what a step does


def test_scale_moves_load_limits_of_class_and_agents_but_never_budgets() -> None:
    (result,) = run_samples({"p": make_policy(make_rule(cooldown="1m"))}, [(0, 3.0)])
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
    (result,) = run_samples({"p": make_policy(rule)}, [(0, 3.0)])
    quota = result.quotas["batch"]
    assert (quota.limits, quota.per_agent) == (limits, per_agent)
    (change,) = result.changes
    assert (change.before, change.after) == (quota.base, limits)


def test_unlimited_fields_stay_unlimited_under_scale_and_min() -> None:
    rule = make_rule(then={"class": "standard", "min": {"maxConcurrent": 2}})
    (result,) = run_samples({"p": make_policy(rule)}, [(0, 3.0)])
    assert result.quotas["standard"].limits == Limits(tokens_per_minute=10_000)


def test_rules_of_a_class_apply_in_policy_order() -> None:
    policies = {
        "p": make_policy(
            {"when": {"weekdays": ["mon"]}, "then": {"class": "batch", "set": {"dailyTokens": 9}}},
            make_rule(then={"min": {"maxConcurrent": 3}}),
            make_rule(then={"class": "standard", "scale": 0.5}, when={"metric": "error_rate"}),
        )
    }
    (result,) = run_samples(policies, [(0, 3.0)])
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
    rule = make_rule(when={"for": "30s"}, cooldown="10m", stabilization="10s")
    results = run_samples({"p": make_policy(rule)}, [(0, 3.1), (30, 3.1), (40, 0.4), (50, 0.4)])
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
    policies = {"p": make_policy(window, timezone="Europe/Paris")}
    inside, outside = run_samples(policies, [(0, None), (5 * 3600, None)])
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
    fired, gone = run_samples({"p": make_policy(both)}, [(0, 2.5), (60, None)])
    assert [c.reason for c in fired.changes] == [
        "queue_wait_p95_s was 2.5 (> 2), inside hours 09:00-18:00 UTC: maxConcurrent 4 -> 1"
    ]
    assert [c.reason for c in gone.changes] == [
        "queue_wait_p95_s has no data: restored maxConcurrent 1 -> 4"
    ]
