"""The daemon's view of the other daemons: who is alive, what they hold, its fair share.

Every few seconds (and when a daemon joins or drains) a daemon reads the heartbeats and
the others' held sets: the live daemons and how many agents they hold give its fair share
(:mod:`agentos.core.placement`), and the held set of a daemon not seen for a lease is
recovered: its agents are due again, for whoever has room. Heartbeats carry the Redis
server's time and are compared with it: no host's clock is compared with another's.
Deleted agents whose daemon died before it could purge them are purged here too. The
live daemons' labels (in their heartbeats) tell which held agents are pinned: agents some
other daemon may not host, left out of the fair share.
"""

from __future__ import annotations

import logging

from agentos.core.placement import live_daemons, live_labels, share_limit
from agentos.daemon.state import DaemonState
from agentos.runtime.activation import UNBOUNDED, Activator, Placer, Room
from agentos.settings import DaemonSettings
from agentos.store import Store

__all__ = ["Peers"]

log = logging.getLogger("agentos.daemon")


class Peers:
    """One daemon's view of the others: how many live (``count``), which (``live``), how
    many agents they hold (``fleet_active``); see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        daemon_id: str,
        settings: DaemonSettings,
        state: DaemonState,
        activator: Activator,
        placer: Placer,
    ) -> None:
        self.store = store
        self.id = daemon_id
        self.settings = settings
        self.state = state
        self.activator = activator
        self.placer = placer
        self.count = 1  # live daemons as last counted, this one included
        self.live: set[str] = {self.id}  # daemons whose heartbeat is fresh, as last read
        self.fleet_active = 0  # agents the other live daemons hold (their held sets)

    async def look(self, now: float) -> None:
        """Count the live daemons and their agents (the fair share), activate again the
        agents of daemons that died, and purge what deleted agents left behind."""
        await self._purge_deleted()
        heartbeats = await self.store.heartbeats.daemons()
        # Heartbeats are stamped with the Redis server's clock: compared with the same
        # clock, another host's (or ours) may be off by any amount.
        server_now = await self.store.heartbeats.server_time()
        fresh_s = self.settings.lease_ttl_s
        peers = live_daemons(heartbeats, server_now, me=self.id, fresh_s=fresh_s)
        if peers != self.count:  # the share changed: room for due agents, maybe
            self.activator.nudge()
        self.count = peers
        labels = live_labels(heartbeats, server_now, fresh_s=fresh_s)
        labels.pop(self.id, None)
        if labels != self.placer.peers:  # which agents are pinned changed
            self.placer.peers = labels
            self.activator.nudge()
        self.live = {self.id}
        for daemon_id, info in heartbeats.items():
            seen_at = info.get("seen_at")
            if isinstance(seen_at, int | float) and server_now - float(seen_at) < fresh_s:
                self.live.add(daemon_id)
        # What the others hold now (their held sets), not as of their last heartbeat.
        others = sorted(self.live - {self.id})
        self.fleet_active = sum((await self.store.waits.held_counts(others)).values())
        # Not seen for a lease: gone. Its leases may outlive its last heartbeat a little;
        # a claim that finds one still held makes the agent due when it expires.
        for daemon_id in await self.store.waits.holders() - self.live:
            names = await self.store.waits.recover_held(daemon_id, now=now)
            if names:
                message = (
                    f"daemon {daemon_id} is gone (no heartbeat for {fresh_s:.0f}s); "
                    f"{len(names)} agent(s) it held are due again"
                )
                log.warning("%s", message)
                await self.store.events.record_fleet_event(
                    "", "DaemonLost", daemon_id, message, self.id
                )
                self.activator.nudge()

    async def _purge_deleted(self) -> None:
        """Remove the keys of deleted agents whose daemon died before it could."""
        pending = [
            n
            for n in await self.store.specs.pending_purges()
            if n not in self.state.desired and n not in self.state.runners
        ]
        if pending:
            held = await self.store.leases.read(pending)
            for name in pending:
                if name not in held:
                    await self.store.specs.purge_agent(name)

    def share(self, agents: int) -> int | None:
        if self.settings.max_agents is None and self.count <= 1:
            return None  # alone and unbounded
        return share_limit(
            agents,
            self.count,
            capacity=self.settings.max_agents,
            margin=self.settings.share_margin,
        )

    def pinned_held(self) -> set[str]:
        """The agents held here that some other live daemon may not host (pinned)."""
        return self.placer.pinned_of((n, r.resource.spec) for n, r in self.state.runners.items())

    async def room(self, due: int) -> Room:
        """How many more agents this daemon may take now, with ``due`` agents waiting for
        a daemon: up to ``--max-agents`` in all, and of those any daemon may host up to
        its fair share of what is held and due (pinned agents held here do not count
        against it). The others' counts are read fresh (their held sets, one command per
        daemon), so two daemons never both think the other has the room."""
        cap = self.settings.max_agents
        total = UNBOUNDED if cap is None else cap - len(self.state.runners)
        if cap is None and self.count <= 1:
            return Room(total, total)
        others = sorted(self.live - {self.id})
        self.fleet_active = sum((await self.store.waits.held_counts(others)).values())
        limit = self.share(self.fleet_active + len(self.state.runners) + due)
        if limit is None:
            return Room(total, total)
        shared_held = len(self.state.runners) - len(self.pinned_held())
        return Room(min(total, limit - shared_held), total)
