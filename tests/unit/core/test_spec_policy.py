"""agentos.core.spec on QuotaPolicy documents: classes, per-agent limits, and rules that
are reported when bad or when two of them could fight over the same limit."""

import pytest

from agentos.core.spec import (
    ClassLimits,
    QuotaClass,
    QuotaPolicyResource,
    parse_text,
)
from tests.spec_samples import POLICY_HEAD, issues_of

BAD_POLICIES = [
    # (id, text, line, path, message fragment)
    (
        "bad policy timezone",
        POLICY_HEAD + "  timezone: Nowhere\n",
        8,
        "spec.timezone",
        'unknown time zone "Nowhere"',
    ),
    (
        "bad class limit",
        POLICY_HEAD.replace("tokensPerMinute: 100", "tokensPerMinute: -5"),
        6,
        "spec.classes.standard.tokensPerMinute",
        "expected a value greater than 0; got -5",
    ),
    (
        "unknown class limit",
        POLICY_HEAD.replace("tokensPerMinute: 100", "tokensPerMinit: 100"),
        6,
        "spec.classes.standard.tokensPerMinit",
        "unknown field (expected one of: tokensPerMinute, maxConcurrent, dailyTokens, "
        'dailyAgentSeconds, perAgent, dailyCost); did you mean "tokensPerMinute"?',
    ),
    (
        "unknown per-agent limit",
        POLICY_HEAD + "    shared:\n      perAgent:\n        maxConcurent: 1\n",
        10,
        "spec.classes.shared.perAgent.maxConcurent",
        "unknown field (expected one of: tokensPerMinute, maxConcurrent, dailyTokens, "
        'dailyAgentSeconds); did you mean "maxConcurrent"?',
    ),
    (
        "per-agent limits do not nest",
        POLICY_HEAD + "    shared:\n      perAgent:\n        perAgent: {}\n",
        10,
        "spec.classes.shared.perAgent.perAgent",
        "unknown field (expected one of: tokensPerMinute, maxConcurrent, dailyTokens, "
        "dailyAgentSeconds)",
    ),
    (
        "bad per-agent limit",
        POLICY_HEAD + "    shared: {perAgent: {tokensPerMinute: 0}}\n",
        8,
        "spec.classes.shared.perAgent.tokensPerMinute",
        "expected a value greater than 0; got 0",
    ),
    (
        "per-agent limits not a mapping",
        POLICY_HEAD + "    shared: {perAgent: 5}\n",
        8,
        "spec.classes.shared.perAgent",
        "expected a mapping",
    ),
    (
        "bad class name",
        POLICY_HEAD + "    Big_Batch: {}\n",
        8,
        "spec.classes.Big_Batch",
        "expected a lowercase DNS label",
    ),
    (
        "unknown metric",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: cpu, above: 1}\n"
        + "      then: {class: batch, scale: 2}\n",
        10,
        "spec.rules[0].when.metric",
        "expected one of: queue_wait_p95_s, slot_utilisation, budget_burn_rate, error_rate, "
        'throttle_rate; got "cpu"',
    ),
    (
        "metric with above and below",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when:\n        metric: error_rate\n"
        + "        above: 1\n        below: 2\n      then: {class: batch, scale: 2}\n",
        10,
        "spec.rules[0].when",
        "metric error_rate needs exactly one of: above, below",
    ),
    (
        "metric without threshold",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: error_rate}\n"
        + "      then: {class: batch, scale: 2}\n",
        10,
        "spec.rules[0].when",
        "metric error_rate needs exactly one of: above, below",
    ),
    (
        "threshold without metric",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when:\n        hours: '09:00-10:00'\n"
        + "        above: 3\n      then: {class: batch, scale: 2}\n",
        12,
        "spec.rules[0].when.above",
        "only makes sense with a metric",
    ),
    (
        "empty when",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {}\n      then: {class: batch, scale: 2}\n",
        10,
        "spec.rules[0].when",
        "needs a metric (with above or below) and/or a time window (hours, weekdays)",
    ),
    (
        "bad hours",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {hours: '9-17'}\n"
        + "      then: {class: batch, scale: 2}\n",
        10,
        "spec.rules[0].when.hours",
        'expected a time window like "09:00-18:00"; got "9-17"',
    ),
    (
        "empty hours",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {hours: '09:00-09:00'}\n"
        + "      then: {class: batch, scale: 2}\n",
        10,
        "spec.rules[0].when.hours",
        "is empty (start equals end)",
    ),
    (
        "bad weekday",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when:\n        weekdays:\n          - mon\n"
        + "          - funday\n      then: {class: batch, scale: 2}\n",
        13,
        "spec.rules[0].when.weekdays[1]",
        'expected one of: mon, tue, wed, thu, fri, sat, sun; got "funday"',
    ),
    (
        "scale and set",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: error_rate, above: 1}\n"
        + "      then: {class: batch, scale: 2, set: {maxConcurrent: 1}}\n",
        11,
        "spec.rules[0].then",
        "needs exactly one of: scale, set",
    ),
    (
        "neither scale nor set",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: error_rate, above: 1}\n"
        + "      then: {class: batch}\n",
        11,
        "spec.rules[0].then",
        "needs exactly one of: scale, set",
    ),
    (
        "scale not positive",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: error_rate, above: 1}\n"
        + "      then: {class: batch, scale: 0}\n",
        11,
        "spec.rules[0].then.scale",
        "expected a value greater than 0; got 0",
    ),
    (
        "min above max",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: error_rate, above: 1}\n"
        + "      then:\n        class: batch\n        scale: 2\n"
        + "        min:\n          tokensPerMinute: 50\n        max: {tokensPerMinute: 5}\n",
        15,
        "spec.rules[0].then.min.tokensPerMinute",
        "min (50) is greater than max (5)",
    ),
    (
        "unknown class in rule",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: error_rate, above: 1}\n"
        + "      then:\n        scale: 2\n        class: gold\n",
        13,
        "spec.rules[0].then.class",
        'unknown class "gold" (expected one of the classes of this policy: batch, standard)',
    ),
    (
        "duplicate rule names",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: error_rate, above: 1}\n"
        + "      then: {class: batch, scale: 2}\n"
        + "    - name: r\n      when: {metric: error_rate, below: 1}\n"
        + "      then: {class: batch, scale: 3}\n",
        12,
        "spec.rules[1].name",
        'duplicate rule name "r" (first used by rules[0])',
    ),
    (
        "bad cooldown",
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: error_rate, above: 1}\n"
        + "      then: {class: batch, scale: 2}\n      cooldown: -1s\n",
        12,
        "spec.rules[0].cooldown",
        'expected a duration like "30s", "5m", "1h30m"; got "-1s"',
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "path", "message"),
    [case[1:] for case in BAD_POLICIES],
    ids=[case[0] for case in BAD_POLICIES],
)
def test_bad_policies_are_reported_with_line_path_and_message(
    text: str, line: int, path: str, message: str
) -> None:
    issues = issues_of(text)
    found = [(i.source, i.line, i.path) for i in issues if message in i.message]
    assert ("x.yaml", line, path) in found, "\n".join(map(str, issues))
    for issue in issues:
        assert "Value error" not in issue.message
        assert "https://" not in issue.message


