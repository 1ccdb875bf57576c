"""Quota admission against a real Redis: GCRA rates, concurrency with leases, budgets,
the fair waiting queue, settlement; and the pure fair-scheduling decisions by tables."""

from __future__ import annotations

import math
import pickle
from datetime import datetime
from zoneinfo import ZoneInfo

import anyio
import pytest

from agentos.core.fairness import (
    AttainedService,
    QuotaExceeded,
    Waiter,
    burn_rate,
    day_window,
    fair_order,
    fair_score,
    fleet_metrics,
    pick,
)
from agentos.core.policy import ClassQuota, Limits
from agentos.governor.admission import FairGate, Governor
from agentos.store import Store
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio

NONE = Limits()


async def admit(
    store: Store,
    call: str,
    estimate: int,
    *,
    limits: Limits = NONE,
    agent_limits: Limits = NONE,
    agent: str = "a",
    max_wait_s: float = 0.0,
    lease_s: float = 30.0,
    score: float = 0.0,
    day: str = "2026-11-28",
) -> tuple[int, int, str]:
    r = await store.quotas.admit(
        quota_class="std",
        agent=agent,
        call=call,
        estimate=estimate,
        max_wait_s=max_wait_s,
        lease_s=lease_s,
        score=score,
        limits=limits,
        agent_limits=agent_limits,
        day=day,
        day_left_s=3600.0,
    )
    return r.status, r.ms, r.what


async def settle(
    store: Store, call: str, estimate: int, actual: int, *, limits: Limits = NONE, agent: str = "a"
) -> None:
    await store.quotas.settle(
        quota_class="std",
        agent=agent,
        call=call,
        estimate=estimate,
        actual=actual,
        limits=limits,
        agent_limits=NONE,
        day="2026-11-28",
        minute=0,
    )


# ---------------------------------------------------------------------- the Lua script


async def test_tokens_per_minute_allows_a_burst_then_paces(store: Store) -> None:
    lim = Limits(tokens_per_minute=600)  # 10 tokens/s, a burst of 10 s = 100 tokens
    assert (await admit(store, "c1", 60, limits=lim))[:2] == (1, 0)
    assert (await admit(store, "c2", 40, limits=lim))[:2] == (1, 0)
    status, retry_ms, what = await admit(store, "c3", 30, limits=lim, max_wait_s=1.0)
    assert (status, what) == (-1, "class tokensPerMinute")
    assert 2_900 <= retry_ms <= 3_100  # 30 tokens at 10/s
    # A caller willing to wait gets a reservation: its place in time.
    status, wait_ms, _ = await admit(store, "c4", 30, limits=lim, max_wait_s=60.0)
    assert status == 1
    assert 2_900 <= wait_ms <= 3_100
    # The next one queues behind that reservation.
    status, wait_ms, _ = await admit(store, "c5", 10, limits=lim, max_wait_s=60.0)
    assert status == 1
    assert 3_900 <= wait_ms <= 4_100


async def test_settling_returns_unused_tokens_to_the_bucket(store: Store) -> None:
    lim = Limits(tokens_per_minute=600)
    assert (await admit(store, "c1", 100, limits=lim))[0] == 1
    assert (await admit(store, "c2", 10, limits=lim))[0] == -1
    await settle(store, "c1", 100, 20, limits=lim)  # used 20 of the 100 estimated
    assert (await admit(store, "c2", 80, limits=lim))[:2] == (1, 0)
    usage = await store.quotas.usage({"std": "2026-11-28"})
    assert usage["std"].day_tokens == 20 + 80
    assert usage["std"].agent_day_tokens == {"a": 100}


async def test_agent_limit_binds_before_the_class_limit(store: Store) -> None:
    cls, per_agent = Limits(tokens_per_minute=6000), Limits(tokens_per_minute=60)
    assert (await admit(store, "c1", 10, limits=cls, agent_limits=per_agent))[0] == 1
    status, _, what = await admit(store, "c2", 10, limits=cls, agent_limits=per_agent)
    assert (status, what) == (-1, "agent tokensPerMinute")
    # Another agent of the class is not affected.
    assert (await admit(store, "c3", 10, limits=cls, agent_limits=per_agent, agent="b"))[0] == 1


