"""Virtual agents: a hibernated agent is held by no daemon and costs them nothing.

Released agents live in the due index only; each kind of trigger (a message, a wake, a
heartbeat, a schedule, a one-shot time, a wait's deadline) activates one with no daemon
holding it beforehand; schedules fire exactly once per due time across daemons and
restarts, and catch-up policies hold; a SIGKILLed daemon's active agents are activated
again elsewhere with nothing lost; a thousand hibernated agents cost Redis nothing.
Every test runs on one Redis and on a 3-master cluster.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from agentos.client import Client
from agentos.daemon import Daemon
from agentos.store import Store
from tests.cli_support import base_env, exited, spawn
from tests.fixture_agents import EchoState, RecordState, TickState
from tests.helpers import (
    ShiftedClock,
    agent_doc,
    apply,
    running_daemon,
    state_of,
    steady,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

RECORDER = "tests.fixture_agents:Recorder"
TICKER = "tests.fixture_agents:Ticker"
QUICK = {"hibernation": {"idleAfter": "150ms"}}
INBOX = {"inbox": {}}


async def released(store: Store, d: Daemon, name: str) -> bool:
    """Hibernated and held by nobody: no runner, no lease, in no held set, in the index."""
    status = await store.agents.status(name)
    return (
        status.get("phase") == "Hibernated"
        and not status.get("owner")
        and name not in d.runners
        and await store.leases.read([name]) == {}
        and (await store.waits.held_counts([d.id]))[d.id] == 0
        and name in await store.waits.due_scan()
    )


async def recorded(store: Store, name: str) -> list[str]:
    state = await state_of(store, name, RecordState)
    return state.triggers if isinstance(state, RecordState) else []


async def activations(store: Store, name: str) -> int:
    return sum(1 for e in await store.events.read(name) if e.type in ("Started", "Adopted"))


async def test_a_message_and_a_wake_activate_a_released_agent(store: Store) -> None:
    await apply(store, agent_doc("rec", RECORDER, triggers=[INBOX], **QUICK))
    client = Client(store)
    async with running_daemon(store) as d:
        await wait_until(lambda: released(store, d, "rec"), what="rec to be released")
        assert (await store.waits.due_scan())["rec"] == math.inf  # no time trigger
        await client.send("rec", "hello")
        await wait_until(lambda: _has(store, "rec", "message:hello"), what="the message task")
        await wait_until(lambda: released(store, d, "rec"), what="rec released again")
        await client.wake("rec")
        await wait_until(lambda: _has(store, "rec", "wake"), what="the wake task")
        await wait_until(lambda: released(store, d, "rec"), what="rec released after the wake")
        assert "woken" not in await store.agents.status("rec")
    assert await recorded(store, "rec") == ["message:hello", "wake"]
    assert await activations(store, "rec") == 3  # the start, the message, the wake


async def _has(store: Store, name: str, what: str) -> bool:
    return what in await recorded(store, name)


async def test_time_triggers_activate_released_agents(store: Store) -> None:
    at = datetime.fromtimestamp(time.time() + 2.5, tz=UTC).isoformat()
    await apply(
        store,
        agent_doc("beat", RECORDER, triggers=[{"heartbeat": "1500ms"}], **QUICK),
        agent_doc("tick", RECORDER, triggers=[{"every": "1500ms"}], **QUICK),
        agent_doc("once", RECORDER, triggers=[{"at": at}], **QUICK),
    )
    names = ["beat", "tick", "once"]
    async with running_daemon(store) as d:
        for name in names:
            await wait_until(lambda n=name: released(store, d, n), what=f"{name} released")
        due = await store.waits.due_scan()
        assert all(time.time() < due[n] < time.time() + 3 for n in names), due
        for name, trigger in zip(names, ("heartbeat", "every", "at"), strict=True):
            await wait_until(
                lambda n=name, t=trigger: _has(store, n, t), within=15, what=f"{name}'s {trigger}"
            )
        for name in names:
            await wait_until(lambda n=name: released(store, d, n), what=f"{name} released again")
    # The one-shot fired once and is done: it waits for nothing any more.
    assert (await store.waits.due_scan())["once"] == math.inf
    assert await recorded(store, "once") == ["at"]
    for name in names:
        assert await activations(store, name) >= 2, name


async def test_a_wait_deadline_activates_a_released_agent(store: Store, tmp_path: Path) -> None:
    log = tmp_path / "log"
    doc = agent_doc(
        "sleeper", "tests.wait_agents:Sleeper", triggers=[INBOX], config={"log": str(log)}
    )
    await apply(store, doc)
    async with running_daemon(store) as d:
        await Client(store).send("sleeper", "1500ms")

        async def waiting() -> bool:
            status = await store.agents.status("sleeper")
            return status.get("phase") == "Waiting" and "sleeper" not in d.runners

        await wait_until(waiting, what="the sleeper to wait, released")
        assert await store.leases.read(["sleeper"]) == {}

        async def awake() -> bool:
            return "awake" in log.read_text()

        await wait_until(awake, what="the deadline to wake it")
    # The code before the wait runs again on resume (it was not recorded), after it once.
    assert log.read_text().splitlines() == ["sleeping", "sleeping", "awake"]


async def test_a_released_schedule_fires_once_per_due_time_across_daemons_and_a_restart(
    store: Store,
) -> None:
    await apply(store, agent_doc("ticker", TICKER, triggers=[{"every": "700ms"}], **QUICK))

    async def fired(n: int) -> bool:
        state = await state_of(store, "ticker", TickState)
        return isinstance(state, TickState) and len(state.fires) >= n

    async with running_daemon(store, daemon_id="a"), running_daemon(store, daemon_id="b"):
        await wait_until(lambda: fired(3), what="three fires")  # either daemon activates it
    async with running_daemon(store, daemon_id="c"):  # a restart: one daemon, then two
        await wait_until(lambda: fired(5), what="two more fires")
    async with running_daemon(store, daemon_id="a2"), running_daemon(store, daemon_id="b2"):
        await wait_until(lambda: fired(8), what="three more fires")
    tasks = await store.tasks.recent("ticker", count=100)
    ran = [t for t in tasks if t.get("trigger") == "every"]
    scheduled = sorted(float(t["scheduled_at"]) for t in ran)
    assert len(scheduled) == len(set(scheduled)), "a fire ran twice"
    assert len(scheduled) >= 8
    gaps = [b - a for a, b in itertools.pairwise(scheduled)]
    assert all(0.6 < g < 1.6 for g in gaps), gaps  # none skipped, none doubled
    assert all(t["status"] == "succeeded" for t in ran)
    state = await state_of(store, "ticker", TickState)
    assert isinstance(state, TickState)
    assert len(state.fires) == len(ran)
    assert not any(e.type == "MissedFires" for e in await store.events.read("ticker"))
    # Released between fires: far more activations than daemon sessions.
    assert await activations(store, "ticker") >= len(ran) // 2


@pytest.mark.parametrize(("policy", "runs"), [("skip", 0), ("one", 1), ("all", 3)])
async def test_catch_up_holds_for_a_released_agent(store: Store, policy: str, runs: int) -> None:
    trigger = {"every": "1s", "catchUp": policy}
    await apply(store, agent_doc("ticker", TICKER, triggers=[trigger], **QUICK))

    async def fires() -> list[str]:
        state = await state_of(store, "ticker", TickState)
        return state.fires if isinstance(state, TickState) else []

    async with running_daemon(store) as d:
        await wait_until(fires, what="a first fire")
        await wait_until(lambda: released(store, d, "ticker"), what="the ticker released")
    before = len(await fires())
    stored = await store.conn.r.hget(store.keys.schedule("ticker"), "0")
    assert stored is not None
    # Three fire times (that one, a second and two seconds later) pass with no daemon at
    # all: the next daemon's clock starts halfway to the fourth, and stands still until
    # it has counted them, so the count is exact.
    clock = ShiftedClock()
    clock.hold(float(stored) + 2.5)
    async with running_daemon(store, clock=clock):
        await wait_until(
            lambda: _event(store, "ticker", "MissedFires"), what="the missed fires event"
        )
        clock.resume()  # the next regular fire is half a second away

        async def caught_up() -> bool:
            return len(await fires()) - before >= runs

        await wait_until(caught_up, what="the catch-up runs")
        after = len(await fires())
    (missed,) = [e for e in await store.events.read("ticker") if e.type == "MissedFires"]
    assert missed.reason == f"catchUp: {policy}"
    assert "3 fire(s)" in missed.message
    assert after - before in (runs, runs + 1) if policy != "all" else after - before >= 3


async def _event(store: Store, name: str, type_: str) -> bool:
    return any(e.type == type_ for e in await store.events.read(name))


@pytest.mark.e2e
async def test_a_killed_daemons_active_agents_are_activated_elsewhere(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    names = [f"echo-{i:02d}" for i in range(40)]
    never = {"hibernation": "never"}
    await apply(
        store,
        *(agent_doc(n, "tests.fixture_agents:Echo", triggers=[INBOX], **never) for n in names),
    )
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    fast = ("--lease-ttl", "3s", "--grace", "2s")
    client = Client(store)
    with (
        spawn(env, tmp_path / "d0.log", "daemon", "--id", "d0", *fast) as d0,
        spawn(env, tmp_path / "d1.log", "daemon", "--id", "d1", *fast) as d1,
    ):

        async def split() -> dict[str, int] | None:
            counts = await store.waits.held_counts(["d0", "d1"])
            return counts if sum(counts.values()) == 40 and min(counts.values()) >= 15 else None

        await wait_until(split, within=30, what="40 agents shared by the two daemons")

        async def settled() -> dict[str, object] | None:
            # The share settled, no handover under way: every agent leased, by the
            # daemon its status names, and still split.
            leases = await store.leases.read(names)
            statuses = await store.agents.statuses(names)
            if len(leases) != 40 or await split() is None:
                return None
            same = all(statuses[n].get("owner") == leases[n].owner for n in names)
            return dict(leases) if same else None

        await wait_until(settled, within=30, what="the share to settle")
        leases = await store.leases.read(names)
        victim_agents = [n for n in names if leases[n].owner == "d1"]
        d1.send_signal(signal.SIGKILL)
        assert await exited(d1, within=10) is not None
        sent = [(n, await client.send(n, f"after {n}", key=f"k-{n}")) for n in names]

        async def taken_over() -> bool:
            leases = await store.leases.read(names)
            return len(leases) == 40 and {i.owner for i in leases.values()} == {"d0"}

        await wait_until(taken_over, within=30, what="d0 to hold all 40")

        async def handled() -> bool:
            for name in names:
                raw = await store.agents.load_state(name)
                bodies = [] if raw is None else msgspec.json.decode(raw, type=EchoState).bodies
                if f"after {name}" not in bodies:
                    return False
            return True

        await wait_until(handled, within=30, what="every message to be handled")
        lost = [e for e in await store.events.read(None) if e.type == "DaemonLost"]
        assert lost
        assert lost[0].reason == "d1"
        assert await store.waits.holders() == {"d0"}
        d0.send_signal(signal.SIGTERM)
        assert await exited(d0, within=30) == 0, (tmp_path / "d0.log").read_text()
    for name, msg_id in sent:
        record = await store.tasks.get(name, f"m-{msg_id}")
        assert record.get("status") == "succeeded", (name, record)
    for name in victim_agents:  # adopted from the dead daemon
        assert any(e.type == "Adopted" for e in await store.events.read(name)), name


async def test_a_thousand_hibernated_agents_cost_redis_nothing(store: Store) -> None:
    names = [f"h-{i:04d}" for i in range(1000)]
    await apply(
        store,
        *(agent_doc(n, RECORDER, triggers=[{"heartbeat": "1h"}, INBOX], **QUICK) for n in names),
    )
    async with running_daemon(store, lease_ttl_s=15.0, grace_s=5.0, reconcile_interval_s=1.0) as d:

        async def all_released() -> bool:
            phases = {st.get("phase") for st in (await store.agents.statuses(names)).values()}
            counts = await store.waits.held_counts([d.id])
            return phases == {"Hibernated"} and not d.runners and counts[d.id] == 0

        await wait_until(all_released, within=240, what="every agent to be released")
        assert await store.waits.due_count() == 1000
        keys = await store.namespace_keys()
        sample = {f"{{{n}}}" for n in names[::20]}
        per_agent = [k for k in keys if k.split(":")[1] in sample]

        async def settled() -> bool:
            # The stragglers' writes and the last lease renewals have passed: no sampled
            # agent's key was touched for a second (OBJECT IDLETIME touches nothing).
            return min([await store.key_idle_s(k) for k in per_agent], default=0) >= 1

        await wait_until(settled, within=30, what="the agents' keys to settle", every=0.2)
        before = await store.command_calls()
        await steady(lambda: not d.runners, for_s=10, what="no agent activated")
        after = await store.command_calls()
        idle = [await store.key_idle_s(k) for k in per_agent]
    calls = {c: after.get(c, 0) - before.get(c, 0) for c in after}
    total = sum(calls.values()) - calls.get("info", 0)
    # The daemon's fleet-level work (heartbeat, signals, quota refresh, the due index's
    # head) goes on: about 150 commands in 10 s, and 10 more per signal group (one on a
    # server, one per shard on a cluster: four). Nothing scales with the released agents:
    # one command per agent would be 1000 more.
    assert total < 250, json.dumps({c: n for c, n in calls.items() if n})
    assert per_agent
    assert min(idle) >= 10, "a released agent's key was touched while it slept"
    assert d.runners == {}


# ------------------------------------------------------------------ the store's side


async def test_a_send_makes_a_released_agent_due_and_only_a_released_one(store: Store) -> None:
    await apply(store, agent_doc("x", RECORDER, triggers=[INBOX]))
    k = store.keys
    await store.conn.r.zrem(k.due(k.due_shard("x")), "x")  # as if activated
    token = await store.leases.acquire("x", "dA", 5000)
    await store.inbox.send("x", "held", send_id="s1")
    assert "x" not in await store.waits.due_scan()  # held: its daemon is signalled instead
    assert await store.leases.release("x", f"dA|{token}")
    before = time.time()
    await store.inbox.send("x", "released", send_id="s2")
    assert before <= (await store.waits.due_scan())["x"] <= time.time()


async def test_a_release_after_an_unread_message_leaves_the_agent_due_now(store: Store) -> None:
    await apply(store, agent_doc("y", RECORDER, triggers=[INBOX]))
    k = store.keys
    await store.conn.r.zrem(k.due(k.due_shard("y")), "y")
    token = await store.leases.acquire("y", "dA", 5000)
    await store.waits.held_add("dA", ["y"])
    await store.inbox.ensure("y")
    await store.inbox.send("y", "late", send_id="s1")  # came in before the release, unread
    assert await store.leases.release("y", f"dA|{token}")
    now = time.time()
    at = await store.waits.due_release("y", "dA", now + 3600, now=now)
    assert at == now
    assert (await store.waits.due_scan())["y"] == now
    assert await store.waits.held_counts(["dA"]) == {"dA": 0}


async def test_claims_and_a_dead_daemons_held_set(store: Store) -> None:
    await apply(store, agent_doc("z", RECORDER), agent_doc("w", RECORDER))
    now = time.time()
    assert sorted(await store.waits.due_claim(["z", "w"], now=now + 1, claim_s=30)) == ["w", "z"]
    assert await store.waits.due_claim(["z"], now=now + 1, claim_s=30) == []  # claimed already
    await store.waits.due_now(["w"], now=now + 2)  # a message came meanwhile: the claim moves
    await store.waits.due_unclaim({"z": now + 31, "w": now + 31})
    due = await store.waits.due_scan()
    assert "z" not in due
    assert due["w"] == now + 2
    await store.waits.held_add("gone", ["z"])
    assert "gone" in await store.waits.holders()
    assert await store.waits.recover_held("gone", now=now) == ["z"]
    assert (await store.waits.due_scan())["z"] == now
    assert "gone" not in await store.waits.holders()


async def test_the_head_of_the_index_is_read_in_small_pieces(store: Store) -> None:
    k = store.keys
    names = [f"q{i}" for i in range(400)]
    shard = k.due_shard(names[0])
    same = [n for n in names if k.due_shard(n) == shard][:12]
    now = time.time()
    await store.conn.r.zadd(k.due(shard), {n: now - 20 + i for i, n in enumerate(same)})
    await store.conn.r.zadd(k.due(shard), {"later": now + 3600})
    peek = await store.waits.due_head(4)  # the earliest four of each shard, due or not
    assert [n for n in peek if n in same] == same[:4]
    due = await store.waits.due_head(4, now=now)  # a full shard is read again for its due ones
    assert sorted(n for n in due if n in same) == sorted(same)
    assert "later" not in due
