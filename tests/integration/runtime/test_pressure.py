"""The runtime under pressure: more busy agents than slots, lost leases, parked tasks.

Every test runs a real daemon on a real Redis with the sim engine playing llama's
limits (one call at a time, hibernations that take 100 ms), because a faster or more
permissive engine hides exactly the stalls these tests are about.
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
import pytest

from agentos.client import Client
from agentos.engine import SimEngine
from agentos.store import Store, Write
from tests.fixture_agents import GATES, CountState
from tests.helpers import (
    agent_doc,
    apply,
    policy_doc,
    running_daemon,
    state_of,
    status_is,
    wait_until,
)

pytestmark = pytest.mark.anyio

CALLER = "tests.fixture_agents:Caller"
GATE = "tests.fixture_agents:Gate"
PARITY = "tests.fixture_agents:Parity"
INBOX = {"triggers": [{"inbox": {}}]}


def like_llama(slots: int) -> SimEngine:
    """llama's constraints: one call at a time, 100 ms to export or import a context."""
    return SimEngine.like_llama(slots=slots)


async def _all_succeeded(store: Store, names: list[str], n: str = "1") -> bool:
    for name in names:
        if (await store.agents.status(name)).get("tasks_succeeded") != n:
            return False
    return True


@pytest.mark.parametrize(("agents", "slots"), [(4, 2), (8, 2)])
async def test_more_busy_agents_than_slots_all_finish_without_a_restart(
    store: Store, agents: int, slots: int
) -> None:
    calls, gap = 5, 0.2
    serial_s = agents * calls * gap  # every task run one after another
    names = [f"caller-{i}" for i in range(agents)]
    cfg = {"calls": calls, "gap": gap}
    await apply(store, *(agent_doc(n, CALLER, config=cfg, **INBOX) for n in names))
    engine = like_llama(slots)
    async with running_daemon(store, engine, grace_s=3.0, lease_ttl_s=5.0):
        await wait_until(lambda: _all_idle(store, names))
        client = Client(store)
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(client.send, name, "go")
        await wait_until(
            lambda: _all_succeeded(store, names), within=3 * serial_s, what="every task"
        )
        took = time.monotonic() - started
    assert took < 3 * serial_s
    for name in names:
        status = await store.agents.status(name)
        assert status["restarts"] == "0", (name, status.get("last_error"))
        events = {e.type for e in await store.events.read(name, count=200)}
        assert not events & {"BackOff", "Failed", "InfrastructureError"}, (name, events)
        state = await state_of(store, name, CountState)
        assert isinstance(state, CountState)
        assert state.n == 1


async def _all_idle(store: Store, names: list[str]) -> bool:
    for name in names:
        if (await store.agents.status(name)).get("phase") not in ("Idle", "Hibernated"):
            return False
    return True


async def test_one_slot_request_hibernates_exactly_one_agent(store: Store) -> None:
    spec = {"triggers": [{"inbox": {}}], "config": {"calls": 1}}
    await apply(
        store,
        agent_doc("a", CALLER, priority=10, **spec),
        agent_doc("b", CALLER, priority=20, **spec),
        agent_doc("c", CALLER, priority=30, **spec),
    )
    engine = like_llama(2)
    client = Client(store)
    async with running_daemon(store, engine) as d:
        for name in ("a", "b"):
            await client.send(name, "hold a slot")
            await wait_until(lambda n=name: status_is(store, n, phase="Idle", tasks_succeeded="1"))
        assert engine.has_session("a")
        assert engine.has_session("b")
        await client.send("c", "I need a slot")
        await wait_until(lambda: status_is(store, "c", phase="Idle", tasks_succeeded="1"))
        assert d.arbiter.evictions == 1
    hibernated = [
        name
        for name in ("a", "b")
        for e in await store.events.read(name)
        if e.type == "Hibernated" and "slot needed by c" in e.reason
    ]
    assert hibernated == ["a"]  # the lowest priority, and only it


