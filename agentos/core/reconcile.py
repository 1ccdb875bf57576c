"""Desired fleet + what this daemon observes + now -> the actions that close the gap.

The daemon's control loop is this one pure function and a driver that performs its
result. Keeping the decision free of I/O means every case (a new agent, a deleted one,
a re-applied spec, an agent whose owner died, a full daemon, a daemon over its fair
share of the fleet) is a row in a table test instead of a scenario that needs Redis and
timing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agentos.core.lifecycle import StopReason

__all__ = ["Desired", "Lease", "Local", "Restart", "Start", "Stop", "reconcile"]


@dataclass(frozen=True, slots=True)
class Desired:
    """An applied agent: its name, the hash of its spec, and its priority."""

    name: str
    spec_hash: str
    priority: int = 50


@dataclass(frozen=True, slots=True)
class Local:
    """An agent this daemon supervises, and the spec hash it was started with.

    ``busy``: in a task (or with work queued, waking, hibernating, failed): never handed
    over. ``leaving``: already being handed over; it still holds its place until its
    runner is done.
    """

    name: str
    spec_hash: str
    busy: bool = False
    leaving: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """Who holds an agent's lease in Redis and until when (seconds, daemon clock)."""

    owner: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Start:
    """Take the agent's lease and start a supervisor for it."""

    name: str
    spec_hash: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the local supervisor and release the lease."""

    name: str
    reason: StopReason


@dataclass(frozen=True, slots=True)
class Restart:
    """Stop the local supervisor and start it again with the new spec."""

    name: str
    spec_hash: str


Action = Start | Stop | Restart


def reconcile(
    desired: Mapping[str, Desired],
    local: Mapping[str, Local],
    leases: Mapping[str, Lease],
    now: float,
    *,
    daemon_id: str,
    capacity: int | None = None,
    handover: int = 0,
) -> list[Action]:
    """Return what this daemon must do so that the fleet matches ``desired``.

    - a local agent that is no longer desired is stopped (reason ``delete``);
    - a local agent whose spec changed is restarted with the new spec;
    - a desired agent with no live lease is started here, highest priority first,
      as long as this daemon has ``capacity`` left;
    - an agent whose lease another daemon holds, and that has not expired by
      ``now``, is left alone;
    - with ``handover`` > 0, a daemon that holds more than ``capacity`` (its fair share
      plus margin, see :mod:`agentos.core.placement`) stops agents with reason
      ``rebalance`` until it would hold ``capacity``: only agents that are neither
      ``busy`` nor restarting, lowest priority first, and never more than ``handover``
      leaving at once (those already ``leaving`` count). Agents that are leaving still
      hold their place, so nothing is started while a handover is under way.

    Stops come first in the result so that capacity is freed before starts.
    """
    stops: list[Action] = []
    restarts: list[Action] = []
    for name, running in local.items():
        want = desired.get(name)
        if want is None:
            stops.append(Stop(name, StopReason.DELETE))
        elif want.spec_hash != running.spec_hash:
            restarts.append(Restart(name, want.spec_hash))

    held = len(local) - len(stops)
    if capacity is not None and handover > 0:
        stops += _hand_over(desired, local, held, capacity, handover)
    free = None if capacity is None else max(0, capacity - held)
    candidates = [
        want
        for name, want in desired.items()
        if name not in local and _lease_free(leases.get(name), now, daemon_id)
    ]
    candidates.sort(key=lambda d: (-d.priority, d.name))
    if free is not None:
        candidates = candidates[:free]
    starts: list[Action] = [Start(d.name, d.spec_hash) for d in candidates]
    return stops + restarts + starts


def _hand_over(
    desired: Mapping[str, Desired],
    local: Mapping[str, Local],
    held: int,
    capacity: int,
    handover: int,
) -> list[Action]:
    leaving = sum(1 for name, running in local.items() if running.leaving and name in desired)
    count = min(held - leaving - capacity, handover - leaving)
    if count <= 0:
        return []
    movable = [
        desired[name]
        for name, running in local.items()
        if not running.busy
        and not running.leaving
        and name in desired
        and desired[name].spec_hash == running.spec_hash
    ]
    # The mirror of the start order: the agents this daemon would start last go first.
    movable.sort(key=lambda d: (-d.priority, d.name), reverse=True)
    return [Stop(d.name, StopReason.REBALANCE) for d in movable[:count]]


def _lease_free(lease: Lease | None, now: float, daemon_id: str) -> bool:
    # A lease of our own on an agent we do not supervise is a leftover of an
    # earlier run of this daemon id: take it back.
    return lease is None or lease.expires_at <= now or lease.owner == daemon_id
