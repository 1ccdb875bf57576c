"""Activation from the fleet's due-time index: the daemon's way to agents no daemon holds.

A waiting agent has no runner, lease or timer anywhere; it is an entry in the due index
in Redis (``agentos.store.waits``): due at its deadline, or now once an answer or event
came. Every daemon runs one :class:`Activator`. It reads the index (one command per
shard, whatever the number of agents in it), sleeps until the earliest due time, a
``due`` signal or its poll period, and claims what is due while it has room: a claim is
atomic, so one daemon starts each agent, and it expires, so the agent is due again if
the claimer dies. The daemon's reconcile leaves agents of the index alone (it does not
even look at their leases): :attr:`Activator.parked` is that set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Container, Mapping

import anyio

from agentos.core.policy import ClassQuota
from agentos.core.waits import Resolution, WaitKind
from agentos.store import Store, StoreError

__all__ = ["Activator", "budgets_changed"]

log = logging.getLogger("agentos.activation")


class Activator:
    """Watches the due index and starts what is due (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float],
        poll_s: float,
        claim_s: float,
        room: Callable[[], int],
        running: Callable[[], Container[str]],
        desired: Callable[[], Mapping[str, str]],
        start: Callable[[list[tuple[str, str]]], Awaitable[None]],
    ) -> None:
        self.store = store
        self.clock = clock
        self.poll_s = poll_s
        self.claim_s = claim_s
        self._room = room
        self._running = running
        self._desired = desired
        self._start = start
        self.due: dict[str, float] = {}  # agent -> due time, as last read
        self.parked: set[str] = set()  # agents reconcile must leave alone
        self.loaded = False  # the index was read once: reconcile may start agents
        self._kick = anyio.Event()

    def nudge(self) -> None:
        """Something became due (an answer, an event): look now."""
        self._kick.set()

    def park(self, name: str) -> None:
        """An agent was parked (seen before the index is read again)."""
        self.parked.add(name)
        if self.due.setdefault(name, math.inf) <= self.clock():
            # Answered while its runner here was still ending: activate it now.
            self.nudge()

    @property
    def next_due_at(self) -> float:
        """The earliest due time in the index (inf when none)."""
        return min(self.due.values(), default=math.inf)

    async def run(self) -> None:
        """Until cancelled: read the index, activate what is due, sleep until the next."""
        delay = 0.1
        while True:
            self._kick = anyio.Event()
            try:
                await self.pass_once()
                delay = 0.1
                wait = min(self.poll_s, max(0.0, self.next_due_at - self.clock()))
            except StoreError as e:
                log.warning("due index: %s; retrying in %.1fs", e, delay)
                wait, delay = delay, min(delay * 2, self.poll_s)
            with anyio.move_on_after(wait):
                await self._kick.wait()

    async def load(self) -> None:
        """Read the index (who waits, until when) without activating anything."""
        self.due = await self.store.due_scan()
        self.parked = set(self.due)
        self.loaded = True

    async def pass_once(self) -> list[str]:
        """Read the index and start the due agents this daemon has room for; returns them."""
        await self.load()
        now = self.clock()
        running = self._running()
        desired = self._desired()
        gone = [n for n in self.due if n not in desired and n not in running]
        if gone:  # deleted agents' waits, once Redis confirms they have no spec
            specs = await self.store.agent_specs_of(gone)
            for name in gone:
                if name not in specs:
                    await self.store.purge_waits(name)
                    self.due.pop(name, None)
                    self.parked.discard(name)
        ready = sorted((at, n) for n, at in self.due.items() if at <= now)
        candidates: list[str] = []
        for _, name in ready:
            if name in running:
                # Running here: resumed already, its entry is a leftover (removed only if
                # no wait is parked for it).
                await self.store.wait_clear(name, "")
            elif name in desired:
                candidates.append(name)
        candidates = candidates[: max(0, self._room())]
        claimed = await self.store.due_claim(candidates, now=now, claim_s=self.claim_s)
        if claimed:
            log.info("activating %d due agent(s)", len(claimed))
            await self._start([(n, desired[n]) for n in claimed])
        return claimed

    async def release_budgets(self, classes: set[str]) -> int:
        """The daily budgets of ``classes`` changed: their budget waits are due now (a task
        still over its budget parks again). Returns how many were released."""
        if not classes or not self.parked:
            return 0
        now = self.clock()
        released = 0
        for w in await self.store.pending_waits(sorted(self.parked)):
            if w.kind is not WaitKind.BUDGET or w.quota_class not in classes or w.answer:
                continue
            # One answer id per park: daemons that all see the change release it once.
            resolution = Resolution("released", None, "policy", now)
            done = await self.store.wait_answer(
                w, resolution, answer_id=f"policy:{w.park_id}", now=now
            )
            released += done == 1
        if released:
            log.info("%d budget wait(s) released by a policy change", released)
            self.nudge()
        return released


def budgets_changed(
    before: Mapping[str, ClassQuota], after: Mapping[str, ClassQuota], classes: set[str]
) -> set[str]:
    """The classes of ``classes`` whose daily budgets (class or per agent) differ."""

    def budgets(q: ClassQuota | None) -> tuple[object, ...]:
        if q is None:
            return ()
        return tuple((lim.daily_tokens, lim.daily_agent_seconds) for lim in (q.limits, q.per_agent))

    return {c for c in classes if budgets(before.get(c)) != budgets(after.get(c))}