def test_all_issues_of_a_rule_are_reported_together() -> None:
    text = (
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: error_rate, above: 1}\n"
        + "      then:\n        class: batch\n        scale: 2\n        set: {}\n"
        + "        min: {tokensPerMinute: 9, maxConcurrent: 9}\n"
        + "        max: {tokensPerMinute: 1, maxConcurrent: 1}\n"
    )
    assert [(i.line, i.path) for i in issues_of(text)] == [
        (11, "spec.rules[0].then"),
        (15, "spec.rules[0].then.min.tokensPerMinute"),
        (15, "spec.rules[0].then.min.maxConcurrent"),
    ]


def test_per_agent_limits() -> None:
    (document,) = parse_text(
        POLICY_HEAD + "    shared: {tokensPerMinute: 1000, perAgent: {tokensPerMinute: 200}}\n"
    )
    policy = document.resource
    assert isinstance(policy, QuotaPolicyResource)
    shared = policy.spec.classes["shared"]
    assert isinstance(shared, ClassLimits)
    assert QuotaClass is ClassLimits
    assert shared.tokens_per_minute == 1000
    assert shared.per_agent is not None
    assert (shared.per_agent.tokens_per_minute, shared.per_agent.max_concurrent) == (200, None)
    assert policy.spec.classes["batch"].per_agent is None
    assert document.canonical()["spec"]["classes"] == {
        "standard": {"tokensPerMinute": 100},
        "batch": {"tokensPerMinute": 10, "maxConcurrent": 1},
        "shared": {"tokensPerMinute": 1000, "perAgent": {"tokensPerMinute": 200}},
    }


