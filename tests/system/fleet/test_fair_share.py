"""Several daemons share the fleet fairly: 300 agents spread over three daemon processes,
a draining daemon hands its agents to the others with nothing lost, and a daemon that
joins takes idle agents over without cutting a running task short."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import anyio
import msgspec
import pytest

from agentos.client import Client
from agentos.core.placement import share_limit
from agentos.store import Store
from tests.cli_support import base_env, exited, spawn
from tests.fixture_agents import HOLD, EchoState
from tests.helpers import agent_doc, apply, running_daemon, status_is, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

ECHO = "tests.fixture_agents:Echo"
INBOX = {"triggers": [{"inbox": {}}]}


async def _owners(store: Store, names: list[str]) -> Counter[str]:
    """How many of ``names`` each daemon holds a lease on ("" for the unleased)."""
    leases = await store.leases.read(names)
    return Counter(leases[n].owner if n in leases else "" for n in names)


class _NotYet(Counter[str]):
    """Owners that do not match yet; falsy, but shown in the timeout message."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:  # Counter's own shows a falsy one as empty
        return f"owners {dict(self)}"


async def _bodies(store: Store, names: list[str]) -> dict[str, list[str]]:
    out = {}
    for name in names:
        raw = await store.agents.load_state(name)
        out[name] = [] if raw is None else msgspec.json.decode(raw, type=EchoState).bodies
    return out


