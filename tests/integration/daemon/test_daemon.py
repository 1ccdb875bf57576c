"""The daemon against a real Redis: loops, state, restarts, leases, hibernation, shutdown."""

from __future__ import annotations

import threading

import anyio
import msgspec
import pytest

from agentos.client import Client
from agentos.core.placement import share_limit
from agentos.daemon import Daemon
from agentos.engine import SimEngine
from agentos.settings import DaemonSettings
from agentos.store import Store, Write
from tests.fixture_agents import CountState, EchoState
from tests.helpers import FAST, agent_doc, apply, running_daemon, status_is, steady, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

COUNTER = "tests.fixture_agents:Counter"
ECHO = "tests.fixture_agents:Echo"
CRASHER = "tests.fixture_agents:Crasher"
FAST_RESTART = {"backoff": {"initial": "50ms", "max": "100ms"}, "crashLoopAfter": 3}


async def state_of(store: Store, name: str, type_: type) -> object | None:
    raw = await store.agents.load_state(name)
    return None if raw is None else msgspec.json.decode(raw, type=type_)


async def test_agent_runs_its_loop_and_saves_state(store: Store) -> None:
    await apply(store, agent_doc("counter", COUNTER, config={"limit": 3}))
    async with running_daemon(store):
        st = await wait_until(
            lambda: status_is(store, "counter", phase="Idle", tasks_succeeded="1"), what="idle"
        )
        # Step and token counters arrive with the daemon's periodic status flush.
        st = await wait_until(lambda: status_is(store, "counter", steps="3"), what="steps")
        state = await state_of(store, "counter", CountState)
    assert isinstance(state, CountState)
    assert state.n == 3
    assert st["spec_hash"]
    assert int(st["tokens_out"]) > 0


