"""Tests for agentos.core.spec: the resource models, their canonical form, the loaders
and their error reports (bad documents: test_spec_errors.py; quota policies and their
rules: test_spec_policy.py)."""

import json
import textwrap
from datetime import UTC, datetime, time
from pathlib import Path

import pytest
from pydantic import ValidationError

from agentos.core.spec import (
    AgentResource,
    AgentSpec,
    Document,
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
from tests.spec_samples import AGENT_HEAD, POLICY_HEAD

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
