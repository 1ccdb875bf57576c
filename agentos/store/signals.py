"""The daemons' signal streams: how a send, an apply or an operator nudges the daemons.

The signals are sharded like the fleet feed (one stream per shard, so that it runs on
Redis Cluster); a reader's cursor covers every shard of its group
(:mod:`agentos.store.streams`). Signals only nudge: whatever they announce is in Redis
already, and a daemon that misses one finds the work on its next sweep.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentos.store import steps, streams
from agentos.store.conn import Conn
from agentos.store.errors import translate

__all__ = ["Signals"]


class Signals:
    """Sending and reading the daemons' signals (``store.signals``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys
        self.cluster = conn.cluster

    @translate
    async def send(self, cmd: str, agent: str, **fields: str) -> None:
        """Nudge the daemons: ``cmd`` is wake, hibernate, message, applied or deleted."""
        await steps.signal(self.conn, cmd, agent, **fields)

    def groups(self) -> list[tuple[str, ...]]:
        """The signal shards a daemon reads, grouped by what one blocking read may cover:
        all of them on one Redis, one each on a cluster (one reader per group)."""
        streams_ = self.keys.signal_streams()
        return [tuple(streams_)] if not self.cluster else [(s,) for s in streams_]

    @translate
    async def last_id(self, group: Sequence[str] | None = None) -> str:
        """A cursor at the newest signal of ``group`` (default: every shard): where a new
        reader starts."""
        return await streams.latest(self._r, group or self.keys.signal_streams())

    @translate
    async def read(
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
