"""Who runs what: agent leases with fencing tokens, the daemons' signal stream and heartbeats.

A daemon takes an agent by acquiring its lease (``lua/lease_acquire.lua``), which hands
out a fencing token that every later write of that agent is checked against; it renews
its leases in batches and releases them on a clean stop; a running daemon renews them
from a thread of its own (:mod:`agentos.store.keeper`), so that agent code that blocks
the event loop cannot cost the fleet its leases. Daemons nudge each other through one
signal stream, say they are alive with heartbeats (``lua/daemon_heartbeat.lua``, stamped
with the Redis server's clock) and record fleet-wide events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agentos.store import streams
from agentos.store.batching import raise_first, run_many
from agentos.store.errors import StoreError, classify, translate
from agentos.store.keeper import LeaseKeeper, heartbeat_args, sync_client
from agentos.store.keys import Keys
from agentos.store.keys import event_fields as _event_fields
from agentos.store.records import FLEET_EVENTS_MAXLEN, SIGNALS_MAXLEN, LeaseInfo, _s
from agentos.store.writes import EVENTS_MAXLEN

__all__ = ["LeaseOps"]


class LeaseOps:
    """Lease, signal and daemon methods of :class:`agentos.store.Store` (mixed in; uses
    its client, keys and the lease and heartbeat scripts)."""

    _r: Any
    _acquire: Any
    _renew: Any
    _release: Any
    _heartbeat: Any
    keys: Keys
    cluster: bool
    display_url: str

    # ---------------------------------------------------------------- signals

    @translate
    async def signal(self, cmd: str, agent: str, **fields: str) -> None:
        """Nudge the daemons: ``cmd`` is wake, hibernate, message, applied or deleted."""
        await self._r.xadd(
            self.keys.signals(self.keys.signal_shard(agent)),
            {"cmd": cmd, "agent": agent, **fields},
            maxlen=SIGNALS_MAXLEN,
            approximate=True,
        )

    def signal_groups(self) -> list[tuple[str, ...]]:
        """The signal shards a daemon reads, grouped by what one blocking read may cover:
        all of them on one Redis, one each on a cluster (one reader per group)."""
        streams_ = self.keys.signal_streams()
        return [tuple(streams_)] if not self.cluster else [(s,) for s in streams_]

    @translate
    async def last_signal_id(self, group: Sequence[str] | None = None) -> str:
        """A cursor at the newest signal of ``group`` (default: every shard): where a new
        reader starts."""
        return await streams.latest(self._r, group or self.keys.signal_streams())

    @translate
    async def read_signals(
        self,
        after_id: str,
        *,
        block_ms: int = 1000,
        count: int = 1000,
        group: Sequence[str] | None = None,
    ) -> list[tuple[str, dict[str, str]]]:
        """Signals of ``group`` after the cursor ``after_id``, waiting up to ``block_ms``
        for the first; each comes with the cursor that resumes after it."""
        entries = await streams.read_after(
            self._r,
            group or self.keys.signal_streams(),
            after_id,
            count=count,
            block_ms=block_ms,
            cluster=self.cluster,
        )
        return [(cursor, fields) for cursor, _, _, fields in entries]

    # ---------------------------------------------------------------- leases

    @translate
    async def acquire_lease(self, name: str, daemon_id: str, ttl_ms: int) -> int:
        """Take (or extend our own) lease on an agent. Returns the fencing token, 0 if taken."""
        k = self.keys
        token = await self._acquire(keys=[k.lease(name), k.fence(name)], args=[daemon_id, ttl_ms])
        return int(token)

    @translate
    async def acquire_leases(
        self, names: Sequence[str], daemon_id: str, ttl_ms: int
    ) -> dict[str, int]:
        """:meth:`acquire_lease` for many agents in one pipeline; returns the tokens (0 = taken)."""
        if not names:
            return {}
        k = self.keys
        calls = [([k.lease(n), k.fence(n)], [daemon_id, ttl_ms]) for n in names]
        tokens = raise_first(await run_many(self._r, self._acquire, calls))
        return {name: int(t) for name, t in zip(names, tokens, strict=True)}

    @translate
    async def renew_leases(
        self, held: Mapping[str, str], ttl_ms: int
    ) -> dict[str, bool | StoreError]:
        """Extend many leases in one pipeline; ``held`` maps agent -> "daemon|token".

        Returns agent -> whether the lease is still ours, or the error that left it
        unknown. On a cluster one node can be out (failing over) while the others
        answer: the leases they serve are renewed all the same. Raises when none answered.
        """
        if not held:
            return {}
        names = list(held)
        calls = [([self.keys.lease(n)], [held[n], ttl_ms]) for n in names]
        replies = await run_many(self._r, self._renew, calls)
        if all(isinstance(r, Exception) for r in replies):
            raise replies[0]
        out: dict[str, bool | StoreError] = {}
        for name, reply in zip(names, replies, strict=True):
            if isinstance(reply, Exception):
                out[name] = classify(reply, self) or StoreError(str(reply))
            else:
                out[name] = bool(reply)
        return out

    @translate
    async def release_lease(self, name: str, value: str) -> bool:
        """Give up a lease we hold. Returns False when it was no longer ours."""
        return bool(await self._release(keys=[self.keys.lease(name)], args=[value]))

    @translate
    async def leases(self, names: Iterable[str]) -> dict[str, LeaseInfo]:
        """Current lease holders of ``names`` (agents without a lease are left out)."""
        names = list(names)
        if not names:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(self.keys.lease(name))
                pipe.pttl(self.keys.lease(name))
            raw = await pipe.execute()
        out: dict[str, LeaseInfo] = {}
        for i, name in enumerate(names):
            value, ttl = raw[2 * i], raw[2 * i + 1]
            if value is None:
                continue
            owner, _, token = _s(value).rpartition("|")
            out[name] = LeaseInfo(owner, int(token or 0), int(ttl))
        return out

    # ---------------------------------------------------------------- daemons

    @translate
    async def heartbeat(
        self,
        daemon_id: str,
        info: Mapping[str, object],
        *,
        now: float | None = None,
        forget_after_s: float = 600.0,
        instance: str = "",
        fresh_s: float = 0.0,
    ) -> bool:
        """Record that a daemon is alive, with a few facts for `agentos get daemons`.

        ``seen_at`` is the Redis server's time (``now`` overrides it, for tests): the
        daemons compare heartbeats on one clock, never another host's with their own.
        Entries not seen for ``forget_after_s`` (daemons that died without saying
        goodbye) are removed, and the hash itself expires that long after the last
        heartbeat of any daemon. With ``instance`` (a nonce of this process), returns
        False and writes nothing when another instance's heartbeat under the same id is
        younger than ``fresh_s``: a second daemon started with a live one's id.
        """
        body = {k: v for k, v in info.items() if k != "seen_at"}
        if instance:
            body["instance"] = instance
        written, _ = await self._heartbeat(
            keys=[self.keys.daemons],
            args=heartbeat_args(
                daemon_id, body, now=now, forget_after_s=forget_after_s, fresh_s=fresh_s
            ),
        )
        return bool(int(written))

    @translate
    async def server_time(self) -> float:
        """The Redis server's clock (epoch seconds): what heartbeats are stamped with."""
        seconds, micros = await self._r.time()
        return int(seconds) + int(micros) / 1_000_000

    @translate
    async def record_agent_event(
        self, agent: str, type_: str, reason: str, message: str, daemon: str
    ) -> None:
        """Add an event to an agent's stream and the fleet feed without a lease: what a
        daemon saw happen to an agent it no longer holds (a lease it lost)."""
        fields = _event_fields(agent, time.time(), type_, reason, message, daemon)
        await self._r.xadd(self.keys.events(agent), fields, maxlen=EVENTS_MAXLEN, approximate=True)
        await self.record_fleet_event(agent, type_, reason, message, daemon)

    def lease_keeper(
        self, daemon_id: str, *, instance: str, ttl_ms: int, every_s: float, forget_after_s: float
    ) -> LeaseKeeper:
        """A :class:`~agentos.store.keeper.LeaseKeeper` for this store's server: leases
        and the heartbeat renewed from a thread, on a connection of its own."""
        return LeaseKeeper(
            sync_client(self._r, cluster=self.cluster),
            self.keys,
            daemon_id,
            instance=instance,
            ttl_ms=ttl_ms,
            every_s=every_s,
            forget_after_s=forget_after_s,
        )

    @translate
    async def forget_daemon(self, daemon_id: str) -> None:
        """Remove a daemon's heartbeat on clean exit."""
        await self._r.hdel(self.keys.daemons, daemon_id)

    @translate
    async def record_fleet_event(
        self, agent: str, type_: str, reason: str, message: str, daemon: str
    ) -> None:
        """Add one event to the fleet feed (``agent`` empty for events of the fleet itself)."""
        await self._r.xadd(
            self.keys.fleet_events(self.keys.feed_shard(agent)),
            _event_fields(agent, time.time(), type_, reason, message, daemon),
            maxlen=FLEET_EVENTS_MAXLEN,
            approximate=True,
        )

    @translate
    async def daemons(self) -> dict[str, dict[str, Any]]:
        """Every daemon heartbeat by id."""
        raw = await self._r.hgetall(self.keys.daemons)
        return {_s(a): json.loads(b) for a, b in raw.items()}
