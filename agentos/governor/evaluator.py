"""The policy evaluator: turns fleet metrics into effective quotas, in one daemon at a time.

Every daemon runs :meth:`Evaluator.run`, but only the holder of the evaluator lease
(a fenced lease in Redis, like an agent's) evaluates: every ``period_s`` it merges the
samples each daemon published, adds the budget burn rate, runs the pure
:func:`agentos.core.policy.evaluate` with the rules' memory, and writes the effective
limits, the new memory and one event per rescale in one transaction. Every daemon's
:class:`~agentos.governor.admission.Governor` reads the effective limits from there, so
all of them enforce the same numbers. When the holder dies its lease runs out and
another daemon takes over with the memory it left.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from agentos.core.fairness import burn_rate, day_window, fleet_metrics
from agentos.core.policy import ClassQuota, Evaluation, evaluate
from agentos.core.spec import QuotaPolicyResource, parse_resource
from agentos.governor.budgets import warn_budgets
from agentos.store import Store, StoreError

__all__ = ["Evaluator", "fleet_snapshot", "stored_policies"]

log = logging.getLogger("agentos.governor")


def stored_policies(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, QuotaPolicyResource]:
    """Parse the QuotaPolicy documents as the store returns them (canonical JSON)."""
    out: dict[str, QuotaPolicyResource] = {}
    for name, body in sorted(raw.items()):
        resource = parse_resource({k: v for k, v in body.items() if not k.startswith("_")})
        if isinstance(resource, QuotaPolicyResource):
            out[name] = resource
    return out


async def fleet_snapshot(
    store: Store, quotas: Mapping[str, ClassQuota], *, max_age_s: float, now: float
) -> dict[str, float]:
    """The fleet metrics now: every daemon's fresh samples plus the budget burn rate."""
    reports = await store.quotas.reports(max_age_s=max_age_s)
    budgets = {n: q for n, q in quotas.items() if q.limits.daily_tokens}
    burns: list[float] = []
    if budgets:
        days = {n: day_window(q.timezone, now) for n, q in budgets.items()}
        used = await store.quotas.budget_used({n: d for n, (d, _) in days.items()})
        for n, q in budgets.items():
            assert q.limits.daily_tokens is not None
            burns.append(burn_rate(used[n][0], q.limits.daily_tokens, days[n][1]))
    return fleet_metrics(reports.values(), burns)


class Evaluator:
    """Periodic policy evaluation under the evaluator lease."""

    def __init__(
        self,
        store: Store,
        *,
        daemon_id: str,
        period_s: float = 2.0,
        window_s: float = 60.0,
        lease_ttl_s: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.daemon_id = daemon_id
        self.period_s = period_s
        self.window_s = window_s
        self.lease_ttl_s = max(lease_ttl_s, 3 * period_s)
        self.clock = clock
        self.lease: str | None = None
        self.last: Evaluation | None = None
        self._nudge = anyio.Event()

    def nudge(self) -> None:
        """Evaluate soon (policies changed)."""
        self._nudge.set()

    async def run(self) -> None:
        """Evaluate every ``period_s`` while holding the lease; until cancelled."""
        try:
            while True:
                try:
                    self.lease = await self.store.quotas.evaluator_lease(
                        self.daemon_id, int(self.lease_ttl_s * 1000)
                    )
                    if self.lease is not None:
                        await self.step()
                except StoreError as e:
                    log.warning("quota policy evaluation skipped: %s", e)
                except Exception:
                    log.exception("quota policy evaluation failed")
                with anyio.move_on_after(self.period_s):
                    await self._nudge.wait()
                self._nudge = anyio.Event()
        finally:
            if self.lease is not None:
                with (
                    anyio.CancelScope(shield=True),
                    anyio.move_on_after(2),
                    contextlib.suppress(StoreError),
                ):
                    await self.store.quotas.evaluator_release(self.lease)

    async def step(self) -> Evaluation:
        """One evaluation: read, decide (pure), write (fenced by the evaluator lease,
        which the caller holds)."""
        if self.lease is None:
            raise RuntimeError("Evaluator.step needs the evaluator lease")
        now = self.clock()
        policies = stored_policies(await self.store.specs.policies())
        memory, _ = await self.store.quotas.state()
        previous = await self.store.quotas.effective() or {}
        metrics = await fleet_snapshot(
            self.store, previous, max_age_s=max(3 * self.period_s, 5.0), now=now
        )
        result = evaluate(policies, metrics, now, memory)
        published = await self.store.quotas.publish(
            lease_value=self.lease,
            quotas=result.quotas,
            memory=result.memory,
            metrics={"at": now, "values": metrics},
            events=[
                (
                    c.policy,
                    "Rescaled" if c.action == "rescaled" else "Restored",
                    c.rule,
                    f"class {c.class_}: {c.reason}",
                )
                for c in result.changes
            ],
        )
        if not published:
            # Another daemon took the lease over (we were paused past its TTL): its
            # result stands, ours is dropped.
            log.warning("quota evaluator lease lost; result not published")
            self.lease = None
            return result
        for c in result.changes:
            log.info("quota %s %s by rule %s: %s", c.class_, c.action, c.rule, c.reason)
        self.last = result
        await warn_budgets(self.store, result.quotas, now, by=self.daemon_id)
        return result
