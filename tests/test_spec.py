"""Tests for agentos.core.spec: the resource models, the YAML loaders and their error reports."""

import json
import textwrap
from datetime import UTC, datetime, time
from pathlib import Path
from time import perf_counter

import pytest
from pydantic import ValidationError

from agentos.core.spec import (
    MAX_EXPANDED_NODES,
    AgentResource,
    AgentSpec,
    ClassLimits,
    Document,
    QuotaClass,
    QuotaPolicyResource,
    RuleWhen,
    SpecError,
    SpecIssue,
    Trigger,
    canonical,
    json_schema,
    load_paths,
    parse_resource,
    parse_text,
)

# Verbatim from DESIGN.md, "The resources".
DESIGN_EXAMPLE = """\
apiVersion: agentos/v1
kind: Agent
metadata: {name: repo-watcher, labels: {team: infra}}
spec:
  entrypoint: examples.repo_watcher:RepoWatcher   # import path of an Agent subclass
  model: default                                   # an engine/model declared in config
  triggers:                                        # what wakes it
    - schedule: "*/15 * * * *"                     # cron (croniter), catch-up policy
    - heartbeat: 30m
    - inbox: {}                                    # messages via Redis Streams
  hibernation: {idleAfter: 60s, keepKV: auto}      # auto = restore-vs-recompute cost model
  quotaClass: standard
  priority: 50
  restartPolicy: {backoff: {initial: 1s, max: 5m}, crashLoopAfter: 5}
  config: {path: ./watched}                        # free-form, handed to the agent
---
apiVersion: agentos/v1
kind: QuotaPolicy
metadata: {name: default}
spec:
  classes:
    standard: {tokensPerMinute: 20000, maxConcurrent: 2, dailyTokens: 2000000}
    batch:    {tokensPerMinute: 5000,  maxConcurrent: 1}
  rules:                                           # dynamic rescaling, evaluated on a period
    - name: shed-batch-under-pressure
      when: {metric: queue_wait_p95_s, above: 2.0, for: 30s}
      then: {class: batch, scale: 0.5, min: {tokensPerMinute: 1000}}
      cooldown: 60s
"""

AGENT_HEAD = """\
apiVersion: agentos/v1
kind: Agent
metadata: {name: a}
spec:
  entrypoint: pkg.mod:Agent
"""

POLICY_HEAD = """\
apiVersion: agentos/v1
kind: QuotaPolicy
metadata: {name: p}
spec:
  classes:
    standard: {tokensPerMinute: 100}
    batch: {tokensPerMinute: 10, maxConcurrent: 1}
"""


def _issues(text: str, source: str = "x.yaml") -> list[SpecIssue]:
    with pytest.raises(SpecError) as caught:
        parse_text(text, source)
    return caught.value.issues


# ----------------------------------------------------------------------- good documents


def test_design_example_parses() -> None:
    agent_doc, policy_doc = parse_text(DESIGN_EXAMPLE, "design.yaml")

    assert (agent_doc.kind, agent_doc.name, agent_doc.line) == ("Agent", "repo-watcher", 1)
    agent = agent_doc.resource
    assert isinstance(agent, AgentResource)
    assert agent.metadata.labels == {"team": "infra"}
    assert agent.spec.entrypoint == "examples.repo_watcher:RepoWatcher"
    assert [t.kind for t in agent.spec.triggers] == ["schedule", "heartbeat", "inbox"]
    schedule, heartbeat, inbox = agent.spec.triggers
    assert (schedule.schedule, schedule.timezone, schedule.catch_up, schedule.overlap) == (
        "*/15 * * * *",
        "UTC",
        "one",
        "skip",
    )
    assert heartbeat.heartbeat == 1800.0
    assert inbox.inbox is not None
    assert inbox.inbox.max_message_bytes == 1_048_576
    assert agent.spec.hibernation.idle_after == 60.0
    assert agent.spec.hibernation.keep_kv == "auto"
    assert agent.spec.restart_policy.backoff.initial == 1.0
    assert agent.spec.restart_policy.backoff.max == 300.0
    assert agent.spec.restart_policy.crash_loop_after == 5
    assert agent.spec.config == {"path": "./watched"}

    assert (policy_doc.kind, policy_doc.name, policy_doc.line) == ("QuotaPolicy", "default", 17)
    policy = policy_doc.resource
    assert isinstance(policy, QuotaPolicyResource)
    assert policy.spec.timezone == "UTC"
    assert policy.spec.classes["standard"].daily_tokens == 2_000_000
    assert policy.spec.classes["batch"].daily_tokens is None
    (rule,) = policy.spec.rules
    assert rule.when.metric == "queue_wait_p95_s"
    assert (rule.when.above, rule.when.below, rule.when.for_) == (2.0, None, 30.0)
    assert rule.then.class_ == "batch"
    assert rule.then.scale == 0.5
    assert rule.then.min is not None
    assert rule.then.min.tokens_per_minute == 1000
    assert rule.cooldown == 60.0


