"""The slot arbiter on its own: fair order, one victim per waiter, declines, hand-overs.

Holders here are plain objects with the fields the arbiter reads; the engine is the
real sim engine with two slots. Evictions are performed by the test, so each step of
the protocol (asked, released, declined) is explicit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
import pytest

from agentos.engine import SimEngine
from agentos.runtime.slots import SlotArbiter

pytestmark = pytest.mark.anyio


@dataclass
class FakeHolder:
    name: str
    priority: int = 50
    last_activity: float = 0.0
    evictable: bool = True
    asked: list[str] = field(default_factory=list)

    def evict(self, why: str) -> None:
        self.asked.append(why)


async def _settle() -> None:
    for _ in range(5):
        await anyio.lowlevel.checkpoint()


def _arbiter(*holders: FakeHolder) -> tuple[SlotArbiter, SimEngine]:
    engine = SimEngine(slots=2)
    arbiter = SlotArbiter(engine)
    for h in holders:
        arbiter.register(h)
    return arbiter, engine


async def test_a_free_slot_is_taken_at_once() -> None:
    a = FakeHolder("a")
    arbiter, engine = _arbiter(a)
    await arbiter.acquire(a)
    assert engine.has_session("a")
    assert arbiter.evictions == 0


async def test_one_victim_per_waiter_and_the_slot_goes_to_the_waiter() -> None:
    low, high, new = FakeHolder("low", 10), FakeHolder("high", 90), FakeHolder("new", 50)
    arbiter, engine = _arbiter(low, high, new)
    await arbiter.acquire(low)
    await arbiter.acquire(high)
    async with anyio.create_task_group() as tg:
        tg.start_soon(arbiter.acquire, new)
        await _settle()
        assert low.asked == ["slot needed by new"]
        assert high.asked == []
        arbiter.released()  # nothing freed yet: no second victim
        await _settle()
        assert arbiter.evictions == 1
        engine.close_session("low")  # low hibernates
        arbiter.released()
        arbiter.eviction_over("low")
    assert engine.has_session("new")


async def test_a_victim_that_declines_is_replaced() -> None:
    a, b, new = FakeHolder("a", 10), FakeHolder("b", 20), FakeHolder("new")
    arbiter, engine = _arbiter(a, b, new)
    await arbiter.acquire(a)
    await arbiter.acquire(b)
    async with anyio.create_task_group() as tg:
        tg.start_soon(arbiter.acquire, new)
        await _settle()
        assert a.asked
        a.evictable = False  # it went busy instead
        arbiter.eviction_over("a")
        await _settle()
        assert b.asked == ["slot needed by new"]
        engine.close_session("b")
        arbiter.released()
    assert engine.has_session("new")
    assert arbiter.evictions == 2


async def test_waiters_are_served_by_priority() -> None:
    a, b = FakeHolder("a", evictable=False), FakeHolder("b", evictable=False)
    lo, hi = FakeHolder("lo", 10), FakeHolder("hi", 90)
    arbiter, engine = _arbiter(a, b, lo, hi)
    await arbiter.acquire(a)
    await arbiter.acquire(b)
    order: list[str] = []

    async def wait(h: FakeHolder) -> None:
        await arbiter.acquire(h)
        order.append(h.name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait, lo)
        await _settle()
        tg.start_soon(wait, hi)
        await _settle()
        assert arbiter.evictions == 0  # nobody is idle: nobody is asked
        engine.close_session("a")
        arbiter.released()
        await _settle()
        assert order == ["hi"]
        engine.close_session("b")
        arbiter.released()
    assert order == ["hi", "lo"]


async def test_an_eviction_in_flight_is_handed_to_the_next_waiter() -> None:
    idle, busy = FakeHolder("idle", 10), FakeHolder("busy", evictable=False)
    w1, w2 = FakeHolder("w1", 60), FakeHolder("w2", 50)
    arbiter, engine = _arbiter(idle, busy, w1, w2)
    await arbiter.acquire(idle)
    await arbiter.acquire(busy)
    async with anyio.create_task_group() as tg:
        tg.start_soon(arbiter.acquire, w1)
        await _settle()
        assert idle.asked  # for w1
        tg.start_soon(arbiter.acquire, w2)
        await _settle()
        engine.close_session("busy")  # a slot frees elsewhere: w1 takes it
        arbiter.released()
        await _settle()
        assert engine.has_session("w1")
        engine.close_session("idle")  # the eviction asked for w1 now serves w2
        arbiter.released()
        arbiter.eviction_over("idle")
    assert engine.has_session("w2")
    assert arbiter.evictions == 1


async def test_a_cancelled_wait_leaves_no_trace() -> None:
    a, b, new = FakeHolder("a", evictable=False), FakeHolder("b", evictable=False), FakeHolder("n")
    arbiter, engine = _arbiter(a, b, new)
    await arbiter.acquire(a)
    await arbiter.acquire(b)
    with anyio.move_on_after(0.05):
        await arbiter.acquire(new)
    assert arbiter.waiting == []
    engine.close_session("a")
    arbiter.released()
    assert not engine.has_session("n")
