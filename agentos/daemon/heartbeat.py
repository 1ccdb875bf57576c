"""What a daemon tells the others: its heartbeat, its held leases, its announcements.

The heartbeat (host, models, labels, share, whether it drains) is written every third of
a lease by the lease keeper's thread (:mod:`agentos.store.keeper`) together with the
leases the daemon holds, so that agent code blocking the event loop cannot cost the
daemon its leases; this module hands the keeper what to write. The first heartbeat
claims the daemon's id (two live processes with one id are refused). Announcements to
the other daemons (``joined``, ``draining``, ``released``, a ``Rebalancing`` event) make
them count the daemons and look at the leases at once.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import TYPE_CHECKING

import anyio

from agentos.daemon.faults import Faults
from agentos.daemon.peers import Peers
from agentos.daemon.state import DaemonState
from agentos.engine.base import Engine
from agentos.runtime.activation import Activator
from agentos.runtime.activation_start import clean
from agentos.runtime.models import ModelPool
from agentos.settings import DaemonSettings
from agentos.store import Store, StoreError, StoreUnavailable
from agentos.store.keeper import LeaseKeeper

if TYPE_CHECKING:  # the mcp package is imported when a daemon starts, not by every CLI call
    from agentos.tools.mcp import ToolServerPool

__all__ = ["DaemonIdInUse", "Heartbeat"]

log = logging.getLogger("agentos.daemon")


class DaemonIdInUse(StoreUnavailable):
    """Another live daemon runs with this daemon's id: this one does not start."""


class Heartbeat:
    """One daemon's heartbeat and announcements (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        daemon_id: str,
        instance: str,
        settings: DaemonSettings,
        engine: Engine,
        models: ModelPool,
        tool_servers: ToolServerPool,
        state: DaemonState,
        peers: Peers,
        activator: Activator,
        keeper: LeaseKeeper,
        faults: Faults,
        started_at: float,
    ) -> None:
        self.store = store
        self.id = daemon_id
        self.instance = instance
        self.settings = settings
        self.engine = engine
        self.models = models
        self.tool_servers = tool_servers
        self.state = state
        self.peers = peers
        self.activator = activator
        self.keeper = keeper
        self.faults = faults
        self.started_at = started_at

    def info(self) -> dict[str, object]:
        """The facts of the heartbeat."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "engine": self.engine.name,
            "models": self.models.describe(),
            "toolServers": self.tool_servers.describe(),
            "agents": len(self.state.runners),
            "started_at": self.started_at,
            "share": self.state.limit,
            "draining": self.state.draining,
            # Which agents it may host; clients read them (ps: Unschedulable, get daemons).
            "labels": dict(self.settings.labels),
            "lease_ttl_s": self.settings.lease_ttl_s,  # how fresh a live one's heartbeat is
        }

    def publish_held(self) -> dict[str, str]:
        """Hand the keeper what we hold now (not the runners that released their agent
        already: they are ending) and our heartbeat's facts."""
        held = {n: r.lease_value for n, r in self.state.runners.items() if not r.released}
        self.keeper.publish(held, self.info())
        return held

    async def claim_id(self) -> None:
        """Write our first heartbeat, refused while a live daemon of another process has
        our id (its heartbeat younger than a lease). One that stopped beating (it died
        just before we started with its id) is waited out; one that still beats makes
        us raise :class:`DaemonIdInUse`."""
        fresh_s = self.settings.lease_ttl_s
        pause_s = min(0.5, fresh_s / 6)
        # Counted in pauses, not read from a clock: an injected clock may stand still.
        tries = math.ceil(2 * fresh_s / pause_s)
        first: object = None
        while True:
            try:
                if await self.store.heartbeats.beat(
                    self.id,
                    self.info(),
                    forget_after_s=self.settings.daemon_forget_after_s,
                    instance=self.instance,
                    fresh_s=fresh_s,
                ):
                    return
                other = (await self.store.heartbeats.daemons()).get(self.id, {})
            except StoreError as e:  # Redis away at the start: wait for it, like every loop
                self.faults.store_failed("daemon id", e, 1.0)
                await anyio.sleep(1.0)
                continue
            seen = other.get("seen_at")
            if first is None:
                first = seen
            elif seen != first or tries <= 0:
                host, pid = clean(str(other.get("host", "?"))), other.get("pid", "?")
                raise DaemonIdInUse(
                    f"daemon id {self.id!r} is in use by a live daemon (host {host}, pid "
                    f"{pid}); stop it or start this one with another --id"
                )
            tries -= 1
            await anyio.sleep(pause_s)

    async def announce(self, cmd: str) -> None:
        """Write our heartbeat now (``draining`` once stopping) and signal ``cmd`` to the
        other daemons, which then count the daemons and look at the leases at once."""
        try:
            if cmd != "released":
                self.publish_held()  # the keeper's next heartbeat says the same
                await self.store.heartbeats.beat(
                    self.id,
                    self.info(),
                    forget_after_s=self.settings.daemon_forget_after_s,
                    instance=self.instance,
                    fresh_s=self.settings.lease_ttl_s,
                )
            await self.store.signals.send(cmd, "", daemon=self.id)
        except StoreError as e:
            self.faults.store_failed(f"{cmd} signal", e)

    async def handover_loop(self) -> None:
        """Say "released" whenever agents we handed over (or let go of while draining)
        are free: one signal for the agents that stop within a few milliseconds."""
        while True:
            await self.state.released.wait()
            await anyio.sleep(0.05)
            self.state.take_released()
            await self.announce("released")

    async def handing_out(self, names: list[str], fleet: int) -> None:
        """Say why agents are being handed over (the log and the fleet's events)."""
        message = (
            f"{self.id} hands over {len(names)} agent(s): it holds {len(self.state.runners)}, "
            f"more than its fair share ({self.state.limit} of {fleet} agents on "
            f"{self.peers.count} daemons: {self.peers.fleet_active} held by the others, "
            f"{self.activator.backlog} due)"
        )
        log.info("%s", message)
        try:
            await self.store.events.record_fleet_event(
                "", "Rebalancing", "fair share", message, self.id
            )
        except StoreError as e:
            self.faults.store_failed("rebalance event", e)
