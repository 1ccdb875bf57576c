"""The CLI shows user text as data (issue 22, item 5): real subprocesses, real Redis.

Agent names, messages, reasons, answers and error text may hold rich markup (``[/x]``)
or control characters (a newline, an ANSI escape): no command crashes on them, and
none lets them colour the terminal or forge a line. ``delete`` of a missing agent
changes nothing, and a Redis URL whose password its parsers misread is never shown.
"""

from __future__ import annotations

import time

import pytest

from agentos.cli.common import hides_userinfo, printable
from agentos.store import Store
from agentos.store.keys import event_fields
from tests.cli_support import cli, show
from tests.helpers import agent_doc, apply

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

ECHO = "tests.fixture_agents:Echo"
MARKUP = "[/x]"


@pytest.mark.parametrize(
    "args",
    [
        ["describe", "agent", MARKUP],
        ["describe", "model", MARKUP],
        ["events", MARKUP],
        ["send", MARKUP, "hi"],
        ["tasks", MARKUP],
        ["pending", MARKUP],
        ["answer", MARKUP, "t-1", "--yes"],
        ["event", MARKUP, "go"],
        ["hibernate", MARKUP],
        ["wake", MARKUP],
        ["delete", "agent", MARKUP],
        ["delete", "policy", MARKUP],
        ["delete", "model", MARKUP],
        ["policy", "explain", MARKUP],
    ],
    ids=lambda a: " ".join(a[:2]),
)
async def test_a_markup_name_is_one_error_line_not_a_traceback(
    env: dict[str, str],
    args: list[str],
) -> None:
    proc = await cli(env, *args)
    assert proc.returncode == 1, show(proc)
    assert proc.stderr.splitlines() == [proc.stderr.strip()], show(proc)
    assert proc.stderr.startswith("error: "), show(proc)
    assert f'"{MARKUP}" not found' in proc.stderr, show(proc)


async def test_delete_of_a_missing_agent_changes_nothing(
    env: dict[str, str],
    store: Store,
) -> None:
    await apply(store, agent_doc("echo", ECHO))
    generation = await store.specs.generation()
    keys = await store.namespace_keys()
    events = await store.events.read(None, count=100)
    missing = await cli(env, "delete", "agent", "nosuchagent")
    forged = await cli(env, "delete", "agent", "x\n12:00:00 echo: Deleted (delete) Agent deleted")
    for proc in (missing, forged):
        assert proc.returncode == 1, show(proc)
        assert len(proc.stderr.splitlines()) == 1, show(proc)
    assert "Deleted" not in missing.stdout + missing.stderr
    assert "\\n12:00:00" in forged.stderr  # the newline is shown, not obeyed
    assert await store.specs.generation() == generation
    assert await store.namespace_keys() == keys
    assert await store.events.read(None, count=100) == events
    assert await store.specs.pending_purges() == set()
    # An existing agent still goes, once.
    gone = await cli(env, "delete", "agent", "echo")
    assert gone.returncode == 0, show(gone)
    assert await store.specs.generation() == generation + 1
    again = await cli(env, "delete", "agent", "echo")
    assert again.returncode == 1, show(again)
    assert await store.specs.generation() == generation + 1


FORGED = "hello\n12:00:00 echo: Deleted (delete) forged\x1b[2J\x1b]0;pwned\x07"
SHOWN = "hello\\n12:00:00 echo: Deleted (delete) forged\\x1b[2J\\x1b]0;pwned\\x07"


