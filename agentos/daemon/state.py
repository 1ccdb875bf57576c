"""What one daemon holds and the events its loops wake each other with, in one object.

Each job of the daemon (reconcile, peers, upkeep, supervising and stopping runners) is a
small class that takes this state and what else it needs as arguments; every change of
what the daemon holds (a runner added or dropped, an agent being stopped or handed over)
is a change of this one object, made through the few methods below or by the job that
owns that step. Nothing here does I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

import anyio
import anyio.abc

from agentos.core.reconcile import Desired
from agentos.runtime.runner import AgentRunner

__all__ = ["DaemonState"]

log = logging.getLogger("agentos.daemon")


class DaemonState:
    """The runners of one daemon and the agents they run (see the module docstring)."""

    def __init__(self, *, limit: int | None) -> None:
        self.runners: dict[str, AgentRunner] = {}
        # The cancel scope of each runner's supervisor (a stop past the grace cancels it).
        self.scopes: dict[str, anyio.CancelScope] = {}
        self.stopping: set[str] = set()  # being stopped (a respec restarts some)
        self.handing_over: set[str] = set()  # being stopped for the fair share
        self.desired: dict[str, Desired] = {}  # the stored spec of each agent held
        self.runner_errors: dict[str, int] = {}  # runners that failed in a row, by agent
        # The most agents we may hold (None: no limit), as reconcile last computed it.
        self.limit = limit
        self.draining = False
        self.stop = anyio.Event()  # a graceful shutdown has begun
        self.kick = anyio.Event()  # reconcile now
        self.kicked = True  # look at the peers on the next reconcile (and the first)
        self.released = anyio.Event()  # handed-over agents were let go of: say so
        self.quota_kick = anyio.Event()  # reload the quotas now
        self.agents_tg: anyio.abc.TaskGroup | None = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the agents' task group; an error in it is logged, never raised."""
        assert self.agents_tg is not None
        self.agents_tg.start_soon(_run_coro, coro)

    def reconcile_now(self, *, peers: bool = False) -> None:
        """Wake the reconcile loop; ``peers``: count the daemons on that pass too."""
        if peers:
            self.kicked = True
        self.kick.set()

    def take_kick(self) -> None:
        """The reconcile loop woke: a later kick wakes it again."""
        self.kick = anyio.Event()

    def take_released(self) -> None:
        self.released = anyio.Event()

    def take_quota_kick(self) -> None:
        self.quota_kick = anyio.Event()

    def drop(self, name: str, runner: AgentRunner) -> bool:
        """Forget ``runner`` if it is still the agent's; False when another replaced it."""
        if self.runners.get(name) is not runner:
            return False
        del self.runners[name]
        self.scopes.pop(name, None)
        if name not in self.stopping:
            self.desired.pop(name, None)
        return True


async def _run_coro(coro: Coroutine[Any, Any, None]) -> None:
    # An error here must not end the agents' task group (and with it Daemon.run); each
    # path retries what it must, this is the last resort.
    try:
        await coro
    except Exception:
        log.exception("an agent task of the daemon failed")