async def test_messages_run_once_each_and_are_acknowledged(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    client = Client(store)
    sent = [f"hello {i}" for i in range(5)]
    for body in sent[:2]:
        await client.send("echo", body)  # before any daemon runs: must not be lost
    async with running_daemon(store):
        for body in sent[2:]:
            await client.send("echo", body)

        async def all_seen() -> bool:
            state = await state_of(store, "echo", EchoState)
            return isinstance(state, EchoState) and len(state.bodies) >= 5

        await wait_until(all_seen, what="five messages")
        await wait_until(lambda: status_is(store, "echo", phase="Idle"), what="idle")
        assert await store.inbox.depth("echo") == 0
    state = await state_of(store, "echo", EchoState)
    assert isinstance(state, EchoState)
    assert state.bodies == sent
    assert state.stopped_with == "shutdown"


async def test_crash_loop_fails_the_agent_with_its_traceback_and_spares_the_rest(
    store: Store,
) -> None:
    await apply(
        store,
        agent_doc("crasher", CRASHER, restartPolicy=FAST_RESTART),
        agent_doc("counter", COUNTER, config={"limit": 2}),
    )
    async with running_daemon(store):
        st = await wait_until(lambda: status_is(store, "crasher", phase="Failed"), what="Failed")
        await wait_until(lambda: status_is(store, "counter", phase="Idle", tasks_succeeded="1"))
    assert st["reason"] == "CrashLoop"
    assert "boom: the tool is broken" in st["last_error"]
    assert "RuntimeError" in st["last_traceback"]
    assert "fixture_agents.py" in st["last_traceback"]
    assert st["restarts"] == "3"
    types = [e.type for e in await store.events.read("crasher")]
    assert types.count("BackOff") == 2
    assert "Failed" in types


@pytest.mark.parametrize(
    ("entrypoint", "expected"),
    [
        ("tests.no_such_module:Agent", "cannot import 'tests.no_such_module'"),
        ("tests.fixture_agents:Missing", "has no attribute 'Missing'"),
        ("tests.fixture_agents:NotAnAgent", "not a subclass of agentos.Agent"),
    ],
)
async def test_bad_entrypoint_fails_the_agent_not_the_daemon(
    store: Store, entrypoint: str, expected: str
) -> None:
    await apply(store, agent_doc("broken", entrypoint), agent_doc("ok", COUNTER))
    async with running_daemon(store):
        st = await wait_until(lambda: status_is(store, "broken", phase="Failed"))
        await wait_until(lambda: status_is(store, "ok", phase="Idle", tasks_succeeded="1"))
    assert st["reason"] == "EntrypointError"
    assert expected in st["message"]


async def test_failed_agent_recovers_when_woken(store: Store) -> None:
    await apply(store, agent_doc("crasher", CRASHER, restartPolicy=FAST_RESTART))
    async with running_daemon(store):
        await wait_until(lambda: status_is(store, "crasher", phase="Failed"))
        await Client(store).wake("crasher")
        await wait_until(
            lambda: status_is(store, "crasher", phase="Failed", restarts="6"), what="second loop"
        )
    types = [e.type for e in await store.events.read("crasher")]
    assert "Recovered" in types


async def test_two_daemons_never_run_the_same_agent_and_adopt_each_other(store: Store) -> None:
    names = [f"a{i}" for i in range(8)]
    await apply(store, *(agent_doc(n, ECHO, triggers=[{"inbox": {}}]) for n in names))
    async with running_daemon(store) as one, running_daemon(store) as two:
        # Settled: every agent started and neither daemon over its fair share (one that
        # started first may have taken all of them, and hands some over with reason
        # rebalance: due at once, for the other daemon).
        most = share_limit(len(names), 2)

        async def all_started() -> bool:
            held = (len(one.runners), len(two.runners))
            return sum(held) == len(names) and max(held) <= most

        await wait_until(all_started, what="all agents started and shared")
        assert not set(one.runners) & set(two.runners)
        owners = await store.leases.read(names)
        assert {n: i.owner for n, i in owners.items()} == {
            n: (one.id if n in one.runners else two.id) for n in names
        }
        ones = sorted(one.runners)
        one.request_stop()

        async def released() -> bool:  # idle: hibernated until their next message
            statuses = await store.agents.statuses(ones)
            return all(
                st.get("phase") == "Hibernated" and not st.get("owner") for st in statuses.values()
            )

        await wait_until(released, within=10, what="the first daemon's agents to be released")
        client = Client(store)
        for name in ones:
            await client.send(name, "hello")

        async def adopted() -> bool:
            return len(two.runners) == len(names)

        await wait_until(adopted, within=10, what="activation by the second daemon")
        for name in ones:  # started afresh from Redis: the first daemon let it go cleanly
            started = [e for e in await store.events.read(name) if e.type == "Started"]
            assert f"started by {two.id}" in started[-1].message


async def test_a_daemon_cancelled_from_outside_stops_its_lease_thread(store: Store) -> None:
    # A task group that fails cancels the daemon's run instead of stopping it: the
    # thread that writes its heartbeat must end all the same. Left beating, it says the
    # daemon is alive for ever, and no other daemon adopts its agents.
    await apply(store, agent_doc("counter", COUNTER))
    d = Daemon(store, SimEngine(), DaemonSettings(**FAST))
    failed = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(d.run)
            await wait_until(lambda: status_is(store, "counter", tasks_succeeded="1"))
            assert d.keeper.passes >= 1
            raise RuntimeError("the embedding app failed")
    except* RuntimeError:
        failed = True
    assert failed
    lease_threads = [t.name for t in threading.enumerate() if t.name.startswith("agentos-leases")]
    assert f"agentos-leases-{d.id}" not in lease_threads
    beat = (await store.heartbeats.daemons())[d.id]["seen_at"]

    async def unchanged() -> bool:
        return bool((await store.heartbeats.daemons())[d.id]["seen_at"] == beat)

    # A lease: three of its passes (one every third of a lease) would have beaten.
    await steady(unchanged, for_s=FAST["lease_ttl_s"], what="the dead daemon's heartbeat")


async def test_hibernate_and_wake_restore_the_kv_and_continue_identically(store: Store) -> None:
    spec = {"triggers": [{"inbox": {}}], "config": {"llm": True}}
    await apply(store, agent_doc("chat", ECHO, **spec))
    client = Client(store)
    async with running_daemon(store, SimEngine(seed=7)):
        await client.send("chat", "first question")
        await wait_until(lambda: status_is(store, "chat", phase="Idle", tasks_succeeded="1"))
        await client.hibernate("chat")
        st = await wait_until(lambda: status_is(store, "chat", phase="Hibernated"))
        assert int(st["kv_bytes"]) > 0
        await client.send("chat", "second question")
        await wait_until(lambda: status_is(store, "chat", phase="Idle", tasks_succeeded="2"))
    woke = [e for e in await store.events.read("chat") if e.type == "Woke"]
    assert woke
    assert woke[0].reason == "restore"
    state = await state_of(store, "chat", EchoState)

    reference = SimEngine(seed=7)
    reference.open_session("ref")
    first = await reference.generate("ref", "first question", max_tokens=8)
    second = await reference.generate("ref", "second question", max_tokens=8)
    assert isinstance(state, EchoState)
    assert state.replies == [first.text, second.text]


async def test_a_corrupt_snapshot_is_recomputed_and_the_event_says_why(store: Store) -> None:
    spec = {"triggers": [{"inbox": {}}], "config": {"llm": True}}
    await apply(store, agent_doc("chat", ECHO, **spec))
    client = Client(store)
    async with running_daemon(store, SimEngine(seed=7)):
        await client.send("chat", "first question")
        await wait_until(lambda: status_is(store, "chat", phase="Idle", tasks_succeeded="1"))
        await client.hibernate("chat")
        await wait_until(lambda: status_is(store, "chat", phase="Hibernated"))
        manifest = await store.snapshots.manifest("chat")
        assert manifest is not None
        assert manifest.kept_kv
        await store.conn.r.setrange(manifest.chunks[0].key, 100, b"garbage")  # bit rot
        await client.send("chat", "second question")
        await wait_until(lambda: status_is(store, "chat", phase="Idle", tasks_succeeded="2"))
    woke = [e for e in await store.events.read("chat") if e.type == "Woke"]
    assert woke[0].reason == "recompute"
    assert "chunk 0 of 1 corrupt" in woke[0].message
    assert "re-prefilled" in woke[0].message
    state = await state_of(store, "chat", EchoState)
    reference = SimEngine(seed=7)
    reference.open_session("ref")
    first = await reference.generate("ref", "first question", max_tokens=8)
    second = await reference.generate("ref", "second question", max_tokens=8)
    assert isinstance(state, EchoState)
    assert state.replies == [first.text, second.text]


async def test_idle_agents_hibernate_after_idle_after(store: Store) -> None:
    await apply(
        store,
        agent_doc("sleepy", COUNTER, config={"limit": 1}, hibernation={"idleAfter": "200ms"}),
    )
    async with running_daemon(store):
        st = await wait_until(lambda: status_is(store, "sleepy", phase="Hibernated"))
    assert "idle for" in st["message"]


async def test_shutdown_saves_state_and_releases_leases(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    async with running_daemon(store):
        await Client(store).send("echo", "one")
        await wait_until(lambda: status_is(store, "echo", phase="Idle", tasks_succeeded="1"))
    st = await store.agents.status("echo")
    assert st["owner"] == ""
    assert st["phase"] in ("Stopped", "Hibernated")
    assert await store.leases.read(["echo"]) == {}


async def test_delete_stops_the_agent_and_removes_its_keys(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO))
    async with running_daemon(store) as d:
        await wait_until(lambda: status_is(store, "echo", phase="Idle"))
        await Client(store).delete_agent("echo")

        async def gone() -> bool:
            keys = await store.namespace_keys()
            return "echo" not in d.runners and not [
                k for k in keys if "{echo}" in k and not k.endswith(":fence")
            ]

        await wait_until(gone, what="agent keys removed")


async def test_a_new_spec_restarts_the_agent_with_it(store: Store) -> None:
    await apply(store, agent_doc("counter", COUNTER, config={"limit": 2}))
    async with running_daemon(store):
        await wait_until(lambda: status_is(store, "counter", phase="Idle", tasks_succeeded="1"))
        await apply(store, agent_doc("counter", COUNTER, config={"limit": 5}))

        async def counted_to_five() -> bool:
            state = await state_of(store, "counter", CountState)
            return isinstance(state, CountState) and state.n == 5

        await wait_until(counted_to_five, what="count to the new limit")


async def test_deleting_an_agent_whose_daemon_is_gone_purges_it_later(store: Store) -> None:
    await apply(store, agent_doc("orphan", ECHO))
    token = await store.leases.acquire("orphan", "dead-daemon", 300)
    assert await store.writes.fenced_write("orphan", f"dead-daemon|{token}", Write(state=b"{}"))
    await Client(store).delete_agent("orphan")
    assert await store.specs.pending_purges() == {"orphan"}  # its owner still holds the lease
    async with running_daemon(store):

        async def purged() -> bool:
            return (
                not await store.specs.pending_purges()
                and await store.agents.load_state("orphan") is None
            )

        await wait_until(purged, what="the orphan's keys to be purged")


async def test_a_message_whose_signal_was_lost_is_found_by_the_inbox_sweep(store: Store) -> None:
    await apply(store, agent_doc("echo", ECHO, triggers=[{"inbox": {}}]))
    async with running_daemon(store, inbox_sweep_s=0.3):
        await wait_until(lambda: status_is(store, "echo", phase="Idle"))
        await store.conn.r.xadd(store.keys.inbox("echo"), {"body": "quiet", "sent_at": "0"})

        async def seen() -> bool:
            state = await state_of(store, "echo", EchoState)
            return isinstance(state, EchoState) and state.bodies == ["quiet"]

        await wait_until(seen, what="the sweep to deliver the message")


async def test_when_slots_run_out_the_lowest_priority_idle_agent_is_swapped_out(
    store: Store,
) -> None:
    spec = {"triggers": [{"inbox": {}}], "config": {"llm": True}}
    await apply(
        store,
        agent_doc("low", ECHO, priority=10, **spec),
        agent_doc("high", ECHO, priority=90, **spec),
        agent_doc("urgent", ECHO, priority=50, **spec),
    )
    client = Client(store)
    engine = SimEngine(slots=2)
    async with running_daemon(store, engine):
        for name in ("low", "high"):
            await client.send(name, "hello")
            await wait_until(lambda n=name: status_is(store, n, phase="Idle", tasks_succeeded="1"))
        assert engine.has_session("low")
        assert engine.has_session("high")
        await client.send("urgent", "I need a slot")  # both slots are held
        await wait_until(lambda: status_is(store, "urgent", phase="Idle", tasks_succeeded="1"))
        low = await wait_until(lambda: status_is(store, "low", phase="Hibernated"))
        assert "slot needed by urgent" in low["message"]
        assert (await store.agents.status("high"))["phase"] == "Idle"
        assert not engine.has_session("low")
