"""The `agentos` command end to end: real subprocesses against a real Redis.

Each test runs ``python -m agentos.cli`` from the repository root (so that the
``tests.fixture_agents:...`` entrypoints import) with ``AGENTOS_*`` pointing at the
session's server and the test's own namespace, and looks at Redis through the
``store`` fixture to check what the command did (or, for bad input, did not do).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import IO

import anyio
import anyio.to_thread
import msgspec
import pytest
import yaml

from agentos.store import Store
from agentos.store.embedded import EmbeddedRedis, embedded_url
from tests.fixture_agents import EchoState, FlushState
from tests.helpers import agent_doc, apply, status_is, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parent.parent
ECHO = "tests.fixture_agents:Echo"
CRASHER = "tests.fixture_agents:Crasher"
TIMEOUT_S = 30.0

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


# ---------------------------------------------------------------------- helpers


def base_env(home: Path) -> dict[str, str]:
    """The test process's environment without any AGENTOS_* setting, plus a home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTOS_")}
    for noisy in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(noisy, None)
    env.update(NO_COLOR="1", COLUMNS="200", PYTHONUNBUFFERED="1", AGENTOS_HOME=str(home))
    return env


@pytest.fixture
def env(redis_url: str, namespace: str, tmp_path: Path) -> dict[str, str]:
    return {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }


