"""The `agentos` command end to end: real subprocesses against a real Redis.

Each test runs ``python -m agentos.cli`` from the repository root (so that the
``tests.fixture_agents:...`` entrypoints import) with ``AGENTOS_*`` pointing at the
session's server and the test's own namespace, and looks at Redis through the
``store`` fixture to check what the command did (or, for bad input, did not do).
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
import yaml

from agentos.store import Store
from tests.cli_support import (
    ROOT,
    TIMEOUT_S,
    base_env,
    cli,
    echo_state,
    env,
    exited,
    show,
    spawn,
    write,
)
from tests.helpers import agent_doc, apply, status_is, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]
# Re-exported: other modules imported these from here before tests.cli_support existed.
__all__ = ["ROOT", "TIMEOUT_S", "base_env", "cli", "env", "exited", "show", "spawn"]

ECHO = "tests.fixture_agents:Echo"
CRASHER = "tests.fixture_agents:Crasher"

COUNTER_YAML = """\
apiVersion: agentos/v1
kind: Agent
metadata:
  name: counter
spec:
  entrypoint: tests.fixture_agents:Counter
  config:
    limit: {limit}
"""


# (helpers: base_env, cli, echo_state, exited, show, spawn, write and the env fixture,
# in tests.cli_support)


# ---------------------------------------------------------------------- apply


async def test_apply_rejects_a_folder_with_any_invalid_document_and_applies_nothing(
    env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    folder = tmp_path / "specs"
    write(folder / "a-good.yaml", COUNTER_YAML.format(limit=2))
    bad = write(
        folder / "b-bad.yaml",
        """\
        apiVersion: agentos/v1
        kind: Agent
        metadata:
          name: nightly
        spec:
          entrypoint: tests.fixture_agents:Counter
          triggers:
            - schedule: "61 * * * *"
        ---
        apiVersion: agentos/v1
        kind: Agent
        metadata:
          name: typo
        spec:
          entrypoint: tests.fixture_agents:Counter
          priorty: 5
          priority: 5000
        """,
    )

    proc = await cli(env, "apply", "-f", str(folder))

    assert proc.returncode == 2, show(proc)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"{bad}:8: spec.triggers[0].schedule: invalid cron expression")
    assert lines[1].startswith(f"{bad}:16: spec.priorty: unknown field")
    assert 'did you mean "priority"?' in lines[1]
    assert lines[2] == (
        f"{bad}:17: spec.priority: expected a value less than or equal to 1000; got 5000"
    )
    assert lines[3:] == ["3 error(s); nothing was applied"]
    assert "a-good.yaml" not in proc.stderr
    assert await store.namespace_keys() == []


async def test_apply_reports_created_unchanged_configured_and_dry_run(
    env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    spec = write(tmp_path / "counter.yaml", COUNTER_YAML.format(limit=2))

    first = await cli(env, "apply", "-f", str(spec))
    assert (first.returncode, first.stdout) == (0, "agent/counter created\n"), show(first)
    stored = await store.specs.agent("counter")
    assert stored is not None
    assert stored["spec"]["config"] == {"limit": 2}

    again = await cli(env, "apply", "-f", str(spec))
    assert (again.returncode, again.stdout) == (0, "agent/counter unchanged\n"), show(again)

    write(spec, COUNTER_YAML.format(limit=3))
    changed = await cli(env, "apply", "-f", str(spec))
    assert (changed.returncode, changed.stdout) == (
        0,
        "agent/counter configured (spec.config.limit)\n",
    ), show(changed)
    configured = await store.specs.agent("counter")
    assert configured is not None
    assert configured["spec"]["config"] == {"limit": 3}

    write(spec, COUNTER_YAML.format(limit=4))
    keys = await store.namespace_keys()
    dry = await cli(env, "apply", "--dry-run", "-f", str(spec))
    assert (dry.returncode, dry.stdout) == (
        0,
        "agent/counter configured (spec.config.limit) (dry run)\n",
    ), show(dry)
    assert await store.specs.agent("counter") == configured
    assert await store.namespace_keys() == keys


# ---------------------------------------------------------------------- up and reading


async def test_up_until_idle_runs_the_fleet_and_the_read_commands_show_it(
    env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    spec = write(tmp_path / "counter.yaml", COUNTER_YAML.format(limit=2))

    started = time.monotonic()
    up = await cli(
        env,
        "up",
        "--engine",
        "sim",
        "--until-idle",
        "--grace",
        "1s",
        "--lease-ttl",
        "3s",
        "-f",
        str(spec),
    )
    assert up.returncode == 0, show(up)
    assert time.monotonic() - started < 20
    assert "agent/counter created" in up.stderr
    assert "Traceback" not in up.stderr

    ps = await cli(env, "ps", "-o", "json")
    assert ps.returncode == 0, show(ps)
    (row,) = json.loads(ps.stdout)
    assert row["name"] == "counter"
    assert (row["tasks"], row["steps"], row["restarts"]) == (1, 2, 0)
    assert row["phase"] in ("Idle", "Stopped", "Hibernated")
    assert row["owner"] == ""

    table = await cli(env, "ps")
    assert table.returncode == 0, show(table)
    assert table.stdout.split()[:9] == [
        *("NAME", "PHASE", "RESTARTS", "TASKS", "STEPS", "KV", "LAST-ACTIVE", "OWNER", "REASON"),
    ]
    assert re.search(rf"^counter\s+{row['phase']}\s+0\s+1\s+2\s", table.stdout, re.M)

    got = await cli(env, "get", "agents", "-o", "yaml")
    assert got.returncode == 0, show(got)
    agents = yaml.safe_load(got.stdout)
    assert [a["name"] for a in agents] == ["counter"]
    assert agents[0]["steps"] == 2

    events = await cli(env, "events", "counter")
    assert events.returncode == 0, show(events)
    assert re.search(r"^\d\d:\d\d:\d\d counter: Started ", events.stdout, re.M), events.stdout


async def test_describe_shows_a_crash_looping_agent_with_its_traceback(
    env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    spec = write(
        tmp_path / "crasher.yaml",
        f"""\
        apiVersion: agentos/v1
        kind: Agent
        metadata:
          name: crasher
        spec:
          entrypoint: {CRASHER}
          restartPolicy:
            backoff: {{initial: 50ms, max: 100ms}}
            crashLoopAfter: 2
        """,
    )
    up = await cli(
        env,
        "up",
        "--engine",
        "sim",
        "--until-idle",
        "--grace",
        "1s",
        "--lease-ttl",
        "3s",
        "-f",
        str(spec),
    )
    assert up.returncode == 0, show(up)

    text = await cli(env, "describe", "agent", "crasher")
    assert text.returncode == 0, show(text)
    assert re.search(r"^Phase: +Failed \(CrashLoop\)$", text.stdout, re.M), text.stdout
    assert re.search(r"^Last error: .*boom: the tool is broken", text.stdout, re.M)
    assert "RuntimeError: boom: the tool is broken" in text.stdout
    assert "Traceback (most recent call last):" in text.stdout
    assert "fixture_agents.py" in text.stdout

    as_json = await cli(env, "describe", "agent", "crasher", "-o", "json")
    assert as_json.returncode == 0, show(as_json)
    detail = json.loads(as_json.stdout)
    assert detail["name"] == "crasher"
    assert detail["status"]["phase"] == "Failed"
    assert "RuntimeError" in detail["status"]["lastTraceback"]
    assert "Failed" in [e["type"] for e in detail["events"]]


# ---------------------------------------------------------------------- failures


async def test_an_unreachable_redis_is_one_line_without_the_password(
    env: dict[str, str],
) -> None:
    proc = await cli(env, "--redis", "redis://user:s3cret@127.0.0.1:1/0", "ps")

    assert proc.returncode == 1, show(proc)
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: cannot reach Redis at redis://user:***@127.0.0.1:1/0")
    assert "127.0.0.1:1" in proc.stderr
    assert "s3cret" not in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_send_refuses_unknown_agents_and_oversized_messages(
    env: dict[str, str], store: Store
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {"maxMessageBytes": 10}}]))
    keys = await store.namespace_keys()

    nobody = await cli(env, "send", "nobody", "hi")
    assert nobody.returncode == 1, show(nobody)
    assert nobody.stderr.strip() == 'error: agent "nobody" not found'
    assert nobody.stdout == ""

    big = await cli(env, "send", "echo", "x" * 11)
    assert big.returncode == 1, show(big)
    assert big.stderr.strip() == 'error: message is 11 bytes; agent "echo" accepts at most 10'

    assert await store.namespace_keys() == keys
    assert await store.inbox.depth("echo") == 0

    ok = await cli(env, "send", "echo", "x" * 10)
    assert ok.returncode == 0, show(ok)
    match = re.fullmatch(r"sent (\d+-\d+) to echo\n", ok.stdout)
    assert match, ok.stdout
    assert await store.inbox.depth("echo") == 1

    described = await cli(env, "describe", "agent", "echo")
    assert described.returncode == 0, show(described)
    assert re.search(r"^Inbox: +1 waiting$", described.stdout, re.M), described.stdout
    assert re.search(r"^Triggers: +inbox$", described.stdout, re.M)


async def test_send_reads_the_message_from_a_file(
    env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    body = write(tmp_path / "message.txt", "hello from a file\n")
    keys = await store.namespace_keys()

    missing = await cli(env, "send", "echo", f"@{tmp_path / 'nope.txt'}")
    assert missing.returncode == 2, show(missing)
    assert missing.stderr.startswith("error: cannot read message file:")
    assert await store.namespace_keys() == keys

    ok = await cli(env, "send", "echo", f"@{body}")
    assert ok.returncode == 0, show(ok)
    assert await store.inbox.depth("echo") == 1


async def test_send_dash_reads_the_message_from_stdin(env: dict[str, str], store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))

    proc = await cli(env, "send", "echo", "-", stdin="hello from stdin")

    assert proc.returncode == 0, show(proc)
    await store.inbox.ensure("echo")
    messages = await store.inbox.read("echo", "test-reader")
    assert [m.body for m in messages] == ["hello from stdin"]


async def test_schema_and_version(env: dict[str, str]) -> None:
    schema = await cli(env, "schema")
    assert schema.returncode == 0, show(schema)
    parsed = json.loads(schema.stdout)
    assert parsed["$schema"].startswith("https://json-schema.org/")
    assert "Agent" in schema.stdout
    assert "QuotaPolicy" in schema.stdout

    version = await cli(env, "version")
    assert (version.returncode, version.stdout) == (0, "agentos 0.1.0\n"), show(version)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["frobnicate"], "No such command 'frobnicate'"),
        (["describe", "policy", "x"], "cannot describe 'policy': use `describe agent NAME`"),
        (["daemon", "--grace", "5s", "--lease-ttl", "3s"], "--grace must be shorter"),
        (["up", "--for", "soon"], "--for:"),
        (["get", "gadgets"], "cannot get 'gadgets': use one of agents"),
        (["get", "agents", "-l", "app"], "-l: 'app' is not key=value"),
    ],
)
async def test_usage_errors_exit_2_and_touch_nothing(
    env: dict[str, str], store: Store, args: list[str], message: str
) -> None:
    proc = await cli(env, *args)

    assert proc.returncode == 2, show(proc)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert await store.namespace_keys() == []


# ---------------------------------------------------------------------- daemons


async def test_sigterm_stops_the_daemon_gracefully_and_releases_the_lease(
    env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    log = tmp_path / "daemon.log"
    args = ("daemon", "--id", "d-term", "--grace", "2s", "--lease-ttl", "3s")
    with spawn(env, log, *args) as proc:
        await wait_until(
            lambda: status_is(store, "echo", phase="Idle", owner="d-term"),
            within=15,
            what="echo Idle",
        )
        assert (await store.leases.read(["echo"]))["echo"].owner == "d-term"
        daemons = await cli(env, "get", "daemons", "-o", "json")
        assert daemons.returncode == 0, show(daemons)
        (info,) = json.loads(daemons.stdout)
        assert (info["id"], info["pid"], info["engine"]) == ("d-term", proc.pid, "sim")

        proc.send_signal(signal.SIGTERM)
        code = await exited(proc, within=5)
        assert code == 0, log.read_text()

    assert await store.leases.read(["echo"]) == {}
    st = await store.agents.status("echo")
    assert st["owner"] == ""
    assert st["phase"] in ("Stopped", "Hibernated")
    assert await store.heartbeats.daemons() == {}
    output = log.read_text()
    assert "stopping agents" in output
    assert "Traceback" not in output


async def test_a_killed_daemons_agents_are_adopted_by_the_survivor(
    env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    names = [f"echo-{i}" for i in range(4)]
    await apply(store, *(agent_doc(n, ECHO, triggers=[{"inbox": {}}]) for n in names))
    fast = ("--lease-ttl", "2s", "--grace", "1s")
    with (
        spawn(env, tmp_path / "one.log", "daemon", "--id", "d-one", *fast) as one,
        spawn(env, tmp_path / "two.log", "daemon", "--id", "d-two", *fast) as two,
    ):
        procs = {"d-one": one, "d-two": two}

        async def owners() -> dict[str, str] | None:
            statuses = await store.agents.statuses(names)
            found = {n: statuses[n].get("owner", "") for n in names}
            return found if all(found.values()) else None

        before = await wait_until(owners, within=15, what="every agent owned")
        assert set(before.values()) <= set(procs)
        victim = sorted(set(before.values()))[0]
        survivor = "d-two" if victim == "d-one" else "d-one"
        adopted = [n for n in names if before[n] == victim]

        procs[victim].kill()
        assert await exited(procs[victim], within=5) == -signal.SIGKILL

        # An agent the first daemon handed over while both started (fair share) comes to
        # the survivor hibernated and stays so until something wakes it.
        async def all_with_survivor() -> bool:
            statuses = await store.agents.statuses(names)
            leases = await store.leases.read(names)
            return all(
                statuses[n].get("owner") == survivor
                and statuses[n].get("phase") in ("Idle", "Hibernated")
                and n in leases
                and leases[n].owner == survivor
                for n in names
            )

        await wait_until(all_with_survivor, within=10, what=f"adoption by {survivor}")
        assert procs[survivor].poll() is None

        target = adopted[0]
        sent = await cli(env, "send", target, "after the adoption")
        assert sent.returncode == 0, show(sent)

        async def processed() -> bool:
            state = await echo_state(store, target)
            return state is not None and "after the adoption" in state.bodies

        await wait_until(processed, within=10, what=f"{target} to process the message")
        events = [e.type for e in await store.events.read(target)]
        assert "Adopted" in events

        procs[survivor].send_signal(signal.SIGTERM)
        assert await exited(procs[survivor], within=8) == 0
    assert await store.leases.read(names) == {}
