"""Admission of every inference call: quotas in Redis, then a fair turn at the local engine.

One :class:`Governor` per daemon. Before an agent's ``ctx.llm`` call reaches the engine,
:meth:`Governor.call`:

1. admits it against its quota class and its agent (``Store.quota_admit_many``: tokens
   per minute, concurrency, daily budgets, on the server's clock, shared by every
   daemon; the calls of a class that ask in the same event-loop tick share one round
   trip).
   A rate limit reserves the call's place and the caller sleeps until then, unless that
   would take longer than its timeout (then :class:`QuotaExceeded` with retry-after); a
   full class queues the caller fairly across daemons; a spent budget refuses at once;
2. waits for a turn at this daemon's engine (:class:`FairGate`: strict priority, then
   least attained service), so a busy agent cannot starve a quiet one;
3. after the call, settles the estimate it was admitted with against the tokens the
   engine really counted, and frees the slot (also when the call failed or was
   cancelled: a call cancelled while it waits for its rate or its turn is refunded).
   The daemon renews the leases of admitted calls' slots (:meth:`renew`), waiting or
   running; a daemon that dies mid-call loses its slots when their leases run out.

It also keeps the samples the policy evaluator turns into fleet metrics (queue wait,
throttles, errors) and publishes them. Classes without limits cost no Redis round trip.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from agentos.core.fairness import (
    AttainedService,
    QuotaExceeded,
    Waiter,
    day_window,
    fair_score,
    pick,
)
from agentos.core.policy import ClassQuota, base_quotas
from agentos.governor.evaluator import stored_policies
from agentos.store import AdmitReply, AdmitRequest, Store, StoreError
from agentos.telemetry import Telemetry

__all__ = ["FairGate", "Governor", "Ticket"]

log = logging.getLogger("agentos.governor")

_KINDS = {-1: "rate", -2: "budget"}
_MAX_SAMPLES = 2048


class FairGate:
    """At most ``parallel`` holders; waiters are let in by :func:`pick`, not by arrival."""

    def __init__(self, parallel: int) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.parallel = parallel
        self.busy = 0
        self._waiting: dict[int, tuple[Waiter, anyio.Event]] = {}
        self._next_id = 0

    @property
    def waiting(self) -> list[Waiter]:
        """Who waits now (any order)."""
        return [w for w, _ in self._waiting.values()]

    async def acquire(self, waiter: Waiter) -> None:
        """Wait for a turn. Cancellation while waiting leaves no trace."""
        if self.busy < self.parallel and not self._waiting:
            self.busy += 1
            return
        ticket = self._next_id
        self._next_id += 1
        event = anyio.Event()
        self._waiting[ticket] = (waiter, event)
        try:
            await event.wait()
        except BaseException:
            if self._waiting.pop(ticket, None) is None:
                self.release()  # the turn was handed to us as we were cancelled: pass it on
            raise

    def release(self) -> None:
        """End a turn and hand it to the fairest waiter."""
        self.busy -= 1
        while self.busy < self.parallel and self._waiting:
            chosen = pick(self.waiting)
            assert chosen is not None
            ticket = next(t for t, (w, _) in self._waiting.items() if w is chosen)
            _, event = self._waiting.pop(ticket)
            self.busy += 1
            event.set()


@dataclass(slots=True)
class _Batch:
    """Admission requests of one class collected during one event-loop tick."""

    requests: list[AdmitRequest]
    replies: list[AdmitReply] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None


class Ticket:
    """One admitted call, as the SDK sees it: ``start()`` when the engine begins,
    ``used(tokens)`` with what the engine counted."""

    __slots__ = ("actual", "estimate", "started_at")

    def __init__(self, estimate: int) -> None:
        self.estimate = estimate
        self.actual: int | None = None
        self.started_at: float | None = None

    def start(self) -> None:
        """The engine starts on the call now (the queue wait ends here)."""
        self.started_at = time.monotonic()

    def used(self, tokens: int) -> None:
        """The call used ``tokens`` (input + output), as the engine counted them."""
        self.actual = (self.actual or 0) + max(0, int(tokens))


def _governed(q: ClassQuota) -> bool:
    return any(
        v is not None
        for lim in (q.limits, q.per_agent)
        for v in (
            lim.tokens_per_minute,
            lim.max_concurrent,
            lim.daily_tokens,
            lim.daily_agent_seconds,
        )
    )


class Governor:
    """Quota admission and fair engine turns for the agents of one daemon."""

    def __init__(
        self,
        store: Store,
        *,
        daemon_id: str,
        parallel: int,
        slot_lease_s: float = 30.0,
        half_life_s: float = 60.0,
        window_s: float = 60.0,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.daemon_id = daemon_id
        self.slot_lease_s = slot_lease_s
        self.window_s = window_s
        self.clock = clock
        self.telemetry = telemetry or Telemetry.disabled()
        self.quotas: dict[str, ClassQuota] = {}
        self.attained = AttainedService(half_life_s)
        self.gate = FairGate(parallel)
        # One gate per model the daemon serves: each engine works on its own calls.
        self.gates: dict[str, FairGate] = {"default": self.gate}
        self.in_flight: dict[str, tuple[str, str]] = {}  # call id -> (class, agent), admitted
        self._open: dict[tuple[str, str], _Batch] = {}  # (class, day) -> batch being collected
        # (time, queue wait s, throttled, failed) of recent calls, for fleet metrics
        self._samples: deque[tuple[float, float, bool, bool]] = deque(maxlen=_MAX_SAMPLES)

    # ------------------------------------------------------------------ limits

    async def refresh(self) -> set[str]:
        """Load the effective limits (or, before any evaluator ran, the declared ones).

        Returns the classes whose limits changed (their parked tasks may be admitted now).
        """
        effective = await self.store.quotas.effective()
        if effective is None:
            effective = base_quotas(stored_policies(await self.store.specs.policies()))
        changed = (
            {
                c
                for c in effective.keys() | self.quotas.keys()
                if effective.get(c) != self.quotas.get(c)
            }
            if self.quotas
            else set()
        )
        self.quotas = effective
        return changed

    def quota_of(self, quota_class: str) -> ClassQuota | None:
        """The class's effective quota, or None when the class is ungoverned."""
        q = self.quotas.get(quota_class)
        return q if q is not None and _governed(q) else None

    def add_model(self, model: str, parallel: int) -> None:
        """Give ``model``'s engine its own fair gate of ``parallel`` turns."""
        self.gates.setdefault(model, FairGate(max(1, parallel)))

    # ------------------------------------------------------------------ calls

    @asynccontextmanager
    async def call(
        self,
        *,
        agent: str,
        quota_class: str,
        priority: int,
        estimate: Callable[[], int],
        timeout_s: float | None,
        model: str = "default",
    ) -> AsyncIterator[Ticket]:
        """Admit one inference call to ``model``; the body runs it.

        Raises :class:`QuotaExceeded`."""
        gate = self.gates.get(model, self.gate)
        entered = time.monotonic()
        quota = self.quota_of(quota_class)
        ticket = Ticket(estimate() if quota is not None else 0)
        call_id = uuid.uuid4().hex[:12]
        throttled = False
        admitted = False
        failed = False
        try:
            if quota is not None:
                pace_s, queued = await self._admit(
                    quota, agent, priority, call_id, ticket.estimate, timeout_s
                )
                # Admitted: the estimate is charged and a concurrency slot held from here
                # on. A cancel in the rate wait or the local queue settles (refunds) it,
                # and the slot's lease is renewed while the call waits, not only while
                # it runs: a queued call's slot must not lapse to another daemon's call.
                admitted = True
                throttled = queued or pace_s > 0
                self.in_flight[call_id] = (quota_class, agent)
                if pace_s > 0:
                    await anyio.sleep(pace_s)
            await gate.acquire(
                Waiter(agent, priority, self.attained.value(agent, self.clock()), entered)
            )
            try:
                yield ticket
            except BaseException as e:
                failed = not isinstance(e, anyio.get_cancelled_exc_class())
                raise
            finally:
                gate.release()
        except QuotaExceeded:
            throttled = True
            raise
        finally:
            started = ticket.started_at if ticket.started_at is not None else time.monotonic()
            self._samples.append((self.clock(), started - entered, throttled, failed))
            if throttled:
                self.telemetry.throttles.add(1, {"agentos.quota.class": quota_class})
            self.in_flight.pop(call_id, None)
            actual = ticket.actual or 0
            self.attained.add(agent, actual, self.clock())
            if admitted and quota is not None:
                with anyio.CancelScope(shield=True):
                    await self._settle(quota, agent, call_id, ticket.estimate, actual)

    async def _admit(
        self,
        quota: ClassQuota,
        agent: str,
        priority: int,
        call_id: str,
        estimate: int,
        timeout_s: float | None,
    ) -> tuple[float, bool]:
        """Wait for admission (a fair place in the class's queue); returns how long the
        call must still wait for its rate (seconds, 0: go now) and whether it had to
        queue. The caller waits for its rate as an admitted call: its estimate is
        charged already."""
        started = time.monotonic()
        limit_s = math.inf if timeout_s is None else max(0.0, timeout_s)
        queued = was_queued = False
        try:
            while True:
                now = self.clock()
                day, left = day_window(quota.timezone, now)
                waited = time.monotonic() - started
                reply = await self._submit(
                    quota,
                    day,
                    left,
                    AdmitRequest(
                        agent,
                        call_id,
                        estimate,
                        min(limit_s - waited, 86_400.0),
                        fair_score(priority, self.attained.value(agent, now)),
                        quota.per_agent,
                    ),
                )
                if reply.status == 1:
                    queued = False
                    return max(0, reply.ms) / 1000, was_queued
                if reply.status == 0:
                    queued = was_queued = True
                    if time.monotonic() - started >= limit_s:
                        raise self._exceeded("concurrency", reply.what, quota, agent, 1.0)
                    await anyio.sleep(reply.ms / 1000)
                    continue
                queued = False
                raise self._exceeded(
                    _KINDS.get(reply.status, "rate"), reply.what, quota, agent, reply.ms / 1000
                )
        finally:
            if queued:
                # Without Redis the queue entry expires on its own.
                with anyio.CancelScope(shield=True), contextlib.suppress(StoreError):
                    await self.store.quotas.unqueue(
                        quota_class=quota.name, agent=agent, call=call_id
                    )

    async def _submit(
        self, quota: ClassQuota, day: str, left: float, request: AdmitRequest
    ) -> AdmitReply:
        """Ask Redis about ``request``, batched with every other call of the class that
        asks in the same event-loop tick: one round trip admits them all."""
        key = (quota.name, day)
        batch = self._open.get(key)
        if batch is not None:
            index = len(batch.requests)
            batch.requests.append(request)
            with anyio.CancelScope(shield=True):  # one round trip; an admission is not lost
                await batch.done.wait()
            if batch.error is not None:
                raise batch.error
            return batch.replies[index]
        batch = self._open[key] = _Batch([request])
        with anyio.CancelScope(shield=True):
            try:
                await anyio.lowlevel.checkpoint()  # let this tick's other callers join
                del self._open[key]
                order = sorted(range(len(batch.requests)), key=lambda i: batch.requests[i].score)
                replies = await self.store.quotas.admit_many(
                    quota_class=quota.name,
                    limits=quota.limits,
                    day=day,
                    day_left_s=left,
                    lease_s=self.slot_lease_s,
                    requests=[batch.requests[i] for i in order],
                )
                batch.replies = [replies[0]] * len(order)
                for position, i in enumerate(order):
                    batch.replies[i] = replies[position]
            except BaseException as e:
                if self._open.get(key) is batch:
                    del self._open[key]
                batch.error = e
                raise
            finally:
                batch.done.set()
        return batch.replies[0]

    @staticmethod
    def _exceeded(
        kind: str, what: str, quota: ClassQuota, agent: str, retry_s: float
    ) -> QuotaExceeded:
        scope, _, limit = what.partition(" ")
        return QuotaExceeded(
            kind=kind,
            scope=scope or "class",
            quota_class=quota.name,
            limit=limit or what,
            retry_after_s=retry_s,
            agent=agent,
        )

    async def renew(self) -> None:
        """Extend the concurrency leases of this daemon's running calls (call it more
        often than ``slot_lease_s``; the daemon does, every second)."""
        if self.in_flight:
            await self.store.quotas.renew(list(self.in_flight.items()), lease_s=self.slot_lease_s)

    async def _settle(
        self, quota: ClassQuota, agent: str, call_id: str, estimate: int, actual: int
    ) -> None:
        now = self.clock()
        try:
            await self.store.quotas.settle(
                quota_class=quota.name,
                agent=agent,
                call=call_id,
                estimate=estimate,
                actual=actual,
                limits=quota.limits,
                agent_limits=quota.per_agent,
                day=day_window(quota.timezone, now)[0],
                minute=int(now // 60),
            )
        except StoreError as e:
            # The slot comes back when its lease runs out; the estimate stays charged.
            log.warning("cannot settle the quota of %s: %s", agent, e)

    # ------------------------------------------------------------------ metrics

    def sample(self, *, slots_held: int, slots_total: int) -> dict[str, Any]:
        """This daemon's recent calls, for the evaluator (see :func:`fleet_metrics`)."""
        now = self.clock()
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        samples = list(self._samples)
        return {
            "at": now,
            "waits": [round(w, 4) for _, w, _, _ in samples],
            "calls": len(samples),
            "throttled": sum(1 for s in samples if s[2]),
            "failed": sum(1 for s in samples if s[3]),
            "slots_held": slots_held,
            "slots_total": slots_total,
        }

    async def charge_seconds(
        self, seconds: Mapping[tuple[str, str], float], *, op_id: str | None = None
    ) -> None:
        """Charge active agent-seconds ((agent, class) -> s) to governed classes' budgets;
        a retry with the same ``op_id`` is not charged twice."""
        now = self.clock()
        charges = []
        for (agent, quota_class), s in seconds.items():
            q = self.quota_of(quota_class)
            if q is not None and s > 0:
                charges.append((quota_class, agent, day_window(q.timezone, now)[0], s))
        await self.store.quotas.charge_seconds(charges, op_id=op_id)