async def test_concurrency_slots_queue_and_free(store: Store) -> None:
    lim = Limits(max_concurrent=1)
    assert (await admit(store, "c1", 10, limits=lim))[0] == 1
    status, poll_ms, what = await admit(store, "c2", 10, limits=lim, agent="b")
    assert (status, what) == (0, "class maxConcurrent")
    assert poll_ms > 0
    usage = (await store.quotas.usage({"std": "2026-11-28"}))["std"]
    assert usage.in_flight == {"a": 1}
    assert usage.queued == ["b"]
    await settle(store, "c1", 10, 10)
    assert (await admit(store, "c2", 10, limits=lim, agent="b"))[0] == 1


async def test_a_dead_holders_slot_returns_after_its_lease(store: Store) -> None:
    lim = Limits(max_concurrent=1)
    assert (await admit(store, "dead", 10, limits=lim, lease_s=0.3))[0] == 1  # never settled
    assert (await admit(store, "c2", 10, limits=lim, agent="b"))[0] == 0

    async def admitted() -> bool:
        return (await admit(store, "c2", 10, limits=lim, agent="b"))[0] == 1

    await wait_until(admitted, within=0.4, what="the dead holder's slot")


async def test_renewing_keeps_a_long_call_slot(store: Store) -> None:
    lim = Limits(max_concurrent=1)
    assert (await admit(store, "c1", 10, limits=lim, lease_s=0.3))[0] == 1
    renewals = 0

    async def renewed() -> bool:
        # Every 0.15 s, for one and a half leases.
        nonlocal renewals
        await store.quotas.renew([("c1", ("std", "a"))], lease_s=0.3)
        renewals += 1
        return renewals > 3

    await wait_until(renewed, what="four renewals", every=0.15)
    assert (await admit(store, "c2", 10, limits=lim, agent="b"))[0] == 0


async def test_waiting_queue_is_fair_not_first_come(store: Store) -> None:
    lim = Limits(max_concurrent=1)
    assert (await admit(store, "hold", 1, limits=lim))[0] == 1
    heavy = fair_score(50, attained=5000)
    quiet = fair_score(50, attained=10)
    urgent = fair_score(900, attained=99_999)
    assert (await admit(store, "h", 1, limits=lim, agent="heavy", score=heavy))[0] == 0
    assert (await admit(store, "q", 1, limits=lim, agent="quiet", score=quiet))[0] == 0
    assert (await admit(store, "u", 1, limits=lim, agent="urgent", score=urgent))[0] == 0
    await settle(store, "hold", 1, 1)
    # Strict priority first, even over a quiet agent; the heavy agent may not jump ahead.
    assert (await admit(store, "h", 1, limits=lim, agent="heavy", score=heavy))[0] == 0
    assert (await admit(store, "q", 1, limits=lim, agent="quiet", score=quiet))[0] == 0
    assert (await admit(store, "u", 1, limits=lim, agent="urgent", score=urgent))[0] == 1
    await settle(store, "u", 1, 1, agent="urgent")
    assert (await admit(store, "h", 1, limits=lim, agent="heavy", score=heavy))[0] == 0
    assert (await admit(store, "q", 1, limits=lim, agent="quiet", score=quiet))[0] == 1


async def test_budgets_refuse_at_once_until_the_day_ends(store: Store) -> None:
    lim = Limits(daily_tokens=1000)
    assert (await admit(store, "c1", 600, limits=lim))[0] == 1
    status, retry_ms, what = await admit(store, "c2", 600, limits=lim, max_wait_s=3600)
    assert (status, retry_ms, what) == (-2, 3_600_000, "class dailyTokens")
    assert (await admit(store, "c3", 400, limits=lim))[0] == 1
    # Another day has its own counter.
    assert (await admit(store, "c4", 600, limits=lim, day="2026-11-29"))[0] == 1


async def test_agent_seconds_budget(store: Store) -> None:
    lim = Limits(daily_agent_seconds=10)
    assert (await admit(store, "c1", 1, agent_limits=lim))[0] == 1
    await store.quotas.charge_seconds([("std", "a", "2026-11-28", 10.5)])
    assert (await admit(store, "c2", 1, agent_limits=lim))[:3:2] == (-2, "agent dailyAgentSeconds")
    assert (await admit(store, "c3", 1, agent_limits=lim, agent="b"))[0] == 1