# Rules of POLICY_HEAD's classes, three lines each: rules[i].then is on line 11 + 3 * i.
def _rules(*rules: tuple[str, str]) -> str:
    text = POLICY_HEAD + "  rules:\n"
    for index, (when, then) in enumerate(rules):
        text += f"    - name: r{index}\n      when: {when}\n      then: {then}\n"
    return text


SCALE_BATCH = "{class: batch, scale: 0.5}"

DISJOINT_RULES = {
    "other classes": [
        ("{metric: error_rate, above: 1}", SCALE_BATCH),
        ("{metric: error_rate, above: 1}", "{class: standard, scale: 0.5}"),
    ],
    "disjoint weekdays": [
        ("{metric: error_rate, above: 1, weekdays: [mon, tue]}", SCALE_BATCH),
        ("{metric: queue_wait_p95_s, above: 2, weekdays: [sat, sun]}", SCALE_BATCH),
    ],
    "hours that touch but do not overlap": [
        ("{hours: '09:00-18:00'}", SCALE_BATCH),
        ("{hours: '18:00-09:00'}", "{class: batch, scale: 2}"),
    ],
    "hours wrapping past midnight": [
        ("{hours: '22:00-06:00'}", SCALE_BATCH),
        ("{hours: '06:00-07:30', weekdays: [mon]}", SCALE_BATCH),
        ("{hours: '12:00-22:00', metric: error_rate, above: 1}", SCALE_BATCH),
    ],
    "same metric, opposite thresholds": [
        ("{metric: queue_wait_p95_s, above: 2, for: 30s}", SCALE_BATCH),
        ("{metric: queue_wait_p95_s, below: 0.5, for: 5m}", "{class: batch, scale: 2}"),
    ],
    "same metric, thresholds meeting": [
        ("{metric: error_rate, below: 0.1}", "{class: batch, scale: 2}"),
        ("{metric: error_rate, above: 0.1}", SCALE_BATCH),
    ],
    "different limits": [
        ("{metric: error_rate, above: 1}", SCALE_BATCH),
        ("{metric: error_rate, above: 1}", "{class: batch, set: {dailyTokens: 10}}"),
        ("{metric: budget_burn_rate, above: 1}", "{class: batch, set: {dailyAgentSeconds: 60}}"),
    ],
    "sets of different limits": [
        ("{hours: '09:00-18:00'}", "{class: batch, set: {tokensPerMinute: 5}}"),
        ("{hours: '10:00-11:00'}", "{class: batch, set: {maxConcurrent: 2}}"),
    ],
}


@pytest.mark.parametrize("rules", DISJOINT_RULES.values(), ids=DISJOINT_RULES.keys())
def test_rules_that_cannot_fight_are_accepted(rules: list[tuple[str, str]]) -> None:
    (document,) = parse_text(_rules(*rules))
    assert isinstance(document.resource, QuotaPolicyResource)
    assert len(document.resource.spec.rules) == len(rules)


