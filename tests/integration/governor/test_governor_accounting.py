"""The governor's books stay right when calls wait (issue 22, item 4), against a real Redis.

A call admitted to wait for its rate is charged its estimate at admission: cancelled
during that wait, it is refunded. A call admitted to the class (a fleet-wide concurrency
slot with a lease) that waits for its turn at this daemon's engine keeps that lease
renewed while it waits; and a renewal never shortens a lease the admission gave.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import anyio
import pytest

from agentos.core.policy import ClassQuota, Limits
from agentos.governor.admission import Governor
from agentos.store import Store
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio


def governor(store: Store, limits: Limits, *, parallel: int = 4) -> Governor:
    g = Governor(store, daemon_id="d1", parallel=parallel, slot_lease_s=30.0)
    g.quotas = {
        "std": ClassQuota(
            name="std",
            policy="p",
            timezone="UTC",
            limits=limits,
            per_agent=Limits(),
            base=limits,
            base_per_agent=Limits(),
        )
    }
    return g


def today() -> str:
    return datetime.now(UTC).date().isoformat()


async def day_tokens(store: Store) -> int:
    return (await store.quotas.usage({"std": today()}))["std"].day_tokens


async def lease_left_s(store: Store, agent: str) -> float:
    """Seconds until the lease of ``agent``'s (only) concurrency slot runs out."""
    ((member, until_ms),) = await store.conn.r.zrange(
        store.keys.quota("std", "holders"), 0, -1, withscores=True
    )
    assert member.decode().split("|")[0] == agent
    return float(until_ms) / 1000 - time.time()


async def test_a_call_cancelled_while_it_waits_for_its_rate_is_refunded(store: Store) -> None:
    g = governor(store, Limits(tokens_per_minute=60, daily_tokens=100_000))
    async with g.call(
        agent="a", quota_class="std", priority=50, estimate=lambda: 10, timeout_s=0
    ) as ticket:
        ticket.used(10)
    assert await day_tokens(store) == 10

    entered = anyio.Event()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def paced() -> None:
                async with g.call(
                    agent="a", quota_class="std", priority=50, estimate=lambda: 30, timeout_s=120
                ):
                    entered.set()

            tg.start_soon(paced)
            # Admitted (charged) and waiting for its rate: the class's queue of pacers.
            await wait_until(
                lambda: _pacing(store), what="the second call to wait for its rate", within=5
            )
            assert await day_tokens(store) == 40
            scope.cancel()
    assert not entered.is_set()
    assert await day_tokens(store) == 10  # the estimate came back
    usage = (await store.quotas.usage({"std": today()}))["std"]
    assert usage.in_flight == {}
    assert g.in_flight == {}


async def _pacing(store: Store) -> bool:
    return "a" in (await store.quotas.usage({"std": today()}))["std"].pacing


async def test_a_call_waiting_for_a_local_turn_keeps_its_slot_lease(store: Store) -> None:
    g = governor(store, Limits(max_concurrent=5), parallel=1)
    done = anyio.Event()
    order: list[str] = []

    async def call(agent: str) -> None:
        async with g.call(
            agent=agent, quota_class="std", priority=50, estimate=lambda: 1, timeout_s=5
        ):
            order.append(agent)
            if agent == "first":
                await done.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "first")
        await wait_until(lambda: _true(order == ["first"]), what="the first call to run")
        await store.conn.r.delete(store.keys.quota("std", "holders"))  # only the waiting one
        tg.start_soon(call, "second")
        await wait_until(
            lambda: _true([w.name for w in g.gate.waiting] == ["second"]),
            what="the second call to wait at the local gate",
        )
        assert await lease_left_s(store, "second") < 40
        g.slot_lease_s = 600.0
        await g.renew()  # what the daemon does every second
        assert await lease_left_s(store, "second") > 500
        done.set()
    assert order == ["first", "second"]


async def test_a_renewal_extends_a_paced_calls_lease_and_never_shortens_it(
    store: Store,
) -> None:
    g = governor(store, Limits(tokens_per_minute=60, max_concurrent=5))
    async with g.call(
        agent="a", quota_class="std", priority=50, estimate=lambda: 10, timeout_s=0
    ) as ticket:
        ticket.used(10)
    async with anyio.create_task_group() as tg:

        async def paced() -> None:
            async with g.call(
                agent="a", quota_class="std", priority=50, estimate=lambda: 30, timeout_s=120
            ):
                pass

        tg.start_soon(paced)
        await wait_until(lambda: _pacing(store), what="the call to wait for its rate", within=5)
        admitted = await lease_left_s(store, "a")  # its rate wait plus a lease
        assert admitted > 40
        g.slot_lease_s = 1.0
        await g.renew()
        assert await lease_left_s(store, "a") > admitted - 5  # not cut to one second
        g.slot_lease_s = 600.0
        await g.renew()
        assert await lease_left_s(store, "a") > 500
        tg.cancel_scope.cancel()
    assert g.in_flight == {}


async def _true(value: bool) -> bool:
    return value
