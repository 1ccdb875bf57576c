"""Quota policies, rules and a timeline runner shared by the policy tests
(tests/unit/core/test_policy*.py)."""

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from agentos.core.policy import (
    Evaluation,
    RuleMemory,
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


def make_policy(
    *rules: Mapping[str, Any],
    name: str = "p",
    classes: Mapping[str, Any] = CLASSES,
    timezone: str = "UTC",
) -> QuotaPolicyResource:
    """A QuotaPolicy of ``classes`` with ``rules`` (named r0, r1, ...)."""
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


def make_rule(base: Mapping[str, Any] = SHED, **changes: Any) -> dict[str, Any]:
    """``base`` with ``changes``; ``when``/``then`` changes are merged into the base's."""
    rule = dict(base)
    for key, value in changes.items():
        rule[key] = {**rule[key], **value} if key in ("when", "then") else value
    return rule


def all_metrics(value: float | None) -> dict[str, float]:
    """Every metric at ``value`` (none when ``value`` is None)."""
    return {} if value is None else dict.fromkeys(METRICS, value)


def run_samples(
    policies: Mapping[str, QuotaPolicyResource], samples: list[tuple[float, float | None]]
) -> list[Evaluation]:
    """Evaluate at ``T0 + t`` for each (t, metric value), carrying memory through JSON."""
    memory: dict[str, RuleMemory] = {}
    results = []
    for offset, value in samples:
        result = evaluate(policies, all_metrics(value), T0 + offset, memory)
        results.append(result)
        stored = json.loads(json.dumps({k: m.to_json() for k, m in result.memory.items()}))
        memory = {key: RuleMemory.from_json(data) for key, data in stored.items()}
    return results
