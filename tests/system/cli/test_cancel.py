"""`agentos tasks cancel`: a running, queued or waiting task ends cancelled, with an
event; it is not retried, it is not a crash, and the agent goes on with its next task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agentos.client import Client, NotFound, TaskOver
from agentos.store import Store
from tests.cli_support import cli, show
from tests.fixture_agents import GATES
from tests.helpers import agent_doc, apply, running_daemon, wait_until

pytestmark = [pytest.mark.anyio]

INBOX = [{"inbox": {}}]


async def _status(store: Store, name: str, task: str, want: str) -> dict[str, str] | None:
    record = await store.tasks.get(name, task)
    return record if record.get("status") == want else None


async def _events(store: Store, name: str, type_: str) -> list[Any]:
    return [e for e in await store.events.read(name) if e.type == type_]


async def test_a_running_task_is_cut_short_and_the_agent_goes_on(store: Store) -> None:
    GATES.clear()
    await apply(store, agent_doc("gated", "tests.fixture_agents:Gated", triggers=INBOX))
    client = Client(store)
    stuck = await client.send("gated", "gate:never")
    queued = await client.send("gated", "after")
    async with running_daemon(store) as daemon:
        await wait_until(lambda: _status(store, "gated", f"m-{stuck}", "running"), what="running")
        assert await client.cancel_task("gated", f"m-{stuck}", by="ops") == "running"
        record = await wait_until(
            lambda: _status(store, "gated", f"m-{stuck}", "cancelled"), what="cancelled"
        )
        assert record["result"] == "cancelled by ops"
        # The next message runs; the cancel counted as no failure.
        done = await client.wait_task("gated", f"m-{queued}", timeout_s=20)
        assert done["result"] == "after"
        assert daemon.runners["gated"].consecutive_failures == 0
    events = await _events(store, "gated", "TaskCancelled")
    assert [e.message for e in events] == [f"task m-{stuck} cancelled by ops"]
    assert (await store.agents.status("gated"))["phase"] != "Failed"
    assert await store.inbox.depth("gated") == 0  # acknowledged: never delivered again


async def test_a_queued_message_is_removed_before_it_runs(store: Store) -> None:
    GATES.clear()
    await apply(store, agent_doc("gated", "tests.fixture_agents:Gated", triggers=INBOX))
    client = Client(store)
    first = await client.send("gated", "gate:one")
    second = await client.send("gated", "never run me")
    async with running_daemon(store):
        await wait_until(lambda: _status(store, "gated", f"m-{first}", "running"), what="running")
        assert await client.cancel_task("gated", f"m-{second}", by="ops") == "inbox"
        GATES["one"].set()
        await client.wait_task("gated", f"m-{first}", timeout_s=20)
        third = await client.send("gated", "third")
        assert (await client.wait_task("gated", f"m-{third}", timeout_s=20))["result"] == "third"
    record = await store.tasks.get("gated", f"m-{second}")
    assert record["status"] == "cancelled"
    assert record.get("steps") in (None, "", "0")  # it never ran


async def test_a_waiting_task_ends_without_an_answer(store: Store, tmp_path: Path) -> None:
    log = tmp_path / "log"
    await apply(
        store,
        agent_doc("asker", "tests.wait_agents:Approver", triggers=INBOX, config={"log": str(log)}),
    )
    client = Client(store)
    sent = await client.send("asker", "deploy")
    task = f"m-{sent}"
    async with running_daemon(store):
        await wait_until(lambda: _status(store, "asker", task, "waiting"), what="waiting")
        assert await client.cancel_task("asker", task, by="ops") == "waiting"
        await wait_until(lambda: _status(store, "asker", task, "cancelled"), within=20)
    assert await client.pending("asker") == []
    # The agent's code never went past its question.
    assert log.read_text().splitlines() == ["before deploy"]
    with pytest.raises(TaskOver, match="over already \\(cancelled\\)"):
        await client.cancel_task("asker", task, by="ops")


async def test_unknown_or_finished_tasks_are_refused_and_change_nothing(store: Store) -> None:
    await apply(store, agent_doc("echo", "tests.fixture_agents:Echo", triggers=INBOX))
    client = Client(store)
    sent = await client.send("echo", "hello")
    async with running_daemon(store):
        await client.wait_task("echo", f"m-{sent}", timeout_s=20)
    with pytest.raises(TaskOver, match="succeeded"):
        await client.cancel_task("echo", f"m-{sent}", by="ops")
    with pytest.raises(NotFound, match="no task m-nope"):
        await client.cancel_task("echo", "m-nope", by="ops")
    with pytest.raises(NotFound, match="not found"):
        await client.cancel_task("ghost", "m-1", by="ops")
    assert (await store.tasks.get("echo", f"m-{sent}"))["status"] == "succeeded"
    assert await _events(store, "echo", "TaskCancelled") == []


async def test_cli_tasks_cancel(store: Store, env: dict[str, str]) -> None:
    GATES.clear()
    await apply(store, agent_doc("gated", "tests.fixture_agents:Gated", triggers=INBOX))
    client = Client(store)
    stuck = await client.send("gated", "gate:never")
    async with running_daemon(store):
        await wait_until(lambda: _status(store, "gated", f"m-{stuck}", "running"), what="running")
        proc = await cli(env, "tasks", "cancel", "gated", f"m-{stuck}", "--as", "alice")
        assert proc.returncode == 0, show(proc)
        assert proc.stdout.strip() == f"task m-{stuck} of gated cancelled", show(proc)
        again = await cli(env, "tasks", "cancel", "gated", f"m-{stuck}", "-o", "json")
        assert again.returncode == 1, show(again)
        assert "over already (cancelled)" in again.stderr, show(again)
        missing = await cli(env, "tasks", "cancel", "gated", "m-0-1")
        assert missing.returncode == 1, show(missing)
        assert "no task m-0-1" in missing.stderr, show(missing)
        usage = await cli(env, "tasks", "cancel", "gated")
        assert usage.returncode == 2, show(usage)
    record = await store.tasks.get("gated", f"m-{stuck}")
    assert record["result"] == "cancelled by alice"


async def test_a_task_cancelled_during_its_crash_backoff_never_runs_again(store: Store) -> None:
    slow = {"backoff": {"initial": "2s", "max": "2s"}, "crashLoopAfter": 5}
    await apply(
        store,
        agent_doc("picky", "tests.fixture_agents:Picky", triggers=INBOX, restartPolicy=slow),
    )
    client = Client(store)
    poison = await client.send("picky", "poison pill")
    task = f"m-{poison}"
    async with running_daemon(store):
        await wait_until(lambda: _backing_off(store), what="the crash backoff")
        assert await client.cancel_task("picky", task, by="ops") == "inbox"
        after = await client.send("picky", "fine")
        assert (await client.wait_task("picky", f"m-{after}", timeout_s=20))["result"] == "fine"
    record = await store.tasks.get("picky", task)
    assert record["status"] == "cancelled", record
    assert record["attempt"] == "1"  # the retry never ran
    assert [e.type for e in await store.events.read("picky")].count("TaskCancelled") == 1


async def _backing_off(store: Store) -> bool:
    return (await store.agents.status("picky")).get("reason") == "BackOff"