GOOD_DOCUMENTS = {
    "design example": DESIGN_EXAMPLE,
    "minimal agent": AGENT_HEAD,
    "every trigger kind": AGENT_HEAD
    + """\
  triggers:
    - schedule: "0 9 * * mon-fri"
      timezone: Europe/Paris
      catchUp: all
      overlap: cancelPrevious
    - every: 1h30m
      catchUp: skip
      overlap: queue
    - heartbeat: 500ms
    - at: 2026-12-01T09:00:00Z
    - at: "2026-12-01T09:00:00+02:00"
    - inbox:
    - inbox: {maxMessageBytes: 4096}
  hibernation: {idleAfter: 0s, keepKV: never}
  priority: 1000
  config: {nested: {list: [1, 2.5, "x", null, true]}}
""",
    "snake_case names are accepted too": AGENT_HEAD
    + """\
  quota_class: batch
  restart_policy: {crash_loop_after: 1}
""",
    "policy with every kind of rule": POLICY_HEAD
    + """\
  timezone: America/New_York
  rules:
    - name: office-hours
      when: {hours: "09:00-18:00", weekdays: [mon, tue, wed, thu, fri]}
      then: {class: standard, set: {tokensPerMinute: 500}, max: {tokensPerMinute: 400}}
    - name: night
      when: {hours: "22:00-06:00"}
      then: {class: batch, scale: 2}
      stabilization: 5m
    - name: errors-at-weekends
      when: {metric: error_rate, below: 0.1, weekdays: [sat, sun], hours: "06:00-22:00"}
      then: {class: batch, scale: 0.25, min: {maxConcurrent: 1}, max: {maxConcurrent: 3}}
      cooldown: 1h
""",
    "class with per-agent limits": POLICY_HEAD
    + """\
    shared:
      tokensPerMinute: 1000
      perAgent: {tokensPerMinute: 200, maxConcurrent: 1, dailyTokens: 5000}
""",
    "leading comments and empty documents": "# header\n---\n---\n" + AGENT_HEAD + "---\n",
}


@pytest.mark.parametrize("text", GOOD_DOCUMENTS.values(), ids=GOOD_DOCUMENTS.keys())
def test_good_documents_round_trip(text: str) -> None:
    documents = parse_text(text)
    assert documents
    for document in documents:
        data = document.canonical()
        assert json.loads(json.dumps(data)) == data
        assert parse_resource(data) == document.resource
        assert canonical(parse_resource(data)) == data
        # Revalidating from the canonical YAML gives the same thing again.
        (again,) = parse_text(json.dumps(data))
        assert again.resource == document.resource


