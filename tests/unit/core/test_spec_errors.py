"""agentos.core.spec reports bad documents: each issue with its file, line, path and a
message a person can act on; YAML errors and alias bombs stop a file at once."""

import textwrap
from time import perf_counter

import pytest

from agentos.core.spec import (
    MAX_EXPANDED_NODES,
    SpecError,
    parse_text,
)
from tests.spec_samples import AGENT_HEAD, issues_of

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
    issues = issues_of(text)
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
    issues = issues_of(text)
    assert [(i.line, i.path) for i in issues] == [
        (1, "apiVersion"),
        (3, "metadata.name"),
        (6, "spec.priority"),
        (8, "spec.triggers[0].every"),
    ]


def test_yaml_error_stops_the_file_but_keeps_earlier_issues() -> None:
    text = AGENT_HEAD.replace("name: a", "name: A") + "---\nkey: [unclosed\n"
    assert [(i.line, i.path) for i in issues_of(text)] == [(3, "metadata.name"), (8, "")]


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
