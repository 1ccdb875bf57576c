"""Nothing lost, nothing run twice: messages keep flowing while daemons are SIGKILLed."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from agentos.client import Client
from agentos.store import Store
from tests.cli_support import base_env, spawn
from tests.fixture_agents import EchoState
from tests.helpers import agent_doc, apply, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis_tiers]

AGENTS = 20
MESSAGES = 500


async def test_500_keyed_messages_survive_two_sigkills_exactly_once(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    names = [f"echo-{i:02d}" for i in range(AGENTS)]
    await apply(
        store, *(agent_doc(n, "tests.fixture_agents:Echo", triggers=[{"inbox": {}}]) for n in names)
    )
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    fast = ("--lease-ttl", "1s", "--grace", "500ms")
    client = Client(store)
    sent: list[tuple[str, str, str]] = []  # (agent, message id, key)

    async def send_range(start: int, stop: int) -> None:
        for i in range(start, stop):
            agent = names[i % AGENTS]
            sent.append((agent, await client.send(agent, f"msg {i}", key=f"k{i}"), f"k{i}"))

    async def running(daemon_id: str) -> None:
        # Kill a daemon only once it works: on a loaded machine its start can take
        # longer than sending a third of the messages.
        async def owns() -> bool:
            statuses = await store.agents.statuses(names)
            return any(s.get("owner") == daemon_id for s in statuses.values())

        await wait_until(owns, within=30, what=f"{daemon_id} to run agents")

    logs = [tmp_path / f"daemon-{n}.log" for n in range(3)]
    with spawn(env, logs[0], "daemon", "--id", "d0", *fast) as d0:
        await send_range(0, 20)
        await running("d0")
        await send_range(20, 170)
        d0.send_signal(signal.SIGKILL)
    with spawn(env, logs[1], "daemon", "--id", "d1", *fast) as d1:
        await send_range(170, 190)
        await running("d1")
        await send_range(190, 340)
        d1.send_signal(signal.SIGKILL)
    with spawn(env, logs[2], "daemon", "--id", "d2", *fast) as d2:
        await send_range(340, MESSAGES)
        # Clients retry: 50 messages are sent a second time with the same key.
        for agent, _, key in sent[:50]:
            sent.append((agent, await client.send(agent, f"msg {key[1:]}", key=key), key))

        async def all_done() -> bool:
            for agent, msg_id, _ in sent:
                record = await store.tasks.get(agent, f"m-{msg_id}")
                if record.get("status") not in ("succeeded", "skipped"):
                    return False
            return True

        await wait_until(all_done, within=60, what="every message's task to finish")
        d2.send_signal(signal.SIGTERM)

    succeeded = Counter()
    for agent, msg_id, key in sent:
        record = await store.tasks.get(agent, f"m-{msg_id}")
        if record["status"] == "succeeded":
            succeeded[key] += 1
    assert len(succeeded) == MESSAGES
    assert set(succeeded.values()) == {1}, [k for k, n in succeeded.items() if n != 1]
    handled = 0
    for agent in names:
        assert await store.inbox.depth(agent) == 0
        raw = await store.agents.load_state(agent)
        assert raw is not None
        bodies = msgspec.json.decode(raw, type=EchoState).bodies
        assert len(bodies) == len(set(bodies)), f"{agent} handled a message twice"
        handled += len(bodies)
    assert handled == MESSAGES
    # The kills really interrupted work: the later daemons adopted agents mid-stream.
    adopted = [e for n in names for e in await store.events.read(n) if e.type == "Adopted"]
    assert adopted
