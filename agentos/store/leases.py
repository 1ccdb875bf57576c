"""Who runs what: agent leases with fencing tokens, the daemons' signal stream and heartbeats.

A daemon takes an agent by acquiring its lease (``lua/lease_acquire.lua``), which hands
out a fencing token that every later write of that agent is checked against; it renews
its leases in batches and releases them on a clean stop; a running daemon renews them
from a thread of its own (:mod:`agentos.store.keeper`), so that agent code that blocks
the event loop cannot cost the fleet its leases. Daemons nudge each other through the
signal streams (:mod:`~agentos.store.signals`) and say they are alive with heartbeats
(:mod:`~agentos.store.heartbeats`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from agentos.store.batching import raise_first, run_many
from agentos.store.conn import Conn
from agentos.store.errors import StoreError, classify, translate
from agentos.store.keeper import LeaseKeeper, sync_client
from agentos.store.records import LeaseInfo, _s

__all__ = ["Leases"]


class Leases:
    """Agent leases and their fencing tokens (``store.leases``; ``read`` was
    ``Store.leases``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys
        self.cluster = conn.cluster
        self._acquire = conn.scripts.lease_acquire
        self._renew = conn.scripts.lease_renew
        self._release = conn.scripts.lease_release

    @translate
    async def acquire(self, name: str, daemon_id: str, ttl_ms: int) -> int:
        """Take (or extend our own) lease on an agent. Returns the fencing token, 0 if taken."""
        k = self.keys
        token = await self._acquire(keys=[k.lease(name), k.fence(name)], args=[daemon_id, ttl_ms])
        return int(token)

    @translate
    async def acquire_many(
        self, names: Sequence[str], daemon_id: str, ttl_ms: int
    ) -> dict[str, int]:
        """:meth:`acquire` for many agents in one pipeline; returns the tokens (0 = taken)."""
        if not names:
            return {}
        k = self.keys
        calls = [([k.lease(n), k.fence(n)], [daemon_id, ttl_ms]) for n in names]
        tokens = raise_first(await run_many(self._r, self._acquire, calls))
        return {name: int(t) for name, t in zip(names, tokens, strict=True)}

    @translate
    async def renew(self, held: Mapping[str, str], ttl_ms: int) -> dict[str, bool | StoreError]:
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
    async def release(self, name: str, value: str) -> bool:
        """Give up a lease we hold. Returns False when it was no longer ours."""
        return bool(await self._release(keys=[self.keys.lease(name)], args=[value]))

    @translate
    async def read(self, names: Iterable[str]) -> dict[str, LeaseInfo]:
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

    def keeper(
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
