"""The `agentos` command as a person at a terminal meets it: an embedded Redis for a first
`up`, the results `send --wait` prints, whole table columns, secrets never printed, and
Ctrl-C on `up` (with and without its live table in a terminal) stopping cleanly. Real
subprocesses, as in test_cli.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import IO

import anyio
import anyio.to_thread
import msgspec
import pytest

from agentos.store import Store
from agentos.store.embedded import EmbeddedRedis, embedded_url
from tests.cli_support import (
    ROOT,
    base_env,
    cli,
    exited,
    show,
    spawn,
    write,
)
from tests.fixture_agents import FlushState
from tests.helpers import agent_doc, apply, status_is, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

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
    await store.conn.r.hset(
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
            raw = await store.agents.load_state("flusher")
            assert raw is not None
            assert msgspec.json.decode(raw, type=FlushState).flushed_with == "shutdown"
            assert await store.leases.read(FLEET) == {}
            assert await store.heartbeats.daemons() == {}
            for name in FLEET:
                assert (await store.agents.status(name))["owner"] == ""
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