def test_canonical_form() -> None:
    (document,) = parse_text(
        AGENT_HEAD
        + """\
  triggers:
    - every: 90
    - heartbeat: 30m
    - inbox:
"""
    )
    assert document.canonical() == {
        "apiVersion": "agentos/v1",
        "kind": "Agent",
        "metadata": {"name": "a", "labels": {}},
        "spec": {
            "entrypoint": "pkg.mod:Agent",
            "model": "default",
            "triggers": [
                {"every": "1m30s", "timezone": "UTC", "catchUp": "one", "overlap": "skip"},
                {"heartbeat": "30m"},
                {"inbox": {"maxMessageBytes": 1_048_576}},
            ],
            "hibernation": {"idleAfter": "1m", "keepKV": "auto"},
            "quotaClass": "standard",
            "priority": 50,
            "restartPolicy": {
                "backoff": {"initial": "1s", "max": "5m"},
                "crashLoopAfter": 5,
            },
            "config": {},
        },
    }


@pytest.mark.parametrize(
    ("trigger", "kind"),
    [
        ({"schedule": "* * * * *"}, "schedule"),
        ({"heartbeat": "1s"}, "heartbeat"),
        ({"every": 5}, "every"),
        ({"at": datetime(2026, 1, 1, tzinfo=UTC)}, "at"),
        ({"inbox": {}}, "inbox"),
        ({"inbox": None}, "inbox"),
    ],
)
def test_trigger_kind(trigger: dict[str, object], kind: str) -> None:
    assert Trigger.model_validate(trigger).kind == kind


@pytest.mark.parametrize(
    ("hours", "window"),
    [
        (None, None),
        ("09:00-18:00", (time(9), time(18))),
        ("22:30-06:00", (time(22, 30), time(6))),
    ],
)
def test_hours_window(hours: str | None, window: tuple[time, time] | None) -> None:
    when = RuleWhen.model_validate({"hours": hours, "weekdays": ["mon"]})
    assert when.hours_window == window


def test_models_are_frozen() -> None:
    spec = AgentSpec(entrypoint="a:B")
    with pytest.raises(ValidationError):
        spec.priority = 3  # type: ignore[misc]


def test_models_validated_directly_explain_cross_field_errors() -> None:
    with pytest.raises(ValidationError, match=r"initial \(10m\) must not be longer than max"):
        AgentSpec.model_validate(
            {"entrypoint": "a:B", "restartPolicy": {"backoff": {"initial": "10m", "max": "5m"}}}
        )


# ------------------------------------------------------------------------ bad documents