def _run_cli(
    args: Sequence[str], env: dict[str, str], timeout: float, stdin: str | None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentos.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def cli(
    env: dict[str, str], *args: str, limit_s: float = TIMEOUT_S, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``agentos ARGS`` to completion in a worker thread (killed after ``limit_s``)."""
    return await anyio.to_thread.run_sync(partial(_run_cli, list(args), env, limit_s, stdin))


def show(proc: subprocess.CompletedProcess[str]) -> str:
    """What to print when an assertion about ``proc`` fails."""
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@contextmanager
def spawn(env: dict[str, str], log: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running ``agentos ARGS`` with output in ``log``; killed on exit if still up."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentos.cli", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


async def exited(proc: subprocess.Popen[bytes], within: float) -> int | None:
    """The exit code of ``proc`` once it exits, or None if it is still running after ``within``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc.returncode
        await anyio.sleep(0.05)
    return proc.poll()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


async def echo_state(store: Store, name: str) -> EchoState | None:
    raw = await store.load_state(name)
    return None if raw is None else msgspec.json.decode(raw, type=EchoState)


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
    stored = await store.agent_spec("counter")
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
    configured = await store.agent_spec("counter")
    assert configured is not None
    assert configured["spec"]["config"] == {"limit": 3}

    write(spec, COUNTER_YAML.format(limit=4))
    keys = await store.namespace_keys()
    dry = await cli(env, "apply", "--dry-run", "-f", str(spec))
    assert (dry.returncode, dry.stdout) == (
        0,
        "agent/counter configured (spec.config.limit) (dry run)\n",
    ), show(dry)
    assert await store.agent_spec("counter") == configured
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
    assert await store.inbox_depth("echo") == 0

    ok = await cli(env, "send", "echo", "x" * 10)
    assert ok.returncode == 0, show(ok)
    match = re.fullmatch(r"sent (\d+-\d+) to echo\n", ok.stdout)
    assert match, ok.stdout
    assert await store.inbox_depth("echo") == 1

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
    assert await store.inbox_depth("echo") == 1


async def test_send_dash_reads_the_message_from_stdin(env: dict[str, str], store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))

    proc = await cli(env, "send", "echo", "-", stdin="hello from stdin")

    assert proc.returncode == 0, show(proc)
    await store.ensure_inbox("echo")
    messages = await store.read_inbox("echo", "test-reader")
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
        assert (await store.leases(["echo"]))["echo"].owner == "d-term"
        daemons = await cli(env, "get", "daemons", "-o", "json")
        assert daemons.returncode == 0, show(daemons)
        (info,) = json.loads(daemons.stdout)
        assert (info["id"], info["pid"], info["engine"]) == ("d-term", proc.pid, "sim")

        proc.send_signal(signal.SIGTERM)
        code = await exited(proc, within=5)
        assert code == 0, log.read_text()

    assert await store.leases(["echo"]) == {}
    st = await store.status("echo")
    assert st["owner"] == ""
    assert st["phase"] in ("Stopped", "Hibernated")
    assert await store.daemons() == {}
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
            statuses = await store.statuses(names)
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
            statuses = await store.statuses(names)
            leases = await store.leases(names)
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
        events = [e.type for e in await store.events(target)]
        assert "Adopted" in events

        procs[survivor].send_signal(signal.SIGTERM)
        assert await exited(procs[survivor], within=8) == 0
    assert await store.leases(names) == {}


# ---------------------------------------------------------------------- embedded Redis


@contextmanager
def short_home(tmp_path: Path) -> Iterator[Path]:
    """An AGENTOS_HOME whose socket path fits in a unix socket address."""
    home = tmp_path / "home"
    if len(str(home / "valkey.sock")) <= 100:
        yield home
        return
    short = tempfile.mkdtemp(prefix="aos-", dir="/tmp")
    try:
        yield Path(short) / "home"
    finally:
        shutil.rmtree(short, ignore_errors=True)


async def test_up_starts_an_embedded_redis_when_none_is_configured(tmp_path: Path) -> None:
    spec = write(tmp_path / "counter.yaml", COUNTER_YAML.format(limit=1))
    with short_home(tmp_path) as home:
        env = base_env(home)
        assert "AGENTOS_REDIS_URL" not in env

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
        assert "embedded Redis at unix://" in up.stderr
        assert str(home / "valkey.sock") in up.stderr
        assert "agent/counter created" in up.stderr
        data = home / "data"
        assert any(p.name.startswith("appendonly") for p in data.iterdir()), list(data.iterdir())

        ps = await cli(env, "ps")
        assert ps.returncode == 1, show(ps)
        assert ps.stderr.startswith("error: no Redis to talk to")
        assert "`agentos up`" in ps.stderr
        assert "AGENTOS_REDIS_URL" in ps.stderr
        assert "Traceback" not in ps.stderr


async def test_send_wait_prints_the_result_and_tasks_lists_it(
    env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    with spawn(env, tmp_path / "daemon.log", "daemon", "--grace", "1s", "--lease-ttl", "2s"):
        sent = await cli(env, "send", "echo", "ping 42", "--key", "p-42", "--wait")
        assert (sent.returncode, sent.stdout.strip()) == (0, "ping 42"), show(sent)
        again = await cli(env, "send", "echo", "ping 42", "--key", "p-42", "--wait")
        assert again.returncode == 0, show(again)
        assert "duplicate" in again.stdout
        listed = await cli(env, "tasks", "echo", "-o", "json")
        table = await cli(env, "tasks")
    assert listed.returncode == 0, show(listed)
    rows = [r for r in json.loads(listed.stdout) if r["trigger"] == "inbox"]
    assert [(r["status"], r["payload"]) for r in rows] == [
        ("skipped", "ping 42"),
        ("succeeded", "ping 42"),
    ]
    assert table.returncode == 0, show(table)
    assert table.stdout.split()[:9] == [
        *("AGENT", "TASK", "TRIGGER", "STATUS", "VERDICT", "ATTEMPT", "AGE", "TOOK", "RESULT")
    ]
    assert "succeeded" in table.stdout


async def test_send_wait_prints_the_result_as_stored_and_o_json_the_whole_record(
    env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    # Text that rich would take for markup and emoji codes must come out untouched.
    body = '{"answer": [1, 2]} [bold]not bold[/bold] :smile:\nsecond line'
    with spawn(env, tmp_path / "daemon.log", "daemon", "--grace", "1s", "--lease-ttl", "2s"):
        raw = await cli(env, "send", "echo", body, "--key", "k-1", "--wait")
        record = await cli(env, "send", "echo", "again", "--wait", "-o", "json")
        table = await cli(env, "tasks", "echo")
        described = await cli(env, "describe", "agent", "echo")
        listed = await cli(env, "tasks", "echo", "-o", "json")
    assert (raw.returncode, raw.stdout) == (0, body + "\n"), show(raw)
    assert record.returncode == 0, show(record)
    task = json.loads(record.stdout)
    assert (task["agent"], task["status"], task["result"], task["trigger"]) == (
        "echo",
        "succeeded",
        "again",
        "inbox",
    )
    assert task["id"].startswith("m-")
    # Tables show a result on one line; the record keeps it whole.
    assert table.returncode == 0, show(table)
    (row,) = [line for line in table.stdout.splitlines() if "[bold]" in line]
    assert row.endswith('{"answer": [1, 2]} [bold]not bold[/bold] :smile: second line')
    assert described.returncode == 0, show(described)
    assert "[bold]not bold[/bold] :smile: second line" in described.stdout
    assert body in [r["result"] for r in json.loads(listed.stdout)]


LONG_NAME = "an-agent-with-a-name-long-enough-to-push-every-table-past-80-cols"[:63]


async def test_piped_tables_print_whole_columns(env: dict[str, str], store: Store) -> None:
    await apply(store, agent_doc(LONG_NAME, ECHO, triggers=[{"inbox": {}}]))
    day = time.strftime("%Y-%m-%d", time.gmtime())
    await store._r.hset(
        store.keys.usage(LONG_NAME, day),
        mapping={
            "active_s": 123456789.0,
            "tokens_in": 98765432109,
            "tokens_out": 12345678901,
            "tasks_succeeded": 7,
        },
    )
    narrow = {**env, "COLUMNS": "80"}
    usage = await cli(narrow, "usage")
    ps = await cli(narrow, "ps")

    assert usage.returncode == 0, show(usage)
    header, row, total_row = usage.stdout.splitlines()
    assert header.split() == [
        *("AGENT", "AGENT-HOURS", "TOKENS-IN", "TOKENS-OUT", "KV-GB-H", "TASKS", "FAILED"),
        *("COST", "COST/TASK"),
    ]
    assert row.split()[:4] == [LONG_NAME, "34293.5525", "98765432109", "12345678901"]
    assert len(row) > 80
    assert total_row.split()[0] == "total"
    assert ps.returncode == 0, show(ps)
    assert ps.stdout.splitlines()[0].split()[:2] == ["NAME", "PHASE"]
    assert ps.stdout.splitlines()[1].split()[0] == LONG_NAME
    for proc in (usage, ps):
        assert "…" not in proc.stdout
        assert all(line == line.rstrip() for line in proc.stdout.splitlines())


async def test_apply_refuses_an_alias_bomb_at_once_and_applies_nothing(
    env: dict[str, str], store: Store, tmp_path: Path
) -> None:
    rows = ['a0: &a0 "lol"'] + [
        f"a{n}: &a{n} [{','.join([f'*a{n - 1}'] * 9)}]" for n in range(1, 10)
    ]
    bomb = write(tmp_path / "bomb.yaml", "\n".join(rows) + "\n")
    started = time.monotonic()
    proc = await cli(env, "apply", "-f", str(bomb), limit_s=10)
    assert time.monotonic() - started < 10
    assert proc.returncode == 2, show(proc)
    assert proc.stderr.startswith(f"{bomb}:1: aliases expand this document to "), show(proc)
    assert "nothing was applied" in proc.stderr
    assert await store.namespace_keys() == []


@pytest.mark.parametrize("debug", [[], ["--debug"]])
async def test_a_password_in_the_query_string_is_never_printed(
    env: dict[str, str], debug: list[str]
) -> None:
    secret = {**env, "AGENTOS_REDIS_URL": "redis://127.0.0.1:1/0?password=hunter2"}
    proc = await cli(secret, *debug, "ps")

    assert proc.returncode == 1, show(proc)
    assert "hunter2" not in proc.stdout + proc.stderr
    assert "redis://127.0.0.1:1/0?password=***" in proc.stderr


# ---------------------------------------------------------------------- Ctrl-C on `up`

FLEET_YAML = """\
apiVersion: agentos/v1
kind: Agent
metadata: {name: echo}
spec:
  entrypoint: tests.fixture_agents:Echo
  triggers: [{inbox: {}}]
---
apiVersion: agentos/v1
kind: Agent
metadata: {name: counter}
spec:
  entrypoint: tests.fixture_agents:Counter
  config: {limit: 2}
---
apiVersion: agentos/v1
kind: Agent
metadata: {name: flusher}
spec:
  entrypoint: tests.fixture_agents:Flusher
"""
FLEET = ("echo", "counter", "flusher")

UP_ARGS = ("up", "--engine", "sim", "--grace", "2s", "--lease-ttl", "3s")

# Runs in the child: take the pty on stdin as the controlling terminal of the new
# session (so the pty's ^C reaches its foreground group), then become `agentos`.
TAKE_TTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'agentos.cli', *sys.argv[1:]])"
)


