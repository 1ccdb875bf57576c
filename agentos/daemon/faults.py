"""How the daemon lives through failures: a Redis that is away or full, a loop that fails.

None of the daemon's loops ends it when Redis is away or full: a failed store call is
logged once, clearly, and retried; afterwards one ``RedisUnavailable`` or ``RedisFull``
fleet event says for how long (it could not be written while it lasted). A loop that
fails with anything else is reported once (again only if the error changes) and started
again after a backoff: only the shutdown ends :meth:`agentos.daemon.Daemon.run`. Store
operations that must not be lost (an agent in no due index, with no lease and no runner,
would never run again) are repeated, shielded, until Redis takes them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from agentos.core.lifecycle import backoff_delay
from agentos.runtime.activation_start import clean
from agentos.store import Store, StoreError, StoreFull, StoreUnavailable

__all__ = ["LOOP_BACKOFF", "Faults"]

log = logging.getLogger("agentos.daemon")
_T = TypeVar("_T")
LOOP_BACKOFF = (0.5, 30.0)  # a daemon loop that failed starts again after this


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Faults:
    """One daemon's record of what failed (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        daemon_id: str,
        clock: Callable[[], float],
        retry_max_s: float,
    ) -> None:
        self.store = store
        self.id = daemon_id
        self.clock = clock
        self.retry_max_s = retry_max_s
        self.reported: dict[str, str] = {}  # what each failing path reported last
        # Redis at maxmemory: when writes were first and last refused (None: they are not).
        self.full_since: float | None = None
        self.full_last = 0.0
        self.down_since: float | None = None  # Redis (or a cluster node) unreachable
        self.down_last = 0.0

    def report(
        self, where: str, text: str, template: str, *, exc: BaseException | None = None
    ) -> None:
        """Log a failure of ``where`` once: the same text again is only a debug line."""
        text = clean(text)
        if self.reported.get(where) == text:
            log.debug(template, text)
            return
        self.reported[where] = text
        log.error(template, text, exc_info=exc)

    async def guarded(self, what: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the daemon's loops until the shutdown cancels it. What it cannot
        handle is logged once (again only if it changes) and the loop starts again after
        a backoff, so no error other than the shutdown ends the daemon."""
        failures = 0
        while True:
            started = self.clock()
            try:
                await loop()
                return
            except Exception as e:
                if self.clock() - started > 60:  # it ran well for a while
                    failures = 0
                failures += 1
                delay = backoff_delay(failures, *LOOP_BACKOFF)
                self.report(
                    what,
                    f"{type(e).__name__}: {e}",
                    f"the daemon's {what} loop failed (%s); it starts again in {delay:.1f}s",
                    exc=e,
                )
                await anyio.sleep(delay)

    async def until_done(self, op: Callable[[], Awaitable[_T]], what: str) -> _T:
        """Run a store operation that is safe to repeat until it succeeds, shielded
        from cancellation: what it records must not be lost (an agent in no due index,
        with no lease and no runner, would never run again)."""
        delay = 0.1
        with anyio.CancelScope(shield=True):
            while True:
                try:
                    return await op()
                except StoreError as e:
                    self.store_failed(what, e, delay)
                    await anyio.sleep(delay)
                    delay = min(delay * 2, max(self.retry_max_s, 30.0))
        raise AssertionError("unreachable: a shielded scope is never cancelled")

    def store_failed(self, where: str, e: StoreError, delay: float | None = None) -> None:
        """Log a failed store call once, clearly; remember when Redis started refusing writes."""
        then = "" if delay is None else f"; retrying in {delay:.1f}s"
        if not isinstance(e, StoreFull):
            if isinstance(e, StoreUnavailable):
                self.down_last = self.clock()
                if self.down_since is None:
                    self.down_since = self.down_last
            log.warning("%s: %s%s", where, e, then)
            return
        self.full_last = self.clock()
        if self.full_since is None:
            self.full_since = self.full_last
            log.error("%s; the daemon keeps running and retries (%s)", e, where)
        else:
            log.debug("%s: Redis still full%s", where, then)

    async def store_recovered(self) -> None:
        """After a write went through: if Redis was unreachable or full, say in the fleet
        feed for how long (the event could not be written while it lasted)."""
        if self.down_since is not None:
            since, until = self.down_since, max(self.down_last, self.down_since)
            self.down_since = None
            await self.store.events.record_fleet_event(
                "",
                "RedisUnavailable",
                "unreachable",
                f"Redis at {self.store.display_url} could not be reached from {_utc(since)} "
                f"to {_utc(until)} ({until - since:.0f}s); the daemon retried with backoff",
                self.id,
            )
            log.warning("Redis reachable again (it was not for %.0fs)", until - since)
        if self.full_since is None:
            return
        since, until = self.full_since, max(self.full_last, self.full_since)
        await self.store.events.record_fleet_event(
            "",
            "RedisFull",
            "maxmemory",
            f"Redis refused writes from {_utc(since)} to {_utc(until)} "
            f"({until - since:.0f}s): it was at maxmemory",
            self.id,
        )
        self.full_since = None
        log.warning("Redis accepts writes again (it refused them for %.0fs)", until - since)
