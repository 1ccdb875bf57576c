"""Slots serve the agents that generate: an agent in a long tool call lends its slot.

One engine slot, two agents: ``a`` calls a tool that runs until the test opens its gate;
``b`` needs the slot meanwhile. ``a``'s KV is saved and its slot goes to ``b``, which
finishes while ``a``'s tool still runs; ``a``'s next model call takes a slot again and
restores its KV instead of re-prefilling.
"""

from __future__ import annotations

import pytest

from agentos.client import Client
from agentos.engine import SimEngine
from agentos.store import Store
from agentos.testing import ToolCall
from tests.fixture_agents import GATES
from tests.helpers import agent_doc, apply, running_daemon, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

ENTRY = "tests.fixture_agents:ToolUser"


async def test_a_slot_is_lent_during_a_long_tool_call_and_the_kv_comes_back(store: Store) -> None:
    GATES.clear()
    engine = SimEngine.like_llama(slots=1, export_latency_s=0.01, import_latency_s=0.01)
    engine.script("a", ToolCall(id="t1", name="hold", arguments={"gate": "a"}), "done a")
    engine.script("b", "done b")
    spec = {"triggers": [{"inbox": {}}], "hibernation": {"idleAfter": "1h", "keepKV": "always"}}
    await apply(store, agent_doc("a", ENTRY, **spec), agent_doc("b", ENTRY, **spec))
    client = Client(store)
    async with running_daemon(store, engine, lend_slot_after_s=0.05) as daemon:
        sent_a = await client.send("a", "hold the gate")
        await wait_until(lambda: _in_tool(daemon), what="a running its tool")
        sent_b = await client.send("b", "quick one")
        done_b = await client.wait_task("b", f"m-{sent_b}", timeout_s=20)
        assert done_b["status"] == "succeeded"
        assert "a" in GATES
        assert not GATES["a"].is_set()  # b finished while a's tool still ran
        assert daemon.runners["a"].lent == 1
        exports = engine.stats.exports
        assert exports >= 1
        GATES["a"].set()
        done_a = await client.wait_task("a", f"m-{sent_a}", timeout_s=20)
        assert done_a["status"] == "succeeded"
        assert done_a["result"] == "done a"
        assert engine.stats.imports_accepted >= 1  # restored, not re-prefilled
    events = [e.type for e in await client.events("a", count=50)]
    assert "Woke" in events


async def _in_tool(daemon: object) -> bool:
    runner = getattr(daemon, "runners", {}).get("a")
    return runner is not None and runner.lendable


async def test_a_conversation_survives_hibernation_through_redis(store: Store) -> None:
    engine = SimEngine.like_llama(export_latency_s=0.01, import_latency_s=0.01)
    engine.script("c", "first answer", "second answer")
    spec = {"triggers": [{"inbox": {}}], "hibernation": {"idleAfter": "1h", "keepKV": "never"}}
    await apply(store, agent_doc("c", ENTRY, **spec))
    client = Client(store)
    async with running_daemon(store, engine):
        first = await client.send("c", "one")
        assert (await client.wait_task("c", f"m-{first}", timeout_s=20))["result"] == "first answer"
        await client.hibernate("c")
        await wait_until(lambda: _phase(store, "c", "Hibernated"), what="c hibernated")
        assert not engine.has_session("c")
        second = await client.send("c", "two")
        done = await client.wait_task("c", f"m-{second}", timeout_s=20)
        assert done["result"] == "second answer"
        # keepKV never: the wake re-prefilled, and the conversation came back from Redis.
        roles = [(m["role"], m["content"]) for m in engine.conversation("c")]
        assert roles == [
            ("user", "one"),
            ("assistant", "first answer"),
            ("user", "two"),
            ("assistant", "second answer"),
        ]


async def _phase(store: Store, name: str, phase: str) -> bool:
    return (await store.agents.status(name)).get("phase") == phase