@pytest.mark.e2e
# Three daemon processes and 300 agents on a loaded machine: its own waits (45 s to
# spread, 30 s to drain, 60 s to take over) say what did not happen, not the default.
@pytest.mark.timeout(150)
async def test_three_daemons_split_300_agents_and_a_drained_one_hands_its_share_over(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    names = [f"echo-{i:03d}" for i in range(300)]
    await apply(store, *(agent_doc(n, ECHO, **INBOX) for n in names))
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    fast = ("--lease-ttl", "6s", "--grace", "2s")
    client = Client(store)
    ids = ("d0", "d1", "d2")
    logs = {d: tmp_path / f"{d}.log" for d in ids}
    with (
        spawn(env, logs["d0"], "daemon", "--id", "d0", *fast) as d0,
        spawn(env, logs["d1"], "daemon", "--id", "d1", *fast) as d1,
        spawn(env, logs["d2"], "daemon", "--id", "d2", *fast) as d2,
    ):
        procs = {"d0": d0, "d1": d1, "d2": d2}

        async def spread() -> Counter[str] | None:
            owners = await _owners(store, names)
            fair = set(owners) == set(ids) and all(80 <= owners[d] <= 120 for d in ids)
            return owners if fair and max(owners.values()) <= share_limit(300, 3) else None

        # Each takes at most its share of what is held and due (the first one up may
        # take more while it is alone); a daemon over its share hands agents over until
        # each holds no more than its share plus the margin.
        await wait_until(spread, within=45, what="300 agents spread over 3 daemons")
        sent: list[tuple[str, str]] = []
        for name in names:
            sent.append((name, await client.send(name, f"before {name}", key=f"b-{name}")))

        victim, survivors = "d1", ("d0", "d2")
        leases = await store.leases.read(names)
        handed = [n for n in names if n in leases and leases[n].owner == victim]
        procs[victim].send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return bool((await store.heartbeats.daemons()).get(victim, {}).get("draining"))

        # Messages keep coming while the victim drains. Sent once it says it drains: one
        # that reached its agent before the stop would be run by the victim, which then
        # lets the agent go hibernated (nothing left to do, so no survivor starts it).
        await wait_until(draining, within=30, what="the victim to drain")
        for name in names:
            sent.append((name, await client.send(name, f"during {name}", key=f"d-{name}")))
        assert await exited(procs[victim], within=30) == 0, logs[victim].read_text()

        async def taken_over() -> Counter[str] | _NotYet:
            owners = await _owners(store, names)
            return owners if set(owners) == set(survivors) else _NotYet(owners)

        owners = await wait_until(taken_over, within=60, what="the survivors to hold all 300")
        assert sum(owners.values()) == 300
        assert all(owners[d] <= 300 for d in survivors)

        async def all_handled() -> bool:
            bodies = await _bodies(store, names)
            return all(len(b) >= 2 for b in bodies.values())

        await wait_until(all_handled, within=30, what="every message to be handled")
        for d in survivors:
            procs[d].send_signal(signal.SIGTERM)
        for d in survivors:
            assert await exited(procs[d], within=30) == 0, logs[d].read_text()

    bodies = await _bodies(store, names)
    for name in names:
        assert sorted(bodies[name]) == [f"before {name}", f"during {name}"], name
    for name, msg_id in sent:
        record = await store.tasks.get(name, f"m-{msg_id}")
        assert record.get("status") == "succeeded", (name, record)
        assert await store.inbox.depth(name) == 0
    # The victim's agents were let go of gracefully (state saved, lease released) and
    # started by a survivor.
    assert 80 <= len(handed) <= 120
    for name in handed:
        events = await store.events.read(name)
        stop = [e for e in events if e.type == "Stopped" and e.daemon == victim][-1]
        assert stop.reason == "shutdown"
        later = events[events.index(stop) + 1 :]
        assert any(e.type == "Started" and e.daemon in survivors for e in later), events
    for d in ids:
        text = logs[d].read_text()
        assert "Traceback" not in text, text
        assert "supervisor crashed" not in text, text


async def test_a_joining_daemon_takes_idle_agents_over_and_leaves_a_running_task_alone(
    store: Store,
) -> None:
    names = [f"echo-{i:02d}" for i in range(20)]
    holder = "holder"
    # The holder has the lowest priority: first in line to be handed over, but busy.
    await apply(
        store,
        *(agent_doc(n, ECHO, **INBOX) for n in names),
        agent_doc(holder, "tests.fixture_agents:Holder", priority=1, **INBOX),
    )
    everyone = [*names, holder]
    client = Client(store)
    HOLD.pop(holder, None)
    async with running_daemon(store, daemon_id="first") as first:

        async def all_first() -> bool:
            return (await _owners(store, everyone))["first"] == 21

        await wait_until(all_first, within=20, what="the first daemon to take all 21")
        hold_id = await client.send(holder, "hold")
        await wait_until(
            lambda: status_is(store, holder, phase="Running"), what="the holder's task to run"
        )
        runner = first.runners[holder]
        limit = share_limit(21, 2)
        async with running_daemon(store, daemon_id="second"):

            async def split() -> Counter[str] | None:
                owners = await _owners(store, everyone)
                even = owners["first"] <= limit and owners["second"] >= 21 - limit
                return owners if even and sum(owners.values()) == 21 else None

            await wait_until(split, within=20, what="the second daemon to take some over")
            # The running task was not interrupted: same runner, still in its task.
            assert first.runners.get(holder) is runner
            assert runner.busy
            assert (await store.leases.read([holder]))[holder].owner == "first"
            # Moved: the second daemon holds the lease (its runner may still be opening).
            leases = await store.leases.read(names)
            moved = [n for n in names if n in leases and leases[n].owner == "second"]
            assert moved
            for name in moved:
                stopped = [e for e in await store.events.read(name) if e.type == "Stopped"]
                assert stopped
                assert stopped[-1].reason == "rebalance", stopped
                assert "fair share" in stopped[-1].message
            fleet = [e for e in await client.events() if e.type == "Rebalancing"]
            assert fleet
            assert "first hands over" in fleet[0].message
            HOLD.setdefault(holder, anyio.Event()).set()
            await wait_until(
                lambda: status_is(store, holder, tasks_succeeded="1"), what="the held task"
            )
            sent = [(n, await client.send(n, f"after {n}")) for n in names]

            async def answered() -> bool:
                bodies = await _bodies(store, names)
                return all(bodies[n] == [f"after {n}"] for n in names)

            await wait_until(answered, within=20, what="every agent to answer once")
    record = await store.tasks.get(holder, f"m-{hold_id}")
    assert record["status"] == "succeeded"
    assert not [e for e in await store.events.read(holder) if e.reason == "rebalance"], [
        e.message for e in await client.events(count=500) if e.type == "Rebalancing"
    ]
    for name, msg_id in sent:
        assert (await store.tasks.get(name, f"m-{msg_id}"))["status"] == "succeeded"