async def test_stored_text_cannot_forge_lines_or_colour_the_terminal(
    env: dict[str, str],
    store: Store,
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    await store.events.record_fleet_event("echo", "Answered", "ask", FORGED, "")
    fields = event_fields("echo", time.time(), "Answered", "ask", FORGED, "")
    await store.conn.r.xadd(store.keys.events("echo"), fields)  # the agent's own copy
    await store.conn.r.hset(store.keys.status("echo"), mapping={"reason": f"{MARKUP} \x1b[31mred"})
    fleet = await cli(env, "events")
    mine = await cli(env, "events", "echo")
    described = await cli(env, "describe", "agent", "echo")
    ps = await cli(env, "ps")
    for proc in (fleet, mine, described, ps):
        assert proc.returncode == 0, show(proc)
        assert "\x1b" not in proc.stdout, show(proc)
        assert "\x07" not in proc.stdout, show(proc)
        assert "forged" not in proc.stdout or "hello\\n12:00:00" in proc.stdout, show(proc)
    for proc in (fleet, mine):
        (line,) = [x for x in proc.stdout.splitlines() if "Answered" in x]
        assert line.endswith(
            "hello\\n12:00:00 echo: Deleted (delete) forged\\x1b[2J\\x1b]0;pwned\\x07"
        )
        assert not any(x.startswith("12:00:00 echo: Deleted") for x in proc.stdout.splitlines())
    assert f"{MARKUP} \\x1b[31mred" in ps.stdout, show(ps)


async def test_control_characters_and_deep_json_from_the_operator_are_refused(
    env: dict[str, str],
    store: Store,
) -> None:
    await apply(store, agent_doc("echo", ECHO))
    keys = await store.namespace_keys()
    as_ = await cli(env, "answer", "echo", "t-1", "--yes", "--as", "eve\nforged")
    name = await cli(env, "event", "echo", "go\nforged")
    deep = await cli(env, "event", "echo", "go", "[" * 10_000 + "]" * 10_000)
    for proc in (as_, name, deep):
        assert proc.returncode == 2, show(proc)
        assert len(proc.stderr.splitlines()) == 1, show(proc)
        assert "Traceback" not in proc.stderr
    assert "nested deeper than" in deep.stderr
    assert await store.namespace_keys() == keys


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:hun/ter2@127.0.0.1:1/0",
        "redis://user:hun?ter2@127.0.0.1:1/0",
        "redis://user:hun#ter2@127.0.0.1:1/0",
        "redis://:hun/t?e#r2@127.0.0.1:1",
        "rediss+cluster://user:hun/ter2@127.0.0.1:1",
        "user:hunter2@127.0.0.1:1",
    ],
)
@pytest.mark.parametrize("command", [["ps"], ["daemon"]])
async def test_a_url_that_does_not_parse_is_never_shown(
    env: dict[str, str],
    url: str,
    command: list[str],
) -> None:
    proc = await cli({**env, "AGENTOS_REDIS_URL": url}, *command)
    assert proc.returncode == 2, show(proc)
    assert "hun" not in proc.stdout + proc.stderr, show(proc)
    assert "ter2" not in proc.stdout + proc.stderr
    assert len(proc.stderr.splitlines()) == 1, show(proc)


@pytest.mark.parametrize(
    ("url", "hidden"),
    [
        ("redis://user:pa/ss@host:1/0", True),
        ("redis://user:pa?ss@host:1/0", True),
        ("redis://user:pa#ss@host:1/0", True),
        ("redis://u:a@b/c@host", True),
        ("user:secret@host", True),
        ("redis://user:pa%2Fss@host:1/0", False),
        ("redis://user:p@ss@host:1/0", False),  # the last @ ends the userinfo
        ("redis://host:1/0?password=a@b", False),
        ("redis://host:1/0", False),
        ("unix://:secret@/tmp/redis.sock", False),
    ],
)
def test_hides_userinfo(url: str, hidden: bool) -> None:
    assert hides_userinfo(url) is hidden


@pytest.mark.parametrize(
    ("text", "keep", "shown"),
    [
        ("plain [b]text[/b]", "", "plain [b]text[/b]"),
        ("a\nb\tc\rd", "", "a\\nb\\tc\\rd"),
        ("a\nb\tc", "\n\t", "a\nb\tc"),
        ("\x1b[31mred\x07", "", "\\x1b[31mred\\x07"),
        ("\x9bC1 \u202eevil", "", "\\x9bC1 \\u202eevil"),
    ],
)
def test_printable(text: str, keep: str, shown: str) -> None:
    assert printable(text, keep=keep) == shown


async def test_a_bad_daemon_id_is_one_line_and_exit_2(
    env: dict[str, str],
) -> None:
    proc = await cli(env, "daemon", "--id", "bad{id}", "--engine", "sim")
    assert proc.returncode == 2, show(proc)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len((proc.stderr + proc.stdout).strip().splitlines()) == 1, show(proc)
