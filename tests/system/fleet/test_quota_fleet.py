"""Quotas across a fleet: three daemon processes share one Redis and hold each class to its
tokens-per-minute limit, fairly; a rule rescales a class under queue pressure and
restores it; and apply refuses agents whose quota class does not exist."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agentos.client import Client, InUse
from agentos.core.policy import Limits
from agentos.core.spec import SpecError, parse_text
from agentos.engine.sim import SimEngine
from agentos.store import Store
from agentos.store.quota import BURST_S
from tests.cli_support import base_env, cli, show, spawn
from tests.helpers import agent_doc, apply, running_daemon, steady, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.redis_tiers]

LIMITS = {"fast": 60_000, "slow": 30_000}  # tokens per minute
MEMBERS = {"fast": 20, "slow": 10}
WINDOW_S = 20.0


def policy(text: str, source: str = "<policy>") -> list:  # type: ignore[type-arg]
    return parse_text(text, source=source)


POLICY = """
apiVersion: agentos/v1
kind: QuotaPolicy
metadata: {name: hammer}
spec:
  classes:
    fast: {tokensPerMinute: 60000}
    slow: {tokensPerMinute: 30000}
"""


async def _tat_ahead(store: Store, quota_class: str) -> bool:
    """Whether the class's burst allowance is spent (its GCRA clock runs ahead by it)."""
    raw = await store.conn.r.get(store.keys.quota(quota_class, "tat"))
    return raw is not None and int(raw) > (time.time() + BURST_S - 1) * 1_000_000


def _last_call(log: Path) -> float:
    """When the last call an agent logged ended (0 before its first)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return float(lines[-1].split()[0]) if lines else 0.0


@pytest.mark.e2e
async def test_three_daemons_hold_each_class_to_its_rate_and_starve_nobody(
    redis_url: str, namespace: str, store: Store, tmp_path: Path
) -> None:
    logs = tmp_path / "calls"
    logs.mkdir()
    await apply(store, *policy(POLICY))
    names: dict[str, list[str]] = {
        c: [f"{c}-{i:02d}" for i in range(n)] for c, n in MEMBERS.items()
    }
    await apply(
        store,
        *(
            agent_doc(
                name,
                "tests.fixture_agents:Hammer",
                quotaClass=c,
                config={"log_dir": str(logs), "max_tokens": 20},
            )
            for c, members in names.items()
            for name in members
        ),
    )
    env = {
        **base_env(tmp_path / "home"),
        "AGENTOS_REDIS_URL": redis_url,
        "AGENTOS_NAMESPACE": namespace,
    }
    with (
        spawn(env, tmp_path / "d0.log", "daemon", "--id", "d0", "--max-agents", "10") as d0,
        spawn(env, tmp_path / "d1.log", "daemon", "--id", "d1", "--max-agents", "10") as d1,
        spawn(env, tmp_path / "d2.log", "daemon", "--id", "d2", "--max-agents", "10") as d2,
    ):

        async def all_calling() -> bool:
            return len(list(logs.iterdir())) == 30

        await wait_until(all_calling, within=30, what="every agent to make a call")

        async def buckets_drained() -> bool:
            return all([await _tat_ahead(store, c) for c in LIMITS])

        # The burst allowance goes first; measure the steady state after it.
        await wait_until(buckets_drained, within=30, what="the burst to be spent")
        # The steady state, a second after the burst, for WINDOW_S.
        start = time.time() + 1.0
        end = start + WINDOW_S

        def window_logged() -> bool:
            # Every class has a call logged after the window: all calls in it are logged.
            return all(
                max(_last_call(logs / n) for n in members) >= end for members in names.values()
            )

        await wait_until(
            window_logged, within=WINDOW_S + 30, what="calls past the window", every=0.2
        )
        owners = set(await Client(store).daemons())
        for d in (d0, d1, d2):
            d.terminate()
    assert owners >= {"d0", "d1", "d2"}
    for c, members in names.items():
        per_agent = {}
        for name in members:
            rows = [line.split() for line in (logs / name).read_text().splitlines()]
            per_agent[name] = sum(int(n) for t, n in rows if start <= float(t) < end)
        total = sum(per_agent.values())
        per_minute = total / (end - start) * 60
        assert abs(per_minute - LIMITS[c]) <= 0.02 * LIMITS[c], (c, per_minute, per_agent)
        fair = total / len(members)
        starved = {n: v for n, v in per_agent.items() if v < fair / 2}
        assert not starved, (c, fair, starved)


async def test_queue_wait_rule_rescales_after_for_not_before_cooldown_and_restores(
    store: Store, tmp_path: Path
) -> None:
    text = """
apiVersion: agentos/v1
kind: QuotaPolicy
metadata: {name: pressure}
spec:
  classes:
    busy: {tokensPerMinute: 600000}
    batch: {tokensPerMinute: 8000, maxConcurrent: 4}
  rules:
    - name: shed-batch
      when: {metric: queue_wait_p95_s, above: 0.5, for: 1s}
      then: {class: batch, scale: 0.5, min: {tokensPerMinute: 1000}}
      cooldown: 3s
      stabilization: 1s
