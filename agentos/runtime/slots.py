"""Engine slots, handed out fairly and without polling; idle holders are swapped out on demand.

An engine holds a fixed number of sessions (llama.cpp sequences, server slots). When a
task needs one and none is free, the arbiter asks exactly one idle holder to give its
slot back (hibernate) for each waiter, and waits for the slot to be released; only if
that holder declines (it went busy, or its hibernation failed) is another one asked.
Waiters are served in the governor's fair order: strict priority, then least attained
service, then longest waiting. The victim is the idle holder of lowest priority, most
attained service, least recently active (:func:`agentos.core.hibernation.choose_victim`).

Holders are seen through the :class:`Holder` protocol, so this module knows nothing
of runners; everything is driven by events (a release, a holder going idle, an
eviction ending), never by a timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from agentos.core.fairness import Waiter, fair_order, pick
from agentos.core.hibernation import SlotHolder, choose_victim
from agentos.engine.base import Engine, NoFreeSlot

__all__ = ["Holder", "SlotArbiter"]


class Holder(Protocol):
    """An agent that may hold an engine session, as the arbiter sees it."""

    @property
    def name(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def last_activity(self) -> float: ...
    @property
    def evictable(self) -> bool:
        """Idle with nothing to do now: may be asked to give its slot back."""
        ...

    def evict(self, why: str) -> None:
        """Give the slot back soon (hibernate), then call :meth:`SlotArbiter.eviction_over`."""
        ...


@dataclass(slots=True)
class _Wait:
    waiter: Waiter
    granted: anyio.Event = field(default_factory=anyio.Event)
    victim: str | None = None


class SlotArbiter:
    """Opens engine sessions for holders, fairly, asking idle holders to make room."""

    def __init__(self, engine: Engine, attained: Callable[[str], float] | None = None) -> None:
        self.engine = engine
        self._attained = attained or (lambda name: 0.0)
        self.holders: dict[str, Holder] = {}
        self._waits: dict[str, _Wait] = {}
        # victim -> the waiter it makes room for (None: that waiter got another slot; the
        # eviction still frees one, for the next waiter without a victim)
        self._evicting: dict[str, str | None] = {}
        self.evictions = 0  # how many holders were asked to give their slot back

    def register(self, holder: Holder) -> None:
        """Make ``holder`` known (a candidate victim once it holds a session)."""
        self.holders[holder.name] = holder

    def unregister(self, name: str) -> None:
        """Forget a holder that stopped (its session must already be closed)."""
        self.holders.pop(name, None)
        self.eviction_over(name)

    @property
    def waiting(self) -> list[str]:
        """Names of the holders waiting for a slot now."""
        return list(self._waits)

    async def acquire(
        self,
        holder: Holder,
        *,
        slow_after_s: float = 5.0,
        on_slow: Callable[[], object] | None = None,
    ) -> None:
        """Open ``holder``'s session, waiting for a slot as long as it takes.

        Calls ``on_slow()`` once if the wait passes ``slow_after_s``. Cancelling the
        wait leaves no trace (a slot granted meanwhile is passed on).
        """
        name = holder.name
        if self.engine.has_session(name):
            return
        if not self._waits:
            try:
                self.engine.open_session(name)
                return
            except NoFreeSlot:
                pass
        wait = _Wait(Waiter(name, holder.priority, self._attained(name), time.monotonic()))
        self._waits[name] = wait
        try:
            self._serve()
            with anyio.move_on_after(slow_after_s):
                await wait.granted.wait()
            if not wait.granted.is_set():
                if on_slow is not None:
                    on_slow()
                await wait.granted.wait()
        except BaseException:
            if self._waits.get(name) is wait:
                del self._waits[name]
            elif wait.granted.is_set() and self.engine.has_session(name):
                self.engine.close_session(name)  # granted as we were cancelled: pass it on
            self._serve()
            raise

    def released(self) -> None:
        """A session was closed: serve the fairest waiter."""
        self._serve()

    def holder_idle(self) -> None:
        """A holder finished its task: it may now be asked to make room."""
        if self._waits:
            self._serve()

    def eviction_over(self, name: str) -> None:
        """``name`` is done with the eviction it was asked for (hibernated or not)."""
        self._evicting.pop(name, None)
        for wait in self._waits.values():
            if wait.victim == name:
                wait.victim = None  # declined or failed: ask someone else
        self._serve()

    def _serve(self) -> None:
        while self._waits:
            chosen = pick([w.waiter for w in self._waits.values()])
            assert chosen is not None
            try:
                self.engine.open_session(chosen.name)
            except NoFreeSlot:
                break
            wait = self._waits.pop(chosen.name)
            if wait.victim is not None and wait.victim in self._evicting:
                self._evicting[wait.victim] = None  # in flight: it frees a slot for another
            wait.granted.set()
        self._ask_victims()

    def _ask_victims(self) -> None:
        """One victim per waiter that has none, in the waiters' fair order."""
        by_name = {w.waiter.name: w for w in self._waits.values()}
        for waiter in fair_order([w.waiter for w in self._waits.values()]):
            wait = by_name[waiter.name]
            if wait.victim is not None:
                continue
            orphan = next((v for v, w in self._evicting.items() if w is None), None)
            if orphan is not None:
                wait.victim = orphan
                self._evicting[orphan] = wait.waiter.name
                continue
            victim = self._choose(wait.waiter.name)
            if victim is None:
                return
            wait.victim = victim.name
            self._evicting[victim.name] = wait.waiter.name
            self.evictions += 1
            victim.evict(f"slot needed by {wait.waiter.name}")

    def _choose(self, requester: str) -> Holder | None:
        candidates = [
            SlotHolder(
                h.name,
                h.priority,
                h.last_activity,
                idle=h.evictable and h.name not in self._evicting,
                attained=self._attained(h.name),
            )
            for h in self.holders.values()
            if self.engine.has_session(h.name) and h.name not in self._waits
        ]
        victim = choose_victim(candidates, exclude=requester)
        return None if victim is None else self.holders[victim]