async def _fleet_is_up(home: Path) -> None:
    """Wait until `up` has applied the fleet and both agents are Idle."""

    async def socket() -> str | None:
        return embedded_url(home)

    url = await wait_until(socket, within=20, what="the embedded Redis socket")
    async with await Store.connect(url, namespace="agentos") as store:
        for name in FLEET:
            idle = partial(status_is, store, name, phase="Idle")
            await wait_until(idle, within=20, what=f"{name} Idle")


async def _assert_stopped_cleanly(home: Path) -> None:
    """The server is gone, and what the daemon wrote last is in it: the state the
    flusher saved half a second into the stop, no lease, no owner, no heartbeat."""
    assert embedded_url(home) is None
    server = EmbeddedRedis(home)
    url = server.start()
    try:
        async with await Store.connect(url, namespace="agentos") as store:
            raw = await store.load_state("flusher")
            assert raw is not None
            assert msgspec.json.decode(raw, type=FlushState).flushed_with == "shutdown"
            assert await store.leases(FLEET) == {}
            assert await store.daemons() == {}
            for name in FLEET:
                assert (await store.status(name))["owner"] == ""
    finally:
        server.stop()


def _spawn_session(args: list[str], home: Path, out: int | IO[bytes]) -> subprocess.Popen[bytes]:
    """``python ARGS`` in a session of its own, with ``out`` as stdio (stdin too if a pty).

    SIGINT to its process group is then what a terminal's Ctrl-C is: it reaches `up`
    and the embedded server `up` started, since that is in the group too.
    """
    is_tty = isinstance(out, int)
    env = {**base_env(home), "TERM": "xterm-256color"}
    if is_tty:
        env.pop("COLUMNS")  # the pty's own size
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdin=out if is_tty else subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT if not is_tty else out,
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    with suppress(ProcessLookupError):  # the server, if `up` left it behind
        os.killpg(proc.pid, signal.SIGKILL)


