"""Durable tasks: records, idempotency keys, schedules that survive downtime, overlaps."""

from __future__ import annotations

import msgspec
import pytest

from agentos.client import Client
from agentos.store import Store
from tests.fixture_agents import HEARTBEAT_CHECKS, EchoState, TickState, WatchState
from tests.helpers import ShiftedClock, agent_doc, apply, running_daemon, status_is, wait_until

pytestmark = pytest.mark.anyio

ECHO = "tests.fixture_agents:Echo"
TICKER = "tests.fixture_agents:Ticker"


async def decode(store: Store, name: str, type_: type) -> object:
    raw = await store.agents.load_state(name)
    return None if raw is None else msgspec.json.decode(raw, type=type_)


async def test_every_message_gets_a_task_record_and_duplicates_are_skipped(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    client = Client(store)
    async with running_daemon(store):
        first = await client.send("echo", "pay invoice 7", key="invoice-7")
        done = await client.wait_task("echo", f"m-{first}", timeout_s=10)
        again = await client.send("echo", "pay invoice 7", key="invoice-7")
        skipped = await client.wait_task("echo", f"m-{again}", timeout_s=10)
    assert done["status"] == "succeeded"
    assert done["trigger"] == "inbox"
    assert done["attempt"] == "1"
    assert done["result"] == "pay invoice 7"
    assert done["key"] == "invoice-7"
    assert float(done["finished_at"]) >= float(done["started_at"]) >= float(done["created_at"])
    assert skipped["status"] == "skipped"
    assert "duplicate" in skipped["result"]
    state = await decode(store, "echo", EchoState)
    assert isinstance(state, EchoState)
    assert state.bodies == ["pay invoice 7"]
    assert await store.inbox.depth("echo") == 0
    rows = await client.tasks("echo")
    assert [r["status"] for r in rows if r["trigger"] == "inbox"] == ["skipped", "succeeded"]


async def test_a_failing_task_is_retried_then_recorded_as_failed(store: Store) -> None:
    await apply(
        store,
        agent_doc(
            "crasher",
            "tests.fixture_agents:Crasher",
            restartPolicy={"backoff": {"initial": "20ms", "max": "40ms"}, "crashLoopAfter": 2},
        ),
    )
    async with running_daemon(store):
        await wait_until(lambda: status_is(store, "crasher", phase="Failed"))
    (record,) = await store.tasks.recent("crasher")
    assert record["status"] == "failed"
    assert record["attempt"] == "2"
    assert "boom" in record["error"]


@pytest.mark.parametrize(("policy", "runs"), [("skip", 0), ("one", 1), ("all", 3)])
async def test_fires_missed_while_no_daemon_ran_follow_catch_up(
    store: Store, policy: str, runs: int
) -> None:
    trigger = {"every": "1s", "catchUp": policy}
    await apply(store, agent_doc("ticker", TICKER, triggers=[trigger]))

    async def fires() -> list[str]:
        state = await decode(store, "ticker", TickState)
        return state.fires if isinstance(state, TickState) else []

    async with running_daemon(store):
        await wait_until(fires, what="a first fire")
    before = len(await fires())
    stored = await store.conn.r.hget(store.keys.schedule("ticker"), "0")
    assert stored is not None
    # Three fire times (the stored next one, a second and two seconds later) pass with no
    # daemon: the next daemon's clock starts halfway to the fourth, and stands still
    # until it has counted them, so the count is exact.
    clock = ShiftedClock()
    clock.hold(float(stored) + 2.5)
    async with running_daemon(store, clock=clock):
        await wait_until(
            lambda: _has_event(store, "ticker", "MissedFires"), what="the missed fires event"
        )
        clock.resume()  # the next regular fire is half a second away

        async def caught_up() -> bool:
            return len(await fires()) - before >= runs

        await wait_until(caught_up, what="the catch-up runs")
        after = len(await fires())
    missed = [e for e in await store.events.read("ticker") if e.type == "MissedFires"]
    assert missed[0].reason == f"catchUp: {policy}"
    assert "3 fire(s)" in missed[0].message
    assert after - before in (runs, runs + 1) if policy != "all" else after - before >= 3


async def _has_event(store: Store, name: str, type_: str) -> bool:
    return any(e.type == type_ for e in await store.events.read(name))


async def test_a_restarted_daemon_neither_skips_nor_repeats_a_schedule(store: Store) -> None:
    await apply(store, agent_doc("ticker", TICKER, triggers=[{"every": "500ms"}]))

    async def fired(n: int) -> bool:
        state = await decode(store, "ticker", TickState)
        return isinstance(state, TickState) and len(state.fires) >= n

    async with running_daemon(store):
        await wait_until(lambda: fired(2), what="two fires before the restart")
    state = await decode(store, "ticker", TickState)
    assert isinstance(state, TickState)
    first = len(state.fires)
    async with running_daemon(store):
        await wait_until(lambda: fired(first + 2), what="two fires after the restart")
    state = await decode(store, "ticker", TickState)
    assert isinstance(state, TickState)
    tasks = await store.tasks.recent("ticker", count=50)
    scheduled = sorted(float(t["scheduled_at"]) for t in tasks if t.get("scheduled_at"))
    assert len(scheduled) == len(set(scheduled))  # never the same fire twice
    ran = [t for t in tasks if t["trigger"] == "every" and t["status"] == "succeeded"]
    assert len(state.fires) == len(ran) >= 3


@pytest.mark.parametrize(
    ("overlap", "statuses"),
    [
        ("skip", {"skipped"}),
        ("queue", {"queued", "running", "succeeded"}),
        ("cancelPrevious", {"cancelled"}),
    ],
)
async def test_fires_during_a_running_task_follow_overlap(
    store: Store, overlap: str, statuses: set[str]
) -> None:
    trigger = {"every": "300ms", "overlap": overlap}
    await apply(store, agent_doc("slow", TICKER, triggers=[trigger], config={"sleep": 1.0}))

    async def overlapped() -> set[str]:
        # A fire came while a task ran, and was handled per the policy (with skip: the
        # task it overlapped ran to its end, not cancelled).
        seen = {t["status"] for t in await store.tasks.recent("slow", count=50)}
        if not statuses & seen:
            return set()
        if overlap == "skip" and "succeeded" not in seen:
            return set()
        return seen

    async with running_daemon(store):
        seen = await wait_until(overlapped, what=f"a fire to overlap a task ({overlap})")
    assert statuses & seen, seen
    if overlap == "skip":
        assert "cancelled" not in seen
        assert any(e.type == "FireSkipped" for e in await store.events.read("slow"))


async def test_a_heartbeat_with_nothing_to_do_creates_no_task_and_no_model_call(
    store: Store,
) -> None:
    from agentos.engine import SimEngine

    engine = SimEngine()
    spec = {
        "triggers": [{"heartbeat": "100ms"}, {"inbox": {}}],
        "hibernation": {"idleAfter": "50ms"},
    }
    await apply(store, agent_doc("watcher", "tests.fixture_agents:Watcher", **spec))
    async with running_daemon(store, engine):
        await wait_until(lambda: status_is(store, "watcher", phase="Hibernated"))
        generations = engine.stats.generations
        checks = HEARTBEAT_CHECKS["watcher"]
        await wait_until(lambda: HEARTBEAT_CHECKS["watcher"] >= checks + 8, what="eight heartbeats")
        assert engine.stats.generations == generations
        assert (await store.agents.status("watcher"))["phase"] == "Hibernated"
        heartbeat_tasks = [
            t for t in await store.tasks.recent("watcher") if t["trigger"] == "heartbeat"
        ]
        assert heartbeat_tasks == []
        await Client(store).send("watcher", "2")  # now there is work

        async def handled() -> bool:
            state = await decode(store, "watcher", WatchState)
            return isinstance(state, WatchState) and state.handled == 2

        await wait_until(handled, what="the work to be done")
    assert engine.stats.generations == generations + 2


@pytest.mark.parametrize(
    ("explicit", "expected"),
    [(False, '{"answer":"HI","n":2}'), (True, '{"a":1,"body":"hi"}')],
)
async def test_a_task_result_is_json_or_what_the_agent_set(
    store: Store, explicit: bool, expected: str
) -> None:
    await apply(
        store,
        agent_doc(
            "rep",
            "tests.fixture_agents:Reporter",
            config={"explicit": explicit},
            triggers=[{"inbox": {}}],
        ),
    )
    async with running_daemon(store):
        msg_id = await Client(store).send("rep", "hi")
        record = await wait_until(
            lambda: _finished(store, "rep", f"m-{msg_id}"), what="the task to finish"
        )
    assert record["result"] == expected


async def _finished(store: Store, name: str, task_id: str) -> dict[str, str] | None:
    record = await store.tasks.get(name, task_id)
    return record if record.get("status") == "succeeded" else None
