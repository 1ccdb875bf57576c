"""Poison messages (issue 22, item 4), against a real Redis and Cluster: one that fails too
often becomes a dead letter and the agent goes on, an agent whose every message fails still
ends in a crash loop, a dropped message queued behind a running task never runs, and parked
heartbeats coalesce to one per trigger."""

from __future__ import annotations

from typing import Any

import pytest

from agentos.client import (
    Client,
)
from agentos.store import Store
from tests.helpers import agent_doc, apply, inbox_triggers, running_daemon, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]


# ---------------------------------------------------------------------- poison messages

PICKY = "tests.fixture_agents:Picky"
FAST_CRASH = {"crashLoopAfter": 2, "backoff": {"initial": "50ms", "max": "100ms"}}


async def test_a_poison_message_becomes_a_dead_letter_and_the_agent_goes_on(store: Store) -> None:
    await apply(
        store, agent_doc("picky", PICKY, triggers=inbox_triggers(), restartPolicy=FAST_CRASH)
    )
    client = Client(store)
    poison = await client.send("picky", "poison pill")
    good = await client.send("picky", "fine")
    async with running_daemon(store):
        done = await client.wait_task("picky", f"m-{good}", timeout_s=20)
        assert done["status"] == "succeeded"
        assert done["result"] == "fine"
        dead = await store.tasks.get("picky", f"m-{poison}")
        assert dead["status"] == "dead"
        assert "cannot digest" in dead["error"]
        status = await store.agents.status("picky")
        assert status["phase"] != "Failed"
    (letter,) = await client.dead_letters("picky")
    assert letter["body"] == "poison pill"
    assert await store.inbox.depth("picky") == 0


async def test_an_agent_whose_every_message_fails_still_ends_in_a_crash_loop(
    store: Store,
) -> None:
    await apply(
        store, agent_doc("picky", PICKY, triggers=inbox_triggers(), restartPolicy=FAST_CRASH)
    )
    client = Client(store)
    first = await client.send("picky", "poison one")
    second = await client.send("picky", "poison two")
    async with running_daemon(store):
        await wait_until(
            lambda: _phase_is(store, "picky", "Failed"), within=20, what="a crash loop"
        )
    status = await store.agents.status("picky")
    assert status["reason"] == "CrashLoop"
    dead = {letter["task"] for letter in await client.dead_letters("picky")}
    assert dead == {f"m-{first}", f"m-{second}"}


async def _phase_is(store: Store, name: str, phase: str) -> bool:
    return (await store.agents.status(name)).get("phase") == phase


async def test_a_dropped_message_queued_behind_a_running_task_never_runs(store: Store) -> None:
    from tests.fixture_agents import GATES

    GATES.clear()
    await apply(store, agent_doc("gated", "tests.fixture_agents:Gated", triggers=inbox_triggers()))
    client = Client(store)
    # Both sent before the daemon starts: one read gives the runner both, so the second
    # waits in the runner's queue while the first runs.
    first = await client.send("gated", "gate:one")
    poison = await client.send("gated", "poison")
    async with running_daemon(store) as daemon:
        await wait_until(
            lambda: _task_status(store, "gated", f"m-{first}", "running"), what="first running"
        )
        await wait_until(lambda: _queued(daemon, "gated", f"m-{poison}"), what="queued")
        assert await client.drop("gated", f"m-{poison}", by="ops") == "inbox"
        await wait_until(lambda: _queued(daemon, "gated", f"m-{poison}", gone=True), what="gone")
        GATES["one"].set()
        after = await client.send("gated", "after")
        assert (await client.wait_task("gated", f"m-{after}", timeout_s=20))["result"] == "after"
    assert (await store.tasks.get("gated", f"m-{poison}"))["status"] == "dropped"


async def _task_status(store: Store, name: str, task: str, status: str) -> bool:
    return (await store.tasks.get(name, task)).get("status") == status


async def _queued(daemon: Any, name: str, task: str, gone: bool = False) -> bool:
    runner = daemon.runners.get(name)
    queued = runner is not None and any(w.id == task for w in runner._queue)
    return not queued if gone else queued


async def test_parked_heartbeats_coalesce_to_one_per_trigger(store: Store) -> None:
    await apply(
        store,
        agent_doc(
            "beating",
            "tests.fixture_agents:DownstreamDown",
            triggers=[{"heartbeat": "50ms"}, {"heartbeat": "70ms"}],
        ),
    )

    fires: set[float] = set()
    most = 0

    async def ten_beats(daemon: Any) -> bool:
        nonlocal most
        runner = daemon.runners.get("beating")
        if runner is None:
            return False
        if runner.next_fire_at is not None:
            fires.add(runner.next_fire_at)
        most = max(most, sum(w.trigger == "heartbeat" for w in runner._queue))
        return len(fires) >= 10

    async with running_daemon(store) as daemon:
        await wait_until(lambda: ten_beats(daemon), within=20, what="ten heartbeats")
    assert await store.events.read("beating", count=100)  # its observes were parked
    assert most <= 2  # one per heartbeat trigger, not one per beat