async def test_a_charge_retried_with_its_op_id_counts_once(store: Store) -> None:
    charge = [("std", "a", "2026-11-28", 6.0), ("std", "b", "2026-11-28", 1.0)]
    for _ in range(3):  # the reply was lost twice; the daemon sends the same charge again
        await store.quotas.charge_seconds(charge, op_id="flush-1")
    await store.quotas.charge_seconds(charge, op_id="flush-2")
    usage = (await store.quotas.usage({"std": "2026-11-28"}))["std"]
    assert usage.day_seconds == 14.0
    assert usage.agent_day_seconds == {"a": 12.0, "b": 2.0}


# ---------------------------------------------------------------------- the governor


def governor_with(store: Store, limits: Limits, per_agent: Limits = NONE) -> Governor:
    g = Governor(store, daemon_id="d1", parallel=4)
    g.quotas = {
        "std": ClassQuota(
            name="std",
            policy="p",
            timezone="UTC",
            limits=limits,
            per_agent=per_agent,
            base=limits,
            base_per_agent=per_agent,
        )
    }
    return g


async def test_governor_raises_typed_quota_exceeded(store: Store) -> None:
    g = governor_with(store, Limits(tokens_per_minute=60))
    async with g.call(
        agent="a", quota_class="std", priority=50, estimate=lambda: 10, timeout_s=0
    ) as ticket:
        ticket.used(10)
    with pytest.raises(QuotaExceeded) as info:
        async with g.call(
            agent="a", quota_class="std", priority=50, estimate=lambda: 30, timeout_s=1
        ):
            pytest.fail("must not be admitted")
    e = info.value
    assert (e.kind, e.scope, e.limit, e.quota_class) == ("rate", "class", "tokensPerMinute", "std")
    assert 29 <= e.retry_after_s <= 31
    assert "retry after" in str(e)
    assert pickle.loads(pickle.dumps(e)).retry_after_s == e.retry_after_s


async def test_governor_settles_actual_tokens_even_when_the_call_fails(store: Store) -> None:
    g = governor_with(store, Limits(daily_tokens=10_000, max_concurrent=1))

    async def failing_call() -> None:
        async with g.call(
            agent="a", quota_class="std", priority=50, estimate=lambda: 500, timeout_s=1
        ) as ticket:
            ticket.start()
            ticket.used(120)
            raise RuntimeError("engine broke")

    with pytest.raises(RuntimeError):
        await failing_call()
    usage = (await store.quotas.usage({"std": datetime.now(ZoneInfo("UTC")).date().isoformat()}))[
        "std"
    ]
    assert usage.day_tokens == 120
    assert usage.in_flight == {}
    assert g.sample(slots_held=0, slots_total=1)["failed"] == 1


async def test_governor_concurrency_wait_times_out(store: Store) -> None:
    g = governor_with(store, Limits(max_concurrent=1))
    async with g.call(agent="a", quota_class="std", priority=50, estimate=lambda: 1, timeout_s=1):
        with pytest.raises(QuotaExceeded) as info:
            async with g.call(
                agent="b", quota_class="std", priority=50, estimate=lambda: 1, timeout_s=0.2
            ):
                pytest.fail("must not be admitted")
    assert info.value.kind == "concurrency"
    usage = (await store.quotas.usage({"std": "x"}))["std"]
    assert usage.queued == []  # gave up its place


async def test_ungoverned_class_touches_no_redis(store: Store) -> None:
    g = Governor(store, daemon_id="d1", parallel=1)
    estimated = []

    def estimate() -> int:
        estimated.append(1)
        return 1

    async with g.call(agent="a", quota_class="free", priority=1, estimate=estimate, timeout_s=0):
        pass
    assert estimated == []  # not even the estimate is computed


