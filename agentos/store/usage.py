"""Metered usage per agent and UTC day, as fenced writes and task outcomes counted it.

The counters are written by :mod:`~agentos.store.writes` (a task's usage) and
:mod:`~agentos.store.tasks` (a verdict judged again); `agentos usage`, budgets and
reports read them here.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentos.store.conn import Conn
from agentos.store.errors import translate
from agentos.store.records import _s

__all__ = ["Usage"]


class Usage:
    """Usage counters (``store.usage``; ``read`` was ``Store.usage``)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self._r = conn.r
        self.keys = conn.keys

    @translate
    async def read(
        self, names: Sequence[str], days: Sequence[str]
    ) -> dict[tuple[str, str], dict[str, float]]:
        """Metered usage per (agent, day) for the given agents and UTC days (missing: left out)."""
        pairs = [(n, d) for n in names for d in days]
        if not pairs:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for n, d in pairs:
                pipe.hgetall(self.keys.usage(n, d))
            raw = await pipe.execute()
        return {
            pair: {_s(a): float(b) for a, b in h.items()}
            for pair, h in zip(pairs, raw, strict=True)
            if h
        }