BAD_DOCUMENTS = [
    # (id, text, line, path, message fragment)
    ("yaml syntax", "a: [1, 2\nb: 3\n", 2, "", "invalid YAML: "),
    ("yaml bad indent", AGENT_HEAD + "   model: x\n", 6, "", "invalid YAML: "),
    ("not a mapping", "- 1\n- 2\n", 1, "", "expected a mapping with apiVersion, kind"),
    ("scalar document", "hello\n", 1, "", 'got "hello"'),
    (
        "missing apiVersion",
        "kind: Agent\nmetadata: {name: a}\nspec: {entrypoint: 'a:B'}\n",
        1,
        "apiVersion",
        'missing (expected "agentos/v1")',
    ),
    (
        "wrong apiVersion",
        AGENT_HEAD.replace("agentos/v1", "agentos/v2"),
        1,
        "apiVersion",
        'unsupported apiVersion "agentos/v2" (expected "agentos/v1")',
    ),
    (
        "missing kind",
        "apiVersion: agentos/v1\nmetadata: {name: a}\n",
        1,
        "kind",
        "missing (expected one of: Agent, QuotaPolicy, Model, ToolServer)",
    ),
    (
        "unknown kind",
        AGENT_HEAD.replace("kind: Agent", "kind: Agnet"),
        2,
        "kind",
        'unknown kind "Agnet" (expected one of: Agent, QuotaPolicy, Model, ToolServer)',
    ),
    (
        "bad name",
        AGENT_HEAD.replace("name: a", "name: Repo_Watcher"),
        3,
        "metadata.name",
        "expected a lowercase DNS label (1-63 characters of a-z, 0-9 and '-', starting and "
        'ending with a letter or digit); got "Repo_Watcher"',
    ),
    (
        "name with braces",
        AGENT_HEAD.replace("name: a", 'name: "{a}"'),
        3,
        "metadata.name",
        'got "{a}"',
    ),
    (
        "name too long",
        AGENT_HEAD.replace("name: a", "name: " + "a" * 64),
        3,
        "metadata.name",
        "expected a lowercase DNS label",
    ),
    (
        "label not a string",
        AGENT_HEAD.replace("{name: a}", "{name: a, labels: {tier: [1]}}"),
        3,
        "metadata.labels.tier",
        "expected a valid string; got a list",
    ),
    (
        "missing spec",
        "apiVersion: agentos/v1\nkind: Agent\nmetadata: {name: a}\n",
        1,
        "spec",
        "required field is missing",
    ),
    (
        "missing entrypoint",
        "apiVersion: agentos/v1\nkind: Agent\nmetadata: {name: a}\nspec:\n  model: x\n",
        4,
        "spec.entrypoint",
        "required field is missing",
    ),
    (
        "unknown field",
        AGENT_HEAD + "  triggrs: []\n",
        6,
        "spec.triggrs",
        "unknown field (expected one of: entrypoint, model, modelFallback, triggers, hibernation, "
        "quotaClass, priority, restartPolicy, config, context, tools, limits, codePath, codeHash, "
        "route, placement, evaluate); "
        'did you mean "triggers"?',
    ),
    (
        "unknown top-level field",
        AGENT_HEAD + "status: {}\n",
        6,
        "status",
        "unknown field (expected one of: apiVersion, kind, metadata, spec)",
    ),
    (
        "bad entrypoint",
        AGENT_HEAD.replace("pkg.mod:Agent", "pkg.mod.Agent"),
        5,
        "spec.entrypoint",
        'expected an import path like "package.module:ClassName"; got "pkg.mod.Agent"',
    ),
    (
        "bad cron",
        AGENT_HEAD + "  triggers:\n    - heartbeat: 1m\n    - schedule: '61 * * * *'\n",
        8,
        "spec.triggers[1].schedule",
        'invalid cron expression "61 * * * *"',
    ),
    (
        "bad timezone",
        AGENT_HEAD + "  triggers:\n    - schedule: '* * * * *'\n      timezone: Mars/Base\n",
        8,
        "spec.triggers[0].timezone",
        'unknown time zone "Mars/Base" (expected an IANA name such as "UTC"',
    ),
    (
        "bad catchUp",
        AGENT_HEAD + "  triggers:\n    - every: 5m\n      catchUp: maybe\n",
        8,
        "spec.triggers[0].catchUp",
        'expected one of: skip, one, all; got "maybe"',
    ),
    (
        "trigger without a kind",
        AGENT_HEAD + "  triggers:\n    - shedule: '* * * * *'\n",
        7,
        "spec.triggers[0]",
        "a trigger needs one of: schedule, heartbeat, every, at, inbox (got: shedule); did you "
        'mean "schedule"?',
    ),
    (
        "trigger with two kinds",
        AGENT_HEAD + "  triggers:\n    - heartbeat: 1m\n      inbox: {}\n",
        7,
        "spec.triggers[0]",
        "a trigger takes exactly one of: schedule, heartbeat, every, at, inbox; got heartbeat, "
        "inbox",
    ),
    (
        "clock option on heartbeat",
        AGENT_HEAD + "  triggers:\n    - heartbeat: 1m\n      overlap: queue\n",
        8,
        "spec.triggers[0].overlap",
        "only schedule and every triggers take overlap, not heartbeat",
    ),
    (
        "clock option on inbox",
        AGENT_HEAD + "  triggers:\n    - inbox: {}\n      catchUp: all\n",
        8,
        "spec.triggers[0].catchUp",
        "only schedule and every triggers take catchUp, not inbox",
    ),
    (
        "unknown trigger option",
        AGENT_HEAD + "  triggers:\n    - every: 5m\n      timezon: UTC\n",
        8,
        "spec.triggers[0].timezon",
        "unknown field (expected one of: schedule, heartbeat, every, at, inbox, timezone, "
        'catchUp, overlap); did you mean "timezone"?',
    ),
    (
        "zero heartbeat",
        AGENT_HEAD + "  triggers:\n    - heartbeat: 0s\n",
        7,
        "spec.triggers[0].heartbeat",
        'expected a duration greater than 0, like "30s"; got "0s"',
    ),
    (
        "bad every",
        AGENT_HEAD + "  triggers:\n    - every: 5x\n",
        7,
        "spec.triggers[0].every",
        'expected a duration like "30s", "5m", "1h30m"; got "5x"',
    ),
    (
        "naive at",
        AGENT_HEAD + "  triggers:\n    - at: 2026-12-01T09:00:00\n",
        7,
        "spec.triggers[0].at",
        'expected a date and time with a time zone, like "2026-12-01T09:00:00Z"',
    ),
    (
        "bad inbox size",
        AGENT_HEAD + "  triggers:\n    - inbox: {maxMessageBytes: 0}\n",
        7,
        "spec.triggers[0].inbox.maxMessageBytes",
        "expected a value greater than 0; got 0",
    ),
    (
        "bad idleAfter",
        AGENT_HEAD + "  hibernation:\n    idleAfter: soon\n",
        7,
        "spec.hibernation.idleAfter",
        'expected a duration like "30s", "5m", "1h30m"; got "soon"',
    ),
    (
        "bad keepKV",
        AGENT_HEAD + "  hibernation: {keepKV: sometimes}\n",
        6,
        "spec.hibernation.keepKV",
        'expected one of: auto, always, never; got "sometimes"',
    ),
    (
        "priority too high",
        AGENT_HEAD + "  priority: 1001\n",
        6,
        "spec.priority",
        "expected a value less than or equal to 1000; got 1001",
    ),
    (
        "priority not an int",
        AGENT_HEAD + "  priority: high\n",
        6,
        "spec.priority",
        'expected a valid integer; got "high"',
    ),
    (
        "priority is a bool",
        AGENT_HEAD + "  priority: true\n",
        6,
        "spec.priority",
        "expected a valid integer; got true",
    ),
    (
        "backoff initial above max",
        AGENT_HEAD + "  restartPolicy:\n    backoff:\n      max: 5m\n      initial: 10m\n",
        9,
        "spec.restartPolicy.backoff.initial",
        "initial (10m) must not be longer than max (5m)",
    ),
    (
        "crashLoopAfter zero",
        AGENT_HEAD + "  restartPolicy: {crashLoopAfter: 0}\n",
        6,
        "spec.restartPolicy.crashLoopAfter",
        "expected a value greater than or equal to 1; got 0",
    ),
    (
        "config not a mapping",
        AGENT_HEAD + "  config: [1]\n",
        6,
        "spec.config",
        "expected a mapping; got a list",
    ),
    (
        "duplicate yaml key",
        AGENT_HEAD + "  model: a\n  model: b\n",
        7,
        "spec.model",
        "duplicate key (first at line 6)",
    ),
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
    (
        "duplicate names in one text",
        AGENT_HEAD + "---\n" + AGENT_HEAD,
        9,
        "metadata.name",
        'duplicate Agent "a" (first defined at x.yaml:1)',
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "path", "message"),
    [case[1:] for case in BAD_DOCUMENTS],
    ids=[case[0] for case in BAD_DOCUMENTS],
)
def test_bad_documents_are_reported_with_line_path_and_message(
    text: str, line: int, path: str, message: str
) -> None:
    issues = _issues(text)
    found = [(i.source, i.line, i.path) for i in issues if message in i.message]
    assert ("x.yaml", line, path) in found, "\n".join(map(str, issues))
    for issue in issues:
        assert "Value error" not in issue.message
        assert "https://" not in issue.message


