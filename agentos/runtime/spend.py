"""A quota class's money per day (``dailyCost``): what is left, checked before each call.

Token budgets are counted by the admission script; money is not a token count (the
same tokens cost a hundred times more on a hosted model than on the local one), so a
class's ``dailyCost`` is kept apart: every call's cost (priced with its Model's prices,
as ``agentos usage`` prices it) is added to the class's day in Redis, and before a call
the projected cost is compared with what is left. The daemon keeps one
:class:`ClassSpend` for all its agents: it reads the policies and the day's spending at
most every :data:`REFRESH_S` and writes what its agents spent meanwhile in the same
round trip, so a class with no ``dailyCost`` costs nothing here, and one with it costs
one round trip per daemon and second, not one per call. Daemons therefore see each
other's spending up to a second late: a class may go over its budget by what the fleet
spends in that second. The same read of the policies keeps the fleet's token prices of
the daemon's own engine (``spec.prices.defaultModel``), which has no Model to carry them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from agentos.core.fairness import day_window
from agentos.core.metering import fleet_prices
from agentos.core.modelspec import ModelPrices
from agentos.core.spec import SpecError
from agentos.governor.evaluator import stored_policies
from agentos.store import Store, StoreError

__all__ = ["REFRESH_S", "ClassSpend"]

log = logging.getLogger("agentos.spend")

REFRESH_S = 1.0
_POLICIES_S = 5.0  # how often the policies' dailyCost are read again


class ClassSpend:
    """Money per quota class and day, for the daemon's agents (see the module docstring)."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._limits: dict[str, tuple[float, str]] = {}  # class -> (dailyCost, timezone)
        # The fleet's token prices of the daemon's own engine (QuotaPolicy
        # spec.prices.defaultModel), read with the policies.
        self.default_prices = ModelPrices()
        self._limits_at = -_POLICIES_S
        self._spent: dict[str, float] = {}  # class -> spent today, as last read
        self._pending: dict[tuple[str, str], float] = {}  # (class, day) -> not yet written
        self._read_at = -REFRESH_S
        self._lock = anyio.Lock()

    def add(self, quota_class: str, amount: float) -> None:
        """Count ``amount`` spent by an agent of ``quota_class`` (written with the next
        refresh); only classes with a ``dailyCost`` are counted."""
        limit = self._limits.get(quota_class)
        if limit is None or amount <= 0:
            return
        day = day_window(limit[1], self.clock())[0]
        key = (quota_class, day)
        self._pending[key] = self._pending.get(key, 0.0) + amount

    async def left(self, quota_class: str) -> float | None:
        """What ``quota_class`` may still spend today (None: it has no ``dailyCost``)."""
        await self._refresh()
        limit = self._limits.get(quota_class)
        if limit is None:
            return None
        day = day_window(limit[1], self.clock())[0]
        pending = self._pending.get((quota_class, day), 0.0)
        return limit[0] - self._spent.get(quota_class, 0.0) - pending

    def resets_in(self, quota_class: str) -> float:
        """Seconds until ``quota_class``'s budget day ends (an hour when it has none)."""
        limit = self._limits.get(quota_class)
        return 3600.0 if limit is None else day_window(limit[1], self.clock())[1]

    async def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._read_at < REFRESH_S:
            return
        async with self._lock:
            if now - self._read_at < REFRESH_S:
                return
            self._read_at = now
            try:
                if now - self._limits_at >= _POLICIES_S:
                    raw = await self.store.specs.policies()
                    self._limits = _daily_costs(raw)
                    self.default_prices = _default_prices(raw)
                    self._limits_at = now
                if not self._limits:
                    self._pending.clear()
                    return
                pending, self._pending = self._pending, {}
                try:
                    await self.store.quotas.add_cost(pending)
                except BaseException:  # a Redis error, a cancel: not lost, written next time
                    for key, amount in pending.items():
                        self._pending[key] = self._pending.get(key, 0.0) + amount
                    raise
                days = {c: day_window(tz, self.clock())[0] for c, (_, tz) in self._limits.items()}
                self._spent = await self.store.quotas.cost_used(days)
            except StoreError as e:
                log.warning("could not read or write the classes' daily cost: %s", e)


def _daily_costs(raw: dict[str, dict[str, object]]) -> dict[str, tuple[float, str]]:
    """Class -> (dailyCost, the policy's timezone) of every class that declares one."""
    try:
        policies = stored_policies(raw)
    except SpecError as e:
        log.warning("a stored QuotaPolicy no longer validates: %s", e)
        return {}
    out: dict[str, tuple[float, str]] = {}
    for policy in policies.values():
        for name, limits in policy.spec.classes.items():
            if limits.daily_cost is not None and name not in out:
                out[name] = (limits.daily_cost, policy.spec.timezone)
    return out


def _default_prices(raw: dict[str, dict[str, object]]) -> ModelPrices:
    """The fleet's prices of the daemon's own engine (none declared: zero)."""
    try:
        declared = fleet_prices(stored_policies(raw))
    except SpecError:
        return ModelPrices()
    if declared is None or declared[1].default_model is None:
        return ModelPrices()
    return declared[1].default_model