async def test_lease_lost_mid_task_stops_the_agent_and_frees_its_slot(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    GATES.pop("gated", None)
    await apply(store, agent_doc("gated", GATE, **INBOX))
    engine = like_llama(2)
    caplog.set_level(logging.WARNING)
    async with running_daemon(store, engine, lease_ttl_s=30.0) as d:
        await wait_until(lambda: status_is(store, "gated", phase="Idle"))
        await Client(store).send("gated", "go")
        await wait_until(lambda: status_is(store, "gated", phase="Running"))
        assert engine.has_session("gated")
        # Another daemon takes the agent while its task runs.
        lease = (await store.leases.read(["gated"]))["gated"]
        assert await store.leases.release("gated", f"{lease.owner}|{lease.token}")
        assert await store.leases.acquire("gated", "thief", 60_000)
        runner = d.runners["gated"]
        GATES.setdefault("gated", anyio.Event()).set()  # the next write finds the lease gone
        await wait_until(lambda: _gone(d, "gated"), what="the runner to stop")
        assert not engine.has_session("gated")
        assert runner.stop_reason is not None
        assert runner.stop_reason.value == "lease-lost"
    messages = [r.getMessage() for r in caplog.records]
    assert any("lease lost" in m for m in messages), messages
    assert not any("supervisor crashed" in m for m in messages), messages


async def _done(runner: object) -> bool:
    return runner.done.is_set()  # type: ignore[attr-defined]


async def _gone(d: object, name: str) -> bool:
    return name not in d.runners  # type: ignore[attr-defined]


async def test_an_expired_lease_is_never_rearmed_for_stale_memory(store: Store) -> None:
    """d1's lease runs out; d2 adopts, counts on and releases before d1 notices. d1's
    old runner, whose memory is stale, must write nothing: the count goes on from d2's."""
    await apply(store, agent_doc("parity", PARITY, **INBOX))
    client = Client(store)
    engine = like_llama(2)
    async with running_daemon(store, engine, daemon_id="d1", lease_ttl_s=3.0) as d1:
        for i in range(3):
            await client.send("parity", str(2 * i))
        await wait_until(lambda: status_is(store, "parity", tasks_succeeded="3"))
        old = d1.runners["parity"]
        # The lease "expires" (as when Redis was away longer than a lease); d2 takes the
        # agent, saves a newer state and lets go, all before d1's next renewal.
        lease = (await store.leases.read(["parity"]))["parity"]
        assert await store.leases.release("parity", f"{lease.owner}|{lease.token}")
        token = await store.leases.acquire("parity", "d2", 3000)
        assert token
        d2 = f"d2|{token}"
        newer = msgspec.json.encode(CountState(n=4))
        assert await store.writes.fenced_write(
            "parity", d2, Write(status={"owner": "d2"}, state=newer)
        )
        assert await store.leases.release("parity", d2)
        await wait_until(lambda: _done(old), what="d1's stale runner to stop")
        assert old.stop_reason is not None
        assert old.stop_reason.value == "lease-lost"
        # d1 takes the agent again, fresh from Redis.
        await client.send("parity", "8")
        await wait_until(lambda: status_is(store, "parity", tasks_succeeded="4"), within=15)
    state = await state_of(store, "parity", CountState)
    assert isinstance(state, CountState)
    assert state.n == 5


@pytest.mark.parametrize(
    ("backoff", "crash_loop_after", "status"),
    [("30s", 5, {"reason": "BackOff"}), ("10ms", 2, {"phase": "Failed"})],
    ids=["crash-backoff", "failed"],
)
async def test_a_crashed_agent_gives_its_slot_back(
    store: Store, backoff: str, crash_loop_after: int, status: dict[str, str]
) -> None:
    restart = {"backoff": {"initial": backoff, "max": backoff}, "crashLoopAfter": crash_loop_after}
    await apply(
        store,
        agent_doc("odd", PARITY, config={"crash_odd": True}, restartPolicy=restart, **INBOX),
    )
    engine = like_llama(2)
    async with running_daemon(store, engine):
        # Two failing messages: the first alone would be a dead letter, the agent going on.
        await Client(store).send("odd", "1")
        await Client(store).send("odd", "3")
        await wait_until(lambda: status_is(store, "odd", **status))
        assert not engine.has_session("odd")


async def _restarted(store: Store, name: str, spec_hash: str) -> bool:
    status = await store.agents.status(name)
    return status.get("spec_hash") not in (None, spec_hash)


async def test_a_respec_gives_the_slot_back_and_the_new_runner_restores_it(store: Store) -> None:
    keep = {"hibernation": {"keepKV": "always"}}
    await apply(store, agent_doc("parity", PARITY, **keep, **INBOX))
    engine = like_llama(2)
    client = Client(store)
    async with running_daemon(store, engine):
        await client.send("parity", "0")
        await wait_until(lambda: status_is(store, "parity", phase="Idle", tasks_succeeded="1"))
        exports = engine.stats.exports
        before = (await store.agents.status("parity"))["spec_hash"]
        await apply(store, agent_doc("parity", PARITY, priority=60, **keep, **INBOX))
        # The new runner first (its start records the new spec hash): a message sent
        # before the daemon saw the respec would be handled by the old one.
        await wait_until(
            lambda: _restarted(store, "parity", before), what="the respecced runner to start"
        )
        await client.send("parity", "2")
        await wait_until(lambda: status_is(store, "parity", phase="Idle", tasks_succeeded="2"))
        assert engine.stats.exports == exports + 1
        woke = [e for e in await store.events.read("parity") if e.type == "Woke"]
        assert woke
        assert woke[-1].reason == "restore"


async def test_a_spent_budget_parks_the_task_without_a_slot_until_the_policy_allows(
    store: Store,
) -> None:
    policy = {
        "apiVersion": "agentos/v1",
        "kind": "QuotaPolicy",
        "metadata": {"name": "tight"},
        "spec": {"classes": {"tiny": {"dailyTokens": 5}}},
    }
    await apply(store, policy_doc(policy))
    await apply(store, agent_doc("spender", PARITY, quotaClass="tiny", **INBOX))
    engine = like_llama(2)
    client = Client(store)
    async with running_daemon(store, engine, quota_refresh_s=0.1):
        await client.send("spender", "0")  # spends the budget
        await wait_until(lambda: status_is(store, "spender", tasks_succeeded="1"))
        await client.send("spender", "2")
        await wait_until(lambda: status_is(store, "spender", reason="BudgetExhausted"))
        assert not engine.has_session("spender")
        tasks = await store.tasks.recent("spender")
        assert tasks[0]["status"] == "parked"
        events = [e.type for e in await store.events.read("spender")]
        assert "BackOff" not in events
        assert (await store.agents.status("spender"))["restarts"] == "0"
        # An operator raises the budget: the parked task runs now, not at midnight.
        policy["spec"] = {"classes": {"tiny": {"dailyTokens": 1_000_000}}}
        await apply(store, policy_doc(policy))
        await wait_until(lambda: status_is(store, "spender", tasks_succeeded="2"), within=15)


async def test_a_rate_quota_that_cannot_wait_parks_the_task_without_a_slot(store: Store) -> None:
    policy = {
        "apiVersion": "agentos/v1",
        "kind": "QuotaPolicy",
        "metadata": {"name": "slow"},
        "spec": {"classes": {"trickle": {"tokensPerMinute": 1}}},
    }
    await apply(store, policy_doc(policy))
    await apply(store, agent_doc("sipper", PARITY, quotaClass="trickle", **INBOX))
    engine = like_llama(2)
    async with running_daemon(store, engine, quota_refresh_s=0.1):
        await Client(store).send("sipper", "0")
        await wait_until(lambda: status_is(store, "sipper", reason="QuotaExceeded"))
        assert not engine.has_session("sipper")
        assert (await store.tasks.recent("sipper"))[0]["status"] == "retrying"
        assert (await store.agents.status("sipper")).get("restarts", "0") == "0"


@pytest.mark.parametrize("how", ["delete", "shutdown"])
async def test_delete_and_shutdown_close_the_session(store: Store, how: str) -> None:
    await apply(store, agent_doc("parity", PARITY, **INBOX))
    engine = like_llama(2)
    async with running_daemon(store, engine) as d:
        await Client(store).send("parity", "0")
        await wait_until(lambda: status_is(store, "parity", phase="Idle", tasks_succeeded="1"))
        assert engine.has_session("parity")
        if how == "delete":
            await Client(store).delete_agent("parity")
            await wait_until(lambda: _gone(d, "parity"), what="the runner to stop")
            assert not engine.has_session("parity")
    assert not engine.has_session("parity")
    assert not d.arbiter.holders


@pytest.mark.parametrize("work", [False, True], ids=["nothing-found", "work-found"])
async def test_a_hibernated_agent_whose_observe_calls_the_model_wakes_and_sleeps_again(
    store: Store, work: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A heartbeat's observe that asks the model wakes the agent as a task would (phase,
    slot, context); it hibernates again after idleAfter, and another agent gets the one
    slot it held."""
    caplog.set_level(logging.WARNING)
    await apply(
        store,
        agent_doc(
            "peeker",
            "tests.fixture_agents:Peeker",
            config={"work": work},
            triggers=[{"heartbeat": "300ms"}],
            hibernation={"idleAfter": "100ms"},
        ),
        agent_doc("caller", CALLER, config={"calls": 1}, **INBOX),
    )
    engine = like_llama(1)
    async with running_daemon(store, engine):
        woke = await wait_until(lambda: _woke_count(store, "peeker", 2), what="two wakes")
        assert woke
        await Client(store).send("caller", "go")
        await wait_until(lambda: status_is(store, "caller", tasks_succeeded="1"), within=15)
        if work:
            await wait_until(lambda: status_is(store, "peeker", tasks_succeeded="1"))
    messages = [r.getMessage() for r in caplog.records]
    assert not any("supervisor crashed" in m for m in messages), messages


async def _woke_count(store: Store, name: str, n: int) -> bool:
    return sum(1 for e in await store.events.read(name, count=100) if e.type == "Woke") >= n


async def test_a_task_cut_off_by_the_grace_period_gives_its_slot_and_lease_back(
    store: Store,
) -> None:
    GATES.pop("stuck", None)  # its act never returns: the gate is never opened
    await apply(store, agent_doc("stuck", GATE, **INBOX))
    engine = like_llama(2)
    async with running_daemon(store, engine, grace_s=0.5):
        await Client(store).send("stuck", "go")
        await wait_until(lambda: status_is(store, "stuck", phase="Running"))
    assert not engine.has_session("stuck")
    assert await store.leases.read(["stuck"]) == {}
    status = await store.agents.status("stuck")
    assert status["owner"] == ""
    assert status["phase"] in ("Hibernated", "Stopped")
    assert await store.inbox.depth("stuck") == 1  # not acknowledged: it runs again


async def test_agents_that_never_call_the_model_take_no_slot(store: Store) -> None:
    names = [f"echo-{i}" for i in range(4)]
    echo = "tests.fixture_agents:Echo"  # no model call without config.llm
    await apply(store, *(agent_doc(n, echo, **INBOX) for n in names))
    engine = like_llama(1)
    async with running_daemon(store, engine) as d:
        client = Client(store)
        for name in names:
            await client.send(name, "hello")
        await wait_until(lambda: _all_succeeded(store, names))
        assert not any(engine.has_session(n) for n in names)
        assert d.arbiter.evictions == 0