"""
    await apply(store, *policy(text))
    # Two agents whose class is slow to admit: their waits drive the queue-wait metric.
    await apply(
        store,
        *(
            agent_doc(f"w{i}", "tests.fixture_agents:Hammer", quotaClass="batch",
                      config={"max_tokens": 200})
            for i in range(2)
        ),
    )  # fmt: skip
    client = Client(store)
    settings = {"quota_eval_s": 0.2, "quota_window_s": 2.0, "quota_refresh_s": 0.2}
    engine = SimEngine()
    async with running_daemon(store, engine, **settings) as daemon:

        async def tpm() -> int | None:
            effective = await store.quotas.effective()
            return None if effective is None else effective["batch"].limits.tokens_per_minute

        async def rescaled() -> bool:
            return await tpm() == 4000

        first_wait = time.monotonic()
        await wait_until(rescaled, within=20, what="batch to be scaled to 4000 tokens/min")
        fired_at = time.monotonic()
        _, metrics = await store.quotas.state()
        assert metrics["values"]["queue_wait_p95_s"] > 0.5
        # `for: 1s`: the condition had to hold for a second before the change.
        assert fired_at - first_wait >= 1.0
        events = [e for e in await client.events() if e.type == "Rescaled"]
        assert len(events) == 1
        assert "queue_wait_p95_s" in events[0].message
        assert "tokensPerMinute 8000 -> 4000" in events[0].message
        # Not again before the cooldown...

        async def unchanged() -> bool:
            return await tpm() == 4000

        await steady(unchanged, for_s=2.0, what="batch at 4000 tokens/min")
        explained, _, _ = await client.explain("pressure")
        (rule,) = explained.rules
        assert rule.steps == 1
        assert rule.state in ("cooling", "active")
        assert rule.next == Limits(tokens_per_minute=2000, max_concurrent=1)

        # ...but after it, while the pressure lasts.
        async def compounded() -> bool:
            return (await tpm() or 0) <= 2000

        await wait_until(compounded, within=10, what="a second step after the cooldown")
        # Recovery: the pressure goes away (the agents are deleted), the limit comes back.
        for i in range(2):
            await client.delete_agent(f"w{i}")

        async def restored() -> bool:
            return await tpm() == 8000

        await wait_until(restored, within=20, what="batch to be restored")
        restored_events = [e for e in await client.events() if e.type == "Restored"]
        assert restored_events
        assert "restored" in restored_events[-1].message
        explained, _, _ = await client.explain("pressure")
        assert explained.rules[0].steps == 0
        assert explained.rules[0].state == "idle"
        assert daemon.evaluator.lease is not None


async def test_apply_refuses_unknown_quota_classes_and_policy_deletes_in_use(
    store: Store,
) -> None:
    client = Client(store)
    with pytest.raises(SpecError) as info:
        await client.apply([agent_doc("a", "tests.fixture_agents:Counter", quotaClass="premium")])
    (issue,) = info.value.issues
    assert issue.path == "spec.quotaClass"
    assert 'unknown quota class "premium"' in issue.message
    assert await client.agent_specs() == {}
    # Policy and agent in one apply: fine. The default class needs no policy.
    docs = policy(
        "apiVersion: agentos/v1\nkind: QuotaPolicy\nmetadata: {name: p}\n"
        "spec: {classes: {premium: {tokensPerMinute: 100}}}\n",
        "p.yaml",
    )
    await client.apply(
        [*docs, agent_doc("a", "tests.fixture_agents:Counter", quotaClass="premium")]
    )
    await client.apply([agent_doc("b", "tests.fixture_agents:Counter")])
    # A second policy may not define the same class.
    twin = policy(
        "apiVersion: agentos/v1\nkind: QuotaPolicy\nmetadata: {name: q}\n"
        "spec: {classes: {premium: {tokensPerMinute: 5}}}\n",
        "q.yaml",
    )
    with pytest.raises(SpecError) as info:
        await client.apply(twin)
    assert str(info.value.issues[0]).startswith("q.yaml:4: spec.classes.premium:")
    # Dropping a class agents use, or deleting its policy, is refused.
    emptied = policy(
        "apiVersion: agentos/v1\nkind: QuotaPolicy\nmetadata: {name: p}\nspec: {classes: {}}\n"
    )
    with pytest.raises(SpecError, match='removes quota class "premium" that agents still use: a'):
        await client.apply(emptied)
    with pytest.raises(InUse, match="agents a"):
        await client.delete_policy("p")
    await client.delete_agent("a")
    await client.delete_policy("p")


async def test_cli_quota_and_policy_explain(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        POLICY
        + """  rules:
    - name: night
      when: {hours: "00:00-23:59"}
      then: {class: slow, set: {tokensPerMinute: 1000}}
"""
    )
    dry = await cli(env, "apply", "-f", str(path), "--dry-run")
    assert dry.returncode == 0, show(dry)
    assert "quotapolicy/hammer created (dry run)" in dry.stdout
    assert "effective quotas after this apply" in dry.stdout
    assert "tokensPerMinute=1000 (declared tokensPerMinute=30000)" in dry.stdout
    assert (await cli(env, "get", "policies", "-o", "json")).stdout.strip() == "[]"
    assert (await cli(env, "apply", "-f", str(path))).returncode == 0
    shown = await cli(env, "quota", "-o", "json")
    assert shown.returncode == 0, show(shown)
    view = json.loads(shown.stdout)
    assert {c["name"]: c["limits"] for c in view["classes"]} == {
        "fast": {"tokensPerMinute": 60000},
        "slow": {"tokensPerMinute": 30000},
    }
    table = await cli(env, "quota")
    assert "fast (hammer)" in table.stdout, show(table)
    explained = await cli(env, "policy", "explain", "hammer")
    assert explained.returncode == 0, show(explained)
    assert "hammer/night -> class slow" in explained.stdout
    assert "limits now: tokensPerMinute=1000" in explained.stdout
    assert "in effect: night (set tokensPerMinute=1000)" in explained.stdout
    missing = await cli(env, "policy", "explain", "nope")
    assert missing.returncode == 1
    assert 'policy "nope" not found' in missing.stderr