def test_all_issues_of_a_document_are_reported_together() -> None:
    text = (
        AGENT_HEAD.replace("agentos/v1", "v0").replace("name: a", "name: A")
        + "  priority: -1\n  triggers:\n    - every: 0s\n"
    )
    issues = _issues(text)
    assert [(i.line, i.path) for i in issues] == [
        (1, "apiVersion"),
        (3, "metadata.name"),
        (6, "spec.priority"),
        (8, "spec.triggers[0].every"),
    ]


def test_all_issues_of_a_rule_are_reported_together() -> None:
    text = (
        POLICY_HEAD
        + "  rules:\n    - name: r\n      when: {metric: error_rate, above: 1}\n"
        + "      then:\n        class: batch\n        scale: 2\n        set: {}\n"
        + "        min: {tokensPerMinute: 9, maxConcurrent: 9}\n"
        + "        max: {tokensPerMinute: 1, maxConcurrent: 1}\n"
    )
    assert [(i.line, i.path) for i in _issues(text)] == [
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
    issues = _issues(_rules(*rules))
    assert [(i.source, i.line, i.path) for i in issues] == [
        ("x.yaml", 11 + 3 * index, f"spec.rules[{index}].then")
    ]
    assert message in issues[0].message


def test_each_overlapping_rule_is_reported_once() -> None:
    issues = _issues(_rules(*[("{metric: error_rate, above: 1}", SCALE_BATCH)] * 3))
    assert [(i.line, i.path) for i in issues] == [
        (14, "spec.rules[1].then"),
        (17, "spec.rules[2].then"),
    ]
    assert all('like rules[0] ("r0")' in issue.message for issue in issues)


def test_yaml_error_stops_the_file_but_keeps_earlier_issues() -> None:
    text = AGENT_HEAD.replace("name: a", "name: A") + "---\nkey: [unclosed\n"
    assert [(i.line, i.path) for i in _issues(text)] == [(3, "metadata.name"), (8, "")]


def _alias_bomb(levels: int = 10, fanout: int = 9) -> str:
    """``levels`` anchors, each a list of ``fanout`` aliases of the one before: fanout**levels
    nodes in about 60 bytes a level (the "billion laughs")."""
    rows = ['a0: &a0 "lol"']
    for level in range(1, levels):
        aliases = ",".join([f"*a{level - 1}"] * fanout)
        rows.append(f"a{level}: &a{level} [{aliases}]")
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (_alias_bomb(), 1),
        (AGENT_HEAD + "---\n" + _alias_bomb(), 7),  # a later document: its own start line
        (_alias_bomb(levels=4, fanout=23), 1),  # 23**3 = 12,167 nodes: just past the limit
    ],
)
def test_alias_bombs_are_refused_at_once(text: str, line: int) -> None:
    started = perf_counter()
    with pytest.raises(SpecError) as info:
        parse_text(text, source="bomb.yaml")
    assert perf_counter() - started < 1.0
    (issue,) = [i for i in info.value.issues if "aliases" in i.message]
    assert (issue.source, issue.line, issue.path) == ("bomb.yaml", line, "")
    assert str(issue).startswith(f"bomb.yaml:{line}: aliases expand this document to ")
    assert f"at most {MAX_EXPANDED_NODES:,}" in issue.message