OVERLAPPING_RULES = [
    # (id, rules, index of the rule reported, message)
    (
        "same condition",
        [("{metric: error_rate, above: 1}", SCALE_BATCH)] * 2,
        1,
        'scales tokensPerMinute and maxConcurrent of class "batch" like rules[0] ("r0") and '
        "their conditions can hold at the same time; give them disjoint hours/weekdays or "
        "merge them",
    ),
    (
        "different metrics",
        [
            ("{metric: error_rate, above: 1}", "{class: batch, set: {tokensPerMinute: 5}}"),
            ("{metric: queue_wait_p95_s, above: 2}", SCALE_BATCH),
        ],
        1,
        'scales tokensPerMinute of class "batch" like rules[0] ("r0")',
    ),
    (
        "a set and a scale",
        [
            ("{metric: error_rate, above: 1}", SCALE_BATCH),
            ("{metric: error_rate, above: 2}", "{class: batch, set: {maxConcurrent: 5}}"),
        ],
        1,
        'sets maxConcurrent of class "batch" like rules[0] ("r0")',
    ),
    (
        "same metric, thresholds leaving a gap",
        [
            ("{metric: error_rate, above: 0.1}", SCALE_BATCH),
            ("{metric: error_rate, below: 0.2}", "{class: batch, scale: 2}"),
        ],
        1,
        'like rules[0] ("r0")',
    ),
    (
        "overlapping hours",
        [
            ("{hours: '09:00-18:00'}", "{class: batch, set: {tokensPerMinute: 5}}"),
            ("{hours: '17:59-20:00'}", "{class: batch, set: {tokensPerMinute: 7}}"),
        ],
        1,
        'sets tokensPerMinute of class "batch" like rules[0] ("r0")',
    ),
    (
        "hours overlapping past midnight",
        [
            ("{hours: '22:00-06:00'}", SCALE_BATCH),
            ("{hours: '05:00-07:00'}", SCALE_BATCH),
        ],
        1,
        'like rules[0] ("r0")',
    ),
    (
        "overlapping weekdays",
        [
            ("{weekdays: [mon, fri]}", SCALE_BATCH),
            ("{weekdays: [fri, sat]}", SCALE_BATCH),
        ],
        1,
        'like rules[0] ("r0")',
    ),
    (
        "hours against weekdays",
        [
            ("{hours: '09:00-18:00'}", SCALE_BATCH),
            ("{weekdays: [sat]}", SCALE_BATCH),
        ],
        1,
        'like rules[0] ("r0")',
    ),
    (
        "a time window against a metric",
        [
            ("{metric: error_rate, above: 1}", SCALE_BATCH),
            ("{hours: '09:00-18:00', weekdays: [mon]}", SCALE_BATCH),
        ],
        1,
        'like rules[0] ("r0")',
    ),
    (
        "a third rule against the first",
        [
            ("{weekdays: [mon]}", SCALE_BATCH),
            ("{weekdays: [tue]}", SCALE_BATCH),
            ("{weekdays: [mon, wed]}", SCALE_BATCH),
        ],
        2,
        'like rules[0] ("r0")',
    ),
]


@pytest.mark.parametrize(
    ("rules", "index", "message"),
    [case[1:] for case in OVERLAPPING_RULES],
    ids=[case[0] for case in OVERLAPPING_RULES],
)
def test_rules_that_set_the_same_limit_at_the_same_time_are_rejected(
    rules: list[tuple[str, str]], index: int, message: str
) -> None:
    issues = issues_of(_rules(*rules))
    assert [(i.source, i.line, i.path) for i in issues] == [
        ("x.yaml", 11 + 3 * index, f"spec.rules[{index}].then")
    ]
    assert message in issues[0].message


def test_each_overlapping_rule_is_reported_once() -> None:
    issues = issues_of(_rules(*[("{metric: error_rate, above: 1}", SCALE_BATCH)] * 3))
    assert [(i.line, i.path) for i in issues] == [
        (14, "spec.rules[1].then"),
        (17, "spec.rules[2].then"),
    ]
    assert all('like rules[0] ("r0")' in issue.message for issue in issues)