async def test_fair_gate_serves_priority_then_least_served() -> None:
    gate = FairGate(1)
    served: list[str] = []
    await gate.acquire(Waiter("holder", 0, 0, 0))

    async def wait(w: Waiter) -> None:
        await gate.acquire(w)
        served.append(w.name)
        gate.release()

    async with anyio.create_task_group() as tg:
        for w in (
            Waiter("busy", 50, 9000, 1),
            Waiter("quiet", 50, 10, 2),
            Waiter("vip", 100, 99999, 3),
            Waiter("low", 10, 0, 0),
        ):
            tg.start_soon(wait, w)
        await anyio.wait_all_tasks_blocked()  # all four queued at the gate
        gate.release()
    assert served == ["vip", "quiet", "busy", "low"]


async def test_fair_gate_cancelled_waiter_leaves_no_trace() -> None:
    gate = FairGate(1)
    await gate.acquire(Waiter("holder", 0, 0, 0))
    with anyio.move_on_after(0.05):
        await gate.acquire(Waiter("gone", 0, 0, 0))
    assert gate.waiting == []
    gate.release()
    assert gate.busy == 0


# ---------------------------------------------------------------------- pure decisions


@pytest.mark.parametrize(
    ("waiters", "expected"),
    [
        ([], []),
        ([Waiter("a", 50, 100, 1), Waiter("b", 50, 5, 2)], ["b", "a"]),  # least service
        ([Waiter("a", 50, 100, 1), Waiter("b", 60, 500, 2)], ["b", "a"]),  # priority is strict
        ([Waiter("a", 50, 5, 2), Waiter("b", 50, 5, 1)], ["b", "a"]),  # then longest waiting
        ([Waiter("b", 50, 5, 1), Waiter("a", 50, 5, 1)], ["a", "b"]),  # then by name
        ([Waiter("a", 0, 0, 0), Waiter("b", 1000, 1e15, 9)], ["b", "a"]),
    ],
)
def test_fair_order(waiters: list[Waiter], expected: list[str]) -> None:
    assert [w.name for w in fair_order(waiters)] == expected
    first = pick(waiters)
    assert (first.name if first else None) == (expected[0] if expected else None)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((50, 0.0), (50, 1.0)),
        ((60, 1e12), (50, 0.0)),
        ((1000, 1e15), (999, 0.0)),
        ((0, 0.0), (0, 0.5)),
    ],
)
def test_fair_score_orders_like_fair_order(a: tuple[int, float], b: tuple[int, float]) -> None:
    assert fair_score(*a) < fair_score(*b)


def test_attained_service_decays_with_its_half_life() -> None:
    s = AttainedService(half_life_s=10)
    s.add("a", 1000, now=0)
    assert s.value("a", 0) == 1000
    assert math.isclose(s.value("a", 10), 500)
    s.add("a", 500, now=10)
    assert math.isclose(s.value("a", 20), 500)
    assert s.value("nobody", 5) == 0
    s.forget("a")
    assert s.value("a", 20) == 0


def test_day_window_follows_the_policy_timezone_and_dst() -> None:
    at = datetime(2026, 3, 29, 0, 30, tzinfo=ZoneInfo("Europe/Paris")).timestamp()
    day, left = day_window("Europe/Paris", at)
    assert day == "2026-03-29"
    assert math.isclose(left, 22.5 * 3600)
    day, left = day_window("UTC", datetime(2026, 11, 28, 23, 0, tzinfo=ZoneInfo("UTC")).timestamp())
    assert day == "2026-11-28"
    assert math.isclose(left, 3600)


def test_fleet_metrics_merge_daemons() -> None:
    reports = [
        {"waits": [0.0] * 90, "calls": 90, "throttled": 9, "failed": 0, "slots_held": 1,
         "slots_total": 4},
        {"waits": [3.0] * 10, "calls": 10, "throttled": 1, "failed": 5, "slots_held": 3,
         "slots_total": 4},
    ]  # fmt: skip
    m = fleet_metrics(reports, [0.5, 2.0])
    assert m == {
        "queue_wait_p95_s": 3.0,
        "throttle_rate": 0.1,
        "error_rate": 0.05,
        "slot_utilisation": 0.5,
        "budget_burn_rate": 2.0,
    }
    assert fleet_metrics([]) == {}  # no data: rules on these metrics do not fire


def test_burn_rate() -> None:
    assert burn_rate(500, 1000, day_left_s=43_200) == 1.0  # half spent at noon
    assert burn_rate(500, 1000, day_left_s=86_000) == 12.0  # the first hour counts as one hour