def test_a_few_aliases_still_load() -> None:
    text = """\
        apiVersion: agentos/v1
        kind: Agent
        metadata: {name: a, labels: &labels {team: docs}}
        spec:
          entrypoint: pkg.mod:A
          restartPolicy: {backoff: &backoff {initial: 1s, max: 5m}}
          config:
            defaults: &defaults {path: ./var, tags: [x, y]}
            other: {<<: *defaults, path: ./other}
            labels: *labels
            retry: *backoff
        """
    (doc,) = parse_text(textwrap.dedent(text))
    config = doc.resource.spec.config
    assert config["other"] == {"path": "./other", "tags": ["x", "y"]}
    assert config["labels"] == doc.resource.metadata.labels == {"team": "docs"}
    assert config["retry"] == {"initial": "1s", "max": "5m"}


def test_a_large_document_written_out_is_not_an_alias_bomb() -> None:
    items = "".join(f"\n    - item-{i}" for i in range(MAX_EXPANDED_NODES))
    text = AGENT_HEAD + "  config:\n    items:" + items.replace("\n    -", "\n      -") + "\n"
    (doc,) = parse_text(text)
    assert len(doc.resource.spec.config["items"]) == MAX_EXPANDED_NODES


# ------------------------------------------------------------------------- load_paths


