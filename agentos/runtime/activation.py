"""Activation from the fleet's due-time index: how a daemon finds the agents it should run.

An agent no daemon holds (hibernated, waiting, never started) has no runner, lease or
timer anywhere; it is an entry in the due index in Redis (``agentos.store.waits``): due
at its next trigger fire or wait deadline, or now once a message, a wake, an answer or an
apply came. Every daemon runs one :class:`Activator`. It reads the head of each shard
(one command per shard, whatever the size of the fleet), sleeps until the earliest due
time, a ``due`` signal or its poll period, and claims what is due while it has room: a
claim is atomic, so one daemon starts each agent, and it expires, so the agent is due
again if the claimer dies before it holds the agent. Nothing here costs anything per
released agent: a fleet of 100,000 hibernated agents is 16 reads per poll.

A daemon claims only the agents it may host (:class:`~agentos.runtime.activation_placer.Placer`,
with pinned agents outside the fair share). Agents no live daemon may host stay due (a
client shows them ``Unschedulable``); at most :data:`agentos.store.waits.DUE_HEAD` of
them per shard are read each pass, so thousands of those could hide agents due behind
them until a daemon that matches joins. Claimed agents are started by
:class:`~agentos.runtime.activation_start.Starter` (leases, specs, models, runners): the
daemon only decides when, and supervises what runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import anyio

from agentos.core.policy import ClassQuota
from agentos.core.spec import AgentResource
from agentos.core.waits import Resolution, WaitKind
from agentos.runtime.activation_placer import Judged, Placer
from agentos.store import Store, StoreError

__all__ = ["UNBOUNDED", "Activator", "Judged", "Placer", "Room", "budgets_changed"]

UNBOUNDED = 1_000_000  # room of a daemon with no limit

log = logging.getLogger("agentos.activation")


@dataclass(frozen=True, slots=True)
class Room:
    """How many more agents a daemon may take now: ``shared`` of those any live daemon
    may host (its fair share), ``total`` of any kind (``--max-agents``)."""

    shared: int
    total: int


class _Held(Protocol):
    @property
    def ending(self) -> bool: ...

    def nudge(self, cmd: str) -> None: ...


class Activator:
    """Watches the due index and starts what is due (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float],
        poll_s: float,
        claim_s: float,
        room: Callable[[int], Awaitable[Room]],
        running: Mapping[str, _Held],
        start: Callable[
            [list[tuple[str, str]], dict[str, float], dict[str, AgentResource]], Awaitable[None]
        ],
        placer: Placer | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.poll_s = poll_s
        self.claim_s = claim_s
        self._room = room
        self._running = running
        self._start = start
        self.placer = placer
        self.due: dict[str, float] = {}  # the head of the index, as last read
        # How many of it were due, not held here and hostable here (as far as known).
        self.backlog = 0
        self.full = False  # the last pass had due agents and no room for them
        # ``room(due)``: how many more agents the daemon may take with ``due`` waiting.
        self.loaded = False  # read at least once
        self._kick = anyio.Event()

    def nudge(self) -> None:
        """Something became due (a message, an answer, an apply, room freed): look now."""
        self._kick.set()

    @property
    def next_due_at(self) -> float:
        """The earliest due time of the index as last read (inf when none)."""
        return min(self.due.values(), default=math.inf)

    async def run(self) -> None:
        """Until cancelled: read the index, activate what is due, sleep until the next."""
        delay = 0.1
        while True:
            self._kick = anyio.Event()
            try:
                claimed = await self.pass_once()
                delay = 0.1
                # More may be due than one read showed: go on while some were taken.
                wait = 0.0 if claimed else self.poll_s
                if not self.full:  # with no room, what is due already must wait for room
                    wait = min(wait, max(0.0, self.next_due_at - self.clock()))
            except StoreError as e:
                log.warning("due index: %s; retrying in %.1fs", e, delay)
                wait, delay = delay, min(delay * 2, self.poll_s)
            with anyio.move_on_after(wait):
                await self._kick.wait()

    async def pass_once(self) -> list[str]:
        """Read the index and start the due agents this daemon has room for; returns them."""
        now = self.clock()
        due = await self.store.waits.due_head(now=now)
        self.loaded = True
        placer = self.placer
        looked = placer is not None and placer.rejects
        if placer is not None and looked:
            # Agents we may not host are not ours to wait for (nor to be woken for).
            await placer.refresh()
            due = {n: at for n, at in due.items() if not placer.rejected(n)}
        self.due = due
        candidates: list[str] = []
        for _, name in sorted((at, n) for n, at in self.due.items() if at <= now):
            held = self._running.get(name)
            if held is None:
                candidates.append(name)
                continue
            if held.ending:  # released it just now: due for whoever has room, once it ends
                continue
            # Held here already (a message sent while we took it, a respec): the runner
            # looks at its inbox; the entry goes unless a wait is parked for the agent.
            held.nudge("message")
            await self.store.waits.clear(name, "")
            self.due.pop(name, None)
        self.backlog = len(candidates)
        self.full = False
        if not candidates:
            return []
        index = await self.store.specs.index_of(candidates)
        for name in candidates:
            if name not in index:  # deleted: its wait and due entry go
                await self.store.waits.purge(name)
                self.due.pop(name, None)
        live = [n for n in candidates if n in index]
        judged = Judged(live)
        if placer is not None and live:
            if not looked:
                await placer.refresh()
            judged = await placer.judge({n: index[n][0] for n in live})
            for name in set(live) - set(judged.hosts):
                self.due.pop(name, None)
            self.backlog = len(judged.hosts)
        if not judged.hosts:
            return []
        room = await self._room(len(judged.hosts))
        # Pinned agents (only some daemons may host them) are outside the fair share.
        shared = [n for n in judged.hosts if n not in judged.pinned][: max(0, room.shared)]
        take = set(shared) | judged.pinned
        live = [n for n in judged.hosts if n in take][: max(0, room.total)]
        if not live:
            # Until room frees up (a runner ends, a peer joins or leaves: a nudge) or the
            # next poll; not at once: that would read the index in a loop.
            self.full = True
            return []
        claimed: list[str] = await self.store.waits.due_claim(live, now=now, claim_s=self.claim_s)
        if not claimed:
            return []
        for name in claimed:
            self.due[name] = now + self.claim_s
        log.debug("activating %d due agent(s)", len(claimed))
        claimed.sort(key=lambda n: (-index[n][1], n))
        claims = dict.fromkeys(claimed, now + self.claim_s)
        if placer is not None:
            placer.started(claimed)
        resources = {n: judged.resources[n] for n in claimed if n in judged.resources}
        await self._start([(n, index[n][0]) for n in claimed], claims, resources)
        return claimed

    async def release_budgets(self, classes: set[str]) -> int:
        """The daily budgets of ``classes`` changed: their budget waits are due now (a task
        still over its budget parks again). Returns how many were released."""
        if not classes:
            return 0
        now = self.clock()
        released = 0
        for w in await self.store.waits.pending():
            if w.kind is not WaitKind.BUDGET or w.quota_class not in classes or w.answer:
                continue
            # One answer id per park: daemons that all see the change release it once.
            resolution = Resolution("released", None, "policy", now)
            done = await self.store.waits.answer(
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
