"""Waits survive a SIGKILLed daemon; a waiting fleet costs Redis nothing while it waits."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from agentos.client import Client
from agentos.store import Store
from tests.cli_support import base_env, cli, show, spawn
from tests.helpers import agent_doc, apply, running_daemon, steady, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]


async def test_an_answer_given_with_the_cli_after_a_sigkill_completes_the_task_once(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    await apply(
        store,
        agent_doc(
            "appr",
            "tests.wait_agents:Approver",
            triggers=[{"inbox": {}}],
            config={"log": str(log)},
        ),
    )
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    fast = ("--lease-ttl", "1s", "--grace", "500ms")
    msg = await Client(store).send("appr", "deploy")
    task = f"m-{msg}"
    with spawn(env, tmp_path / "d0.log", "daemon", "--id", "d0", *fast) as d0:

        async def waiting() -> bool:
            return (await store.tasks.get("appr", task)).get("status") == "waiting"

        await wait_until(waiting, within=30, what="the task to wait")
        d0.send_signal(signal.SIGKILL)
        d0.wait(timeout=10)
    assert log.read_text().splitlines() == ["before deploy"]
    with spawn(env, tmp_path / "d1.log", "daemon", "--id", "d1", *fast) as d1:
        ps = await cli(env, "ps")
        assert ps.returncode == 0, show(ps)
        (row,) = [line for line in ps.stdout.splitlines() if line.startswith("appr")]
        assert "Waiting" in row
        pending = await cli(env, "pending", "-o", "json")
        assert pending.returncode == 0, show(pending)
        (listed,) = json.loads(pending.stdout)
        assert (listed["agent"], listed["task"], listed["choices"]) == ("appr", task, ["yes", "no"])
        wrong = await cli(env, "answer", "appr", task, "--choice", "maybe")
        assert wrong.returncode == 2, show(wrong)
        assert "not one of the choices" in wrong.stderr
        ok = await cli(env, "answer", "appr", task, "--yes", "--as", "alice")
        assert ok.returncode == 0, show(ok)

        async def finished() -> dict[str, str] | None:
            record = await store.tasks.get("appr", task)
            return record if record.get("status") == "succeeded" else None

        record = await wait_until(finished, within=30, what="the task to finish")
        again = await cli(env, "answer", "appr", task, "--no")
        assert again.returncode == 2, show(again)
        d1.send_signal(signal.SIGTERM)
        d1.wait(timeout=20)
    assert record["result"] == "deploy: yes"
    assert record["answered_by"] == "alice"
    (answer,) = json.loads(record["answers"])
    assert (answer["outcome"], answer["value"], answer["by"]) == ("answered", "yes", "alice")
    # The phase before the wait ran twice, the code after it once.
    assert log.read_text().splitlines() == ["before deploy", "before deploy", "after yes"]
    assert await store.inbox.depth("appr") == 0
    succeeded = [e for e in await store.events.read("appr") if e.type == "Answered"]
    assert len(succeeded) == 1


FLEET = 1000


async def test_a_thousand_waiting_agents_cost_redis_nothing_while_they_wait(store: Store) -> None:
    names = [f"w-{i:04d}" for i in range(FLEET)]
    await apply(
        store,
        *(agent_doc(n, "tests.wait_agents:Approver", triggers=[{"inbox": {}}]) for n in names),
    )
    client = Client(store)
    for n in names:
        await client.send(n, "act")
    async with running_daemon(store, lease_ttl_s=15.0, grace_s=5.0, reconcile_interval_s=1.0) as d:

        async def all_waiting() -> bool:
            phases = {st.get("phase") for st in (await store.agents.statuses(names)).values()}
            return phases == {"Waiting"} and not d.runners

        await wait_until(all_waiting, within=240, what="every agent to wait")
        assert not any(d.engine.has_session(n) for n in names)
        keys = await store.namespace_keys()
        sample = {f"{{{n}}}" for n in names[:: FLEET // 50]}
        per_agent = [k for k in keys if k.split(":")[1] in sample]

        async def settled() -> bool:
            # The stragglers' signals and the last lease renewals have passed: no sampled
            # agent's key was touched for a second (OBJECT IDLETIME touches nothing).
            return min([await store.key_idle_s(k) for k in per_agent], default=0) >= 1

        await wait_until(settled, within=30, what="the agents' keys to settle", every=0.2)
        before = await store.command_calls()
        await steady(lambda: not d.runners, for_s=10, what="no agent activated")
        after = await store.command_calls()
        calls = {c: after.get(c, 0) - before.get(c, 0) for c in after}
        # OBJECT IDLETIME: seconds since any command last read or wrote the key.
        idle = [await store.key_idle_s(k) for k in per_agent]
    total = sum(calls.values())
    # The daemon's own fleet-level work (heartbeat, signals, quota refresh, due index reads)
    # goes on: about 150 commands in 10 s, and 10 more per signal group (one on a server,
    # one per shard on a cluster: four). Nothing scales with the waiting agents: one
    # command each would be FLEET more.
    assert total < FLEET / 4, json.dumps({c: n for c, n in calls.items() if n})
    assert per_agent
    assert min(idle) >= 10, "a waiting agent's key was touched while it waited"
    used = {c: n for c, n in calls.items() if n}
    print(json.dumps({"waiting_agents": FLEET, "redis_commands_10s": total, "by_command": used}))