def _write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_load_paths_reads_directories_recursively_in_order(tmp_path: Path) -> None:
    _write(tmp_path, "b.yml", AGENT_HEAD.replace("name: a", "name: b"))
    _write(tmp_path, "a.yaml", AGENT_HEAD + "---\n" + POLICY_HEAD)
    _write(tmp_path, "sub/c.yaml", AGENT_HEAD.replace("name: a", "name: c"))
    _write(tmp_path, "notes.txt", "not: yaml: at all: [")
    _write(tmp_path, ".hidden/d.yaml", "garbage: [")

    documents = load_paths([tmp_path, tmp_path / "a.yaml"])  # a.yaml is read once

    assert [(Path(d.source).name, d.line, d.kind, d.name) for d in documents] == [
        ("a.yaml", 1, "Agent", "a"),
        ("a.yaml", 7, "QuotaPolicy", "p"),
        ("b.yml", 1, "Agent", "b"),
        ("c.yaml", 1, "Agent", "c"),
    ]
    assert all(isinstance(d, Document) for d in documents)


def test_load_paths_reports_errors_from_every_file(tmp_path: Path) -> None:
    first = _write(tmp_path, "agents/first.yaml", AGENT_HEAD + "  priority: 5000\n")
    second = _write(
        tmp_path, "agents/nested/second.yaml", "# comment\n" + POLICY_HEAD + "  timezone: Moon\n"
    )
    _write(tmp_path, "agents/ok.yaml", AGENT_HEAD.replace("name: a", "name: fine"))

    with pytest.raises(SpecError) as caught:
        load_paths([tmp_path / "agents"])

    assert [(i.source, i.line, i.path) for i in caught.value.issues] == [
        (str(first), 6, "spec.priority"),
        (str(second), 9, "spec.timezone"),
    ]
    assert str(caught.value).splitlines() == [
        f"{first}:6: spec.priority: expected a value less than or equal to 1000; got 5000",
        f'{second}:9: spec.timezone: unknown time zone "Moon" (expected an IANA name such '
        'as "UTC" or "Europe/Paris")',
    ]


LOAD_PATH_PROBLEMS = [
    # (id, files to write, paths to load, expected (source, line, path, message) issues)
    (
        "missing path",
        {"ok.yaml": AGENT_HEAD},
        ["ok.yaml", "nope.yaml"],
        [("nope.yaml", 0, "", "no such file or directory")],
    ),
    (
        "directory without yaml",
        {"empty/readme.md": "hi"},
        ["empty"],
        [("empty", 0, "", "directory contains no .yaml or .yml files")],
    ),
    (
        "duplicate across files",
        {"one.yaml": AGENT_HEAD, "two.yaml": "# two\n" + AGENT_HEAD},
        ["one.yaml", "two.yaml"],
        [("two.yaml", 4, "metadata.name", 'duplicate Agent "a" (first defined at one.yaml:1)')],
    ),
    (
        "same name different kinds is fine, bad file still reported",
        {
            "one.yaml": AGENT_HEAD.replace("name: a", "name: p"),
            "two.yaml": POLICY_HEAD,
            "three.yaml": "[",
        },
        ["one.yaml", "two.yaml", "three.yaml"],
        [("three.yaml", 1, "", "invalid YAML: ")],
    ),
    (
        "not utf-8",
        {},
        ["latin1.yaml"],
        [("latin1.yaml", 0, "", "cannot read: ")],
    ),
]