def _clean_stop_problems(output: str) -> list[str]:
    bad = ("error", "cannot reach Redis", "WARNING", "Traceback")
    return [word for word in bad if word in output]


async def test_ctrl_c_on_up_stops_cleanly(tmp_path: Path) -> None:
    spec = write(tmp_path / "fleet.yaml", FLEET_YAML)
    with short_home(tmp_path) as home:
        log = tmp_path / "up.log"
        with log.open("wb") as out:
            proc = _spawn_session(["-m", "agentos.cli", *UP_ARGS, "-f", str(spec)], home, out)
        try:
            await _fleet_is_up(home)
            os.killpg(proc.pid, signal.SIGINT)
            code = await exited(proc, within=20)
        finally:
            _kill_group(proc)
        output = log.read_text()
        assert code == 0, output
        assert "stopping agents" in output
        assert _clean_stop_problems(output) == [], output
        await _assert_stopped_cleanly(home)


async def test_ctrl_c_on_up_with_the_live_table_in_a_terminal_stops_cleanly(
    tmp_path: Path,
) -> None:
    spec = write(tmp_path / "fleet.yaml", FLEET_YAML)
    with short_home(tmp_path) as home:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        proc = _spawn_session(["-c", TAKE_TTY, *UP_ARGS, "-f", str(spec)], home, slave)
        os.close(slave)
        seen = bytearray()

        async def table_shown() -> bool:
            return b"counter" in seen

        async def drain() -> None:
            while True:
                await anyio.wait_readable(master)
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal is gone
                    return
                if not chunk:
                    return
                seen.extend(chunk)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain)
                await _fleet_is_up(home)
                await wait_until(table_shown, within=10, what="the live table")
                os.write(master, b"\x03")  # Ctrl-C, through the terminal's line discipline
                code = await exited(proc, within=20)
                tg.cancel_scope.cancel()
        finally:
            _kill_group(proc)
            os.close(master)
        output = seen.decode(errors="replace")
        assert code == 0, output
        assert "stopping agents" in output
        final = output.rsplit("stopping agents", 1)[1]
        assert "NAME" in final, output  # the last table was printed...
        assert "counter" in final, output  # ...which needed Redis after the daemon stopped
        assert _clean_stop_problems(output) == [], output
        await _assert_stopped_cleanly(home)
