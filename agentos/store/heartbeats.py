"""Daemon heartbeats: who is alive, on the Redis server's clock.

A daemon writes its heartbeat (``lua/daemon_heartbeat.lua``, stamped with the server's
clock so that daemons compare heartbeats on one clock) before its first reconcile and
then from its lease keeper's thread (:mod:`agentos.store.keeper`); the others count the
live ones to share the agents out, and recover the agents of one that stopped beating.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.keeper import heartbeat_args
from agentos.store.records import _s

__all__ = ["Heartbeats"]


class Heartbeats:
    """Daemon heartbeats (``store.heartbeats``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys
        self._heartbeat = conn.scripts.heartbeat

    @translate
    async def beat(
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
    async def forget(self, daemon_id: str) -> None:
        """Remove a daemon's heartbeat on clean exit."""
        await self._r.hdel(self.keys.daemons, daemon_id)

    @translate
    async def daemons(self) -> dict[str, dict[str, Any]]:
        """Every daemon heartbeat by id."""
        raw = await self._r.hgetall(self.keys.daemons)
        return {_s(a): json.loads(b) for a, b in raw.items()}