@pytest.mark.parametrize(
    ("files", "paths", "expected"),
    [case[1:] for case in LOAD_PATH_PROBLEMS],
    ids=[case[0] for case in LOAD_PATH_PROBLEMS],
)
def test_load_paths_problems(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    files: dict[str, str],
    paths: list[str],
    expected: list[tuple[str, int, str, str]],
) -> None:
    monkeypatch.chdir(tmp_path)
    for relative, text in files.items():
        _write(tmp_path, relative, text)
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError) as caught:
        load_paths(paths)
    got = [(i.source, i.line, i.path, i.message) for i in caught.value.issues]
    assert len(got) == len(expected), got
    for (source, line, path, message), (e_source, e_line, e_path, e_message) in zip(
        got, expected, strict=True
    ):
        assert (source, line, path) == (e_source, e_line, e_path)
        assert message.startswith(e_message)


def test_load_paths_with_nothing_to_load() -> None:
    assert load_paths([]) == []
    assert parse_text("") == []
    assert parse_text("# just a comment\n---\n") == []


# ------------------------------------------------------------ parse_resource and output


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"kind": "Agent"}, "apiVersion", "missing"),
        ({"apiVersion": "agentos/v1", "kind": "Pod"}, "kind", 'unknown kind "Pod"'),
        (
            {"apiVersion": "agentos/v1", "kind": "Agent", "metadata": {"name": "a"}, "spec": {}},
            "spec.entrypoint",
            "required field is missing",
        ),
    ],
)
def test_parse_resource_rejects(data: dict[str, object], path: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_resource(data)
    issue = caught.value.issues[0]
    assert (issue.source, issue.line, issue.path) == ("<data>", 0, path)
    assert message in issue.message
    assert str(issue).startswith(f"<data>: {path}: ")


@pytest.mark.parametrize(
    ("issue", "text"),
    [
        (SpecIssue("a.yaml", 3, "spec.model", "bad"), "a.yaml:3: spec.model: bad"),
        (SpecIssue("a.yaml", 3, "", "bad"), "a.yaml:3: bad"),
        (SpecIssue("dir", 0, "", "missing"), "dir: missing"),
    ],
)
def test_spec_issue_str(issue: SpecIssue, text: str) -> None:
    assert str(issue) == text


def test_spec_error_lists_issues_one_per_line() -> None:
    issues = [SpecIssue("a", 1, "x", "one"), SpecIssue("b", 2, "", "two")]
    error = SpecError(issues)
    assert error.issues == issues
    assert str(error) == "a:1: x: one\nb:2: two"


def test_json_schema() -> None:
    schema = json_schema()
    json.dumps(schema)  # must be plain JSON
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {ref["$ref"] for ref in schema["oneOf"]} == {
        "#/$defs/AgentResource",
        "#/$defs/QuotaPolicyResource",
        "#/$defs/ModelResource",
        "#/$defs/ToolServerResource",
    }
    definitions = schema["$defs"]
    assert "keepKV" in definitions["Hibernation"]["properties"]
    assert "for" in definitions["RuleWhen"]["properties"]
    assert "class" in definitions["RuleThen"]["properties"]
    classes = definitions["QuotaPolicySpec"]["properties"]["classes"]
    assert list(classes["patternProperties"].values()) == [{"$ref": "#/$defs/ClassLimits"}]
    assert "perAgent" in definitions["ClassLimits"]["properties"]
    assert definitions["AgentSpec"]["additionalProperties"] is False
    assert definitions["Trigger"]["oneOf"] == [
        {"required": [kind]} for kind in ("schedule", "heartbeat", "every", "at", "inbox")
    ]
